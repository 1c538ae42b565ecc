"""Materialising a module built on the meta device straight in its host arenas, one unit at a time:
each parameter from a weights source, or by its module's own initialisation (never a full-size copy).

A meta parameter holds no memory: a unit binds it to its view of the arena (``swap_tensors`` keeps the
``Parameter`` object, so optimizers built before keep working), then this fills the view. What fills a
parameter that no source gives, in this order: the PEFT tuner layer of an adapter
(``reset_lora_parameters``), the Hugging Face model around the module (``_init_weights``, as
``post_init`` would have run it), the module's own ``reset_parameters``. A parameter that none of them
can reach is refused before anything is allocated; one that an initialiser did not write (it is filled
with NaN first) is refused after, naming it. Meta buffers (e.g. rotary ``inv_freq``) are made the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

Fill = Callable[[torch.Tensor], None]  # writes a tensor's values into the (arena) tensor it is given
# A fill may also have ``into(out, cast) -> bool``: write ``out`` and the parameter's streamed copy
# ``cast`` (its compute dtype) from the same source read, True if it did (a weights file: ``weights.py``).
BufferKey = tuple[int, str]  # (id of the module, buffer name)

PEFT_INITS = (True, False, "gaussian")  # adapter inits that need nothing but the adapter itself


class MaterializeError(ValueError):
    """A meta parameter or buffer that nothing fills."""


def _is_hf(m: nn.Module) -> bool:
    # a transformers PreTrainedModel, found without importing transformers (PEFT's wrappers forward
    # attributes to the model inside: look at the class, not the instance)
    return callable(getattr(type(m), "_init_weights", None)) and hasattr(m, "config")


def bind_storage(param: torch.Tensor, view: torch.Tensor) -> None:
    """Make ``param`` live in ``view``; a meta parameter cannot take ``.data`` of another device, so it
    swaps its contents with a new ``Parameter`` on the view (same Python object, attributes kept)."""
    if not param.is_meta:
        param.data = view
        return
    fresh = nn.Parameter(view, requires_grad=param.requires_grad) if isinstance(param, nn.Parameter) else view
    fresh.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, fresh)


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in module.parameters()) or any(b.is_meta for b in module.buffers())


def _hf_then_own(hf: nn.Module, m: nn.Module, own: Any) -> None:
    """HF's ``_init_weights`` for ``m``; a module it does not know (left NaN) that has its own
    ``reset_parameters`` is initialised by that instead (a custom module inside an HF model)."""
    hf._init_weights(m)
    if callable(own) and any(p.is_floating_point() and not p.is_meta and bool(torch.isnan(p).any()) for p in m._parameters.values() if p is not None):
        own()


class Materializer:
    """What fills each parameter and buffer of one module when its arena is made.

    ``sources``: ``id(param) -> fill`` (a weights file's tensors; applied whether or not the parameter is
    meta); ``buffer_sources``: ``(id(module), name) -> fill``. Everything else that is on the meta device
    is initialised by its module."""

    def __init__(
        self,
        module: nn.Module,
        sources: Mapping[int, Fill] | None = None,
        buffer_sources: Mapping[BufferKey, Fill] | None = None,
    ) -> None:
        self.module = module
        self.sources = dict(sources or {})
        self.buffer_sources = dict(buffer_sources or {})
        self._hf: dict[int, nn.Module | None] = {}
        self._adapter: dict[int, tuple[nn.Module, str | None, Any]] = {}  # module id -> (tuner layer, adapter, init)
        self._walk(module, None, None)
        self._meta = {id(p) for p in module.parameters() if p.is_meta}
        self._names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        self._done: set[int] = set()  # modules already initialised

    def _walk(self, m: nn.Module, hf: nn.Module | None, peft_config: Any) -> None:
        hf = m if _is_hf(m) else hf
        configs = m.__dict__.get("peft_config")
        peft_config = configs if isinstance(configs, dict) else peft_config
        self._hf[id(m)] = hf
        for attr in getattr(m, "adapter_layer_names", ()) or ():
            holder = m._modules.get(attr) if isinstance(m._modules.get(attr), nn.Module) else None
            if holder is None:
                continue
            self._adapter[id(holder)] = (m, None, peft_config)  # a ParameterDict: the adapter is the key
            for adapter, sub in holder.named_children():
                for inner in sub.modules():
                    self._adapter[id(inner)] = (m, adapter, peft_config)
        for child in m.children():
            self._walk(child, hf, peft_config)

    # ----------------------------------------------------------------- what fills what
    def fills(self, param: torch.Tensor) -> bool:
        """Whether the unit must not copy the parameter's own values (a source or an initialiser writes it)."""
        return id(param) in self.sources or id(param) in self._meta

    def _initialiser(self, m: nn.Module, name: str) -> Callable[[], None] | None:
        adapter = self._adapter.get(id(m))
        if adapter is not None and callable(getattr(adapter[0], "reset_lora_parameters", None)):
            layer, key, configs = adapter
            key = key if key is not None else name
            config = (configs or {}).get(key)
            init = getattr(config, "init_lora_weights", True)
            if init not in PEFT_INITS:
                return None
            return lambda: layer.reset_lora_parameters(key, init)
        hf = self._hf.get(id(m))
        own = getattr(m, "reset_parameters", None)
        if hf is not None:
            return lambda: _hf_then_own(hf, m, own)
        return own if callable(own) else None

    def _owners(self) -> Iterable[tuple[str, nn.Module, str, torch.Tensor, bool]]:
        for mod_name, m in self.module.named_modules(remove_duplicate=False):
            for name, p in m._parameters.items():
                if p is not None:
                    yield mod_name, m, name, p, True
            for name, b in m._buffers.items():
                if b is not None:
                    yield mod_name, m, name, b, False

    def check(self) -> None:
        """Before anything is allocated: refuse meta parameters and buffers that nothing can fill."""
        orphans = []
        for mod_name, m, name, t, is_param in self._owners():
            if not t.is_meta:
                continue
            if (id(t) in self.sources) if is_param else ((id(m), name) in self.buffer_sources):
                continue
            if self._initialiser(m, name) is None:
                orphans.append(f"{mod_name}.{name}".lstrip(".") + f" ({type(m).__name__})")
        if orphans:
            raise MaterializeError(
                f"{len(orphans)} tensor(s) of {type(self.module).__name__} are on the meta device and nothing can "
                f"initialise them: {', '.join(orphans[:8])}{' ...' if len(orphans) > 8 else ''}. Give them values from "
                "files (MegaTrainStrategy(weights=...)), or give their module a reset_parameters() (or build them off "
                "the meta device)."
            )

    # ----------------------------------------------------------------- filling one unit
    def fill(
        self, entries: list[Any], store_view: Callable[[Any], torch.Tensor],
        cast_view: Callable[[Any], torch.Tensor | None] = lambda e: None,
    ) -> set[int]:
        """Fill one unit's parameters, already bound to their arena views: initialisers first (a module's
        initialiser may write a parameter a source then overwrites), then the sources. A source that can
        also writes the parameter's streamed copy (``cast_view``) in the same pass; returns the ids of
        the entries whose copy it wrote (the unit need not cast those from the masters again)."""
        cast: set[int] = set()
        todo = [e for e in entries if id(e.param) in self._meta and id(e.param) not in self.sources]
        with torch.no_grad():
            for e in todo:
                if e.param.is_floating_point():
                    e.param.fill_(float("nan"))
            for e in todo:
                for m, name in e.refs:
                    if id(m) in self._done:
                        continue
                    self._done.add(id(m))
                    init = self._initialiser(m, name)
                    if init is None:
                        raise MaterializeError(f"nothing initialises {e.name!r} ({type(m).__name__})")
                    init()
                    self._keep_bound(m, entries, store_view)
            for e in entries:
                source = self.sources.get(id(e.param))
                if source is None:
                    continue
                copy, into = cast_view(e), getattr(source, "into", None)
                if copy is not None and into is not None and into(store_view(e), copy):
                    cast.add(id(e))
                else:
                    source(store_view(e))
        unset = [e.name for e in todo if e.param.is_floating_point() and bool(torch.isnan(e.param).any())]
        if unset:
            raise MaterializeError(
                f"{len(unset)} parameter(s) built on the meta device were not initialised by their module's "
                f"initialiser: {', '.join(unset[:8])}{' ...' if len(unset) > 8 else ''} (values left unset). Give "
                "them values from files (MegaTrainStrategy(weights=...)) or initialise them in reset_parameters()."
            )
        return cast

    @staticmethod
    def _keep_bound(m: nn.Module, entries: list[Any], store_view: Callable[[Any], torch.Tensor]) -> None:
        """An initialiser that assigned a new Parameter: its values go into the arena, the old one stays."""
        for e in entries:
            for module, name in e.refs:
                if module is m and m._parameters.get(name) is not e.param:
                    store_view(e).copy_(m._parameters[name].detach())
                    m._parameters[name] = e.param

    # ----------------------------------------------------------------- buffers
    def buffers(self, device: torch.device | str = "cpu") -> None:
        """Make every meta buffer real on ``device``: from its source, else by its module's initialiser
        (run with the module's parameters saved and put back: they may already hold loaded values)."""
        made: dict[int, torch.Tensor] = {}
        pending: dict[int, tuple[str, nn.Module, list[str]]] = {}
        with torch.no_grad():
            for mod_name, m, name, b, is_param in list(self._owners()):
                if is_param or not b.is_meta:
                    continue
                if id(b) in made:  # one buffer registered in several modules stays one
                    m._buffers[name] = made[id(b)]
                    continue
                real = torch.empty_like(b, device=device)
                real.fill_(float("nan") if real.is_floating_point() else 0)
                made[id(b)] = m._buffers[name] = real
                source = self.buffer_sources.get((id(m), name))
                if source is not None:
                    source(real)
                else:
                    pending.setdefault(id(m), (mod_name, m, []))[2].append(name)
            for mod_name, m, names in pending.values():
                init = self._initialiser(m, names[0])
                if init is None:
                    raise MaterializeError(f"nothing initialises buffer {mod_name}.{names[0]} ({type(m).__name__})")
                saved = {n: p.detach().clone() for n, p in m._parameters.items() if p is not None}
                kept = dict(m._parameters)
                init()
                for n, p in kept.items():
                    m._parameters[n] = p
                    if n in saved:
                        p.copy_(saved[n])
                unset = [n for n in names if m._buffers[n].is_floating_point() and bool(torch.isnan(m._buffers[n]).any())]
                if unset:
                    raise MaterializeError(
                        f"buffer(s) {', '.join(f'{mod_name}.{n}'.lstrip('.') for n in unset)} ({type(m).__name__}) were "
                        "built on the meta device and not set by the module's initialiser"
                    )
