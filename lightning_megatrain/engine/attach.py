"""Attaching to a module: check what can be streamed, and lay its parameters out in host units.

Units in forward order: the input side of the non-layer parameters, one unit per streamed layer,
the output side. Every parameter becomes a view into its unit's arena, one unit at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .materialize import Materializer
from .units import Entry, Unit, assign_offsets, collect_entries


def check_module(module: nn.Module, layers: list[nn.Module], grads: bool) -> None:
    """Refuse, before anything is allocated, what megatrain cannot stream or would get wrong."""
    _check_sharing(module, layers)
    _check_side_outputs(module)
    for name, p in module.named_parameters():
        if p.requires_grad and grads and p.dtype != torch.float32:
            raise TypeError(
                f"megatrain keeps fp32 master weights for trainable parameters, but {name!r} is {p.dtype} and "
                "requires grad. Keep trainable parameters (e.g. adapters) in float32 and freeze the low-precision "
                "ones (requires_grad_(False)); frozen parameters are stored as they are. The precision setting "
                "picks the compute dtype."
            )


def _check_side_outputs(module: nn.Module) -> None:
    """Refuse what megatrain would silently get wrong: a loss built from tensors captured inside a
    streamed layer (HF's router logits are recorded by forward hooks inside each decoder layer)."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if getattr(config, "output_router_logits", False) is True:
            raise ValueError(
                f"{type(m).__name__} has config.output_router_logits=True: its router auxiliary loss is computed from "
                "router logits recorded by hooks inside each decoder layer, which megatrain runs without an autograd "
                "graph (the layer is recomputed in backward), so that loss would send no gradient to the routers. Set "
                "config.output_router_logits=False, or compute the auxiliary loss inside the layer's own outputs."
            )


def _check_sharing(module: nn.Module, layers: list[nn.Module]) -> None:
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if id(p) in seen and seen[id(p)] != i:
                raise ValueError(
                    f"a parameter is shared by streamed layers {seen[id(p)]} and {i}; megatrain streams each "
                    "layer's own weights. Pass layer_cls naming modules that do not share parameters."
                )
            seen[id(p)] = i
    layer_modules = {id(m) for layer in layers for m in layer.modules()}
    outside: set[int] = set()
    for m in module.modules():
        if id(m) not in layer_modules:
            outside.update(id(p) for p in m._parameters.values() if p is not None)
    if set(seen) & outside:
        raise ValueError(
            "a parameter of a streamed layer is also used outside the layer stack (tied weight); megatrain "
            "cannot stream it. Pass layer_cls naming modules that hold no tied weight."
        )


def split_outer(module: nn.Module, layers: list[nn.Module], entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Input side / output side of the non-layer parameters.

    The output side holds parameters of modules registered after the layer stack that do not
    contain it (a final norm, the head); everything else (embeddings, raw parameters of the modules
    around the stack, a head tied to the embedding) is the input side, which is bound when a step
    starts. The output side is bound when one of its modules is called or the last layer has run,
    whichever comes first; a parameter of it read directly before the layers would not be ready, so
    anything that could be used anywhere stays on the input side.
    """
    if not layers:
        return entries, []
    names = {id(m): n for n, m in module.named_modules()}
    order = {id(m): i for i, m in enumerate(module.modules())}
    layer_names = [names[id(layer)] for layer in layers if id(layer) in names]
    first = min(order[id(layer)] for layer in layers)

    def contains_layers(m: nn.Module) -> bool:
        name = names.get(id(m))
        return name is None or any(name == "" or ln.startswith(name + ".") for ln in layer_names)

    inputs, outputs = [], []
    for e in entries:
        after = all(order.get(id(m), -1) > first and not contains_layers(m) for m, _ in e.refs)
        (outputs if after else inputs).append(e)
    for side in (inputs, outputs):  # each side is a unit of its own: offsets from 0
        assign_offsets(side)
    return inputs, outputs


def build_units(
    module: nn.Module, layers: list[nn.Module], place: Any, layer_dtype: torch.dtype, pin: bool, grads: bool,
    materialize: Materializer | None = None,
) -> list[Unit]:
    """The module's units in forward order (outer_in, layer0..., outer_out), made by ``place``; each is
    filled as it is made (``materialize``: meta parameters and weights files), one at a time."""
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    inputs, outputs = split_outer(module, layers, collect_entries([("", module)], exclude=layer_ids, grads=grads))
    # Non-layer parameters in two units around the layer stack, each stepped in its place: the input
    # side first (the next forward needs it first), the output side last. They stream their fp32
    # masters (frozen ones as stored): embeddings, norms and head compute in fp32 as in plain mixed
    # precision, and they cross once per optimizer step, not per micro-batch.
    place.before_units()
    units = [place.make_unit("outer_in", 0, inputs, torch.float32, pin=pin, staging=True, materialize=materialize)]
    for i, layer in enumerate(layers):
        entries = collect_entries([("", layer)], exclude=set(), grads=grads)
        units.append(place.make_unit(f"layer{i}", i + 1, entries, layer_dtype, pin=pin, staging=False, module=layer, materialize=materialize))
    units.append(place.make_unit("outer_out", len(layers) + 1, outputs, torch.float32, pin=pin, staging=True, materialize=materialize))
    return units


def move_buffers(module: nn.Module, device: torch.device) -> None:
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)


GUARDED = ("parameters", "named_parameters", "state_dict", "load_state_dict", "zero_grad")


def guard(module: nn.Module, wait: Callable[[], None]) -> dict[str, Any]:
    """The root module's readers of parameters and gradients wait for the pending optimizer step
    (e.g. Lightning's zero_grad before validation, an EMA callback reading ``parameters()``)."""
    saved = {}
    for name in GUARDED:
        saved[name] = module.__dict__.get(name)
        method = getattr(module, name)

        def waiting(*args: Any, __m: Any = method, **kwargs: Any) -> Any:
            wait()
            return __m(*args, **kwargs)

        object.__setattr__(module, name, waiting)
    return saved


def unguard(module: nn.Module, saved: dict[str, Any]) -> None:
    for name, previous in saved.items():
        if previous is None:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, previous)
