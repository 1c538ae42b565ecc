"""One autograd node per streamed layer.

Forward runs the layer without a graph and saves only its inputs. Backward re-binds the layer's
weights, recomputes it with the RNG and autocast state the forward had, takes local gradients to
the inputs and weights, and hands the weight gradients to the layer streamer, which sends them home.
This file knows only the ``LayerRunner`` protocol it calls (``streamer.py`` implements it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from .units import Unit


class LayerRunner(Protocol):
    """What the autograd node asks of whoever streams the layers."""

    device: torch.device

    def run_forward(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> Any: ...

    def save_inputs(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]: ...

    def restore_inputs(self, call: LayerCall, kept: list[torch.Tensor | None]) -> list[torch.Tensor]: ...

    def run_backward(
        self, call: LayerCall, inputs: list[torch.Tensor], wrt: list[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]: ...

# Key-value caches would be appended to a second time by the recompute; training does not use them.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _is_cache(x: Any) -> bool:
    """A key-value cache object (transformers' ``Cache`` protocol), passed by keyword or by position."""
    return not isinstance(x, torch.Tensor) and callable(getattr(x, "update", None)) and (
        callable(getattr(x, "get_seq_length", None)) or any(c.__name__ == "Cache" for c in type(x).__mro__)
    )


def strip_caches(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    args = tuple(None if _is_cache(a) else a for a in args)
    out = {k: None if (k in _CACHE_KWARGS and v is not None) or _is_cache(v) else v for k, v in kwargs.items()}
    if out.get("use_cache"):
        out["use_cache"] = False
    return args, out


class LayerCall:
    """Everything one call of a layer needs to be replayed in backward."""

    def __init__(self, runner: LayerRunner, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> None:
        self.runner = runner
        self.unit = unit
        self.fn = fn
        flat, self.in_spec = tree_flatten((args, kwargs))
        self.in_leaves = flat
        self.tensor_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        self.out_spec: Any = None
        self.offloaded: dict[int, Any] = {}  # input position -> saved_inputs.Offloaded
        self.seq = -1  # position among this step's offloading calls
        self.out_leaves: list[Any] = []
        self.out_pos: list[int] = []
        device = runner.device
        self.device_type = device.type
        self.cpu_rng = torch.get_rng_state()
        self.dev_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = (
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
            torch.is_autocast_cache_enabled(),
        )

    def take_tensors(self) -> list[torch.Tensor]:
        """The call's tensor inputs, handed to the autograd node; the call itself stops holding them.

        The node saves what backward needs (``save_for_backward``, or a host copy with activation
        offload), so a reference here would only keep every layer's input alive on the device.
        """
        out = [self.in_leaves[i] for i in self.tensor_pos]
        for i in self.tensor_pos:
            self.in_leaves[i] = None
        return out

    def call(self, tensors: Sequence[torch.Tensor]) -> Any:
        flat = list(self.in_leaves)
        for i, t in zip(self.tensor_pos, tensors):
            flat[i] = t
        args, kwargs = tree_unflatten(flat, self.in_spec)
        return self.fn(*args, **kwargs)

    def split_output(self, out: Any) -> list[torch.Tensor]:
        flat, self.out_spec = tree_flatten(out)
        self.out_leaves = flat
        self.out_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        return [flat[i] for i in self.out_pos]

    def join_output(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        flat = list(self.out_leaves)
        for i, t in zip(self.out_pos, tensors):
            flat[i] = t
        self.out_leaves = []  # do not keep the forward's outputs alive
        return tree_unflatten(flat, self.out_spec)

    def replay_context(self) -> Any:
        """RNG and autocast as they were in forward; the caller's RNG is restored afterwards."""
        device = self.runner.device
        devices = [device] if self.dev_rng is not None else []
        enabled, dtype, cache = self.autocast

        class _Ctx:
            def __enter__(ctx_self) -> None:
                ctx_self.fork = torch.random.fork_rng(devices=devices, enabled=True)
                ctx_self.fork.__enter__()
                torch.set_rng_state(self.cpu_rng)
                if self.dev_rng is not None:
                    torch.cuda.set_rng_state(self.dev_rng, device)
                ctx_self.amp = torch.autocast(self.device_type, dtype=dtype, enabled=enabled, cache_enabled=cache)
                ctx_self.amp.__enter__()

            def __exit__(ctx_self, *exc: Any) -> None:
                ctx_self.amp.__exit__(*exc)
                ctx_self.fork.__exit__(*exc)

        return _Ctx()


class LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: LayerCall, anchor: torch.Tensor, *tensors: torch.Tensor) -> Any:  # type: ignore[override]
        ctx.call = call
        out = call.runner.run_forward(call, tensors)
        outs = call.split_output(out)
        kept = call.runner.save_inputs(call, tensors)  # None where the input went to host memory
        ctx.kept = [t is not None for t in kept]
        ctx.save_for_backward(*[t for t in kept if t is not None])
        ctx.mark_non_differentiable(*[o for o in outs if not (o.is_floating_point() or o.is_complex())])
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:  # type: ignore[override]
        call: LayerCall = ctx.call
        saved = iter(ctx.saved_tensors)
        inputs = call.runner.restore_inputs(call, [next(saved) if k else None for k in ctx.kept])
        needs = ctx.needs_input_grad[2:]
        detached = [t.detach().requires_grad_(n) if n else t.detach() for t, n in zip(inputs, needs)]
        grads = call.runner.run_backward(call, detached, [t for t, n in zip(detached, needs) if n], grad_outputs)
        it = iter(grads)
        ctx.call = None
        return (None, None, *[next(it) if n else None for n in needs])
