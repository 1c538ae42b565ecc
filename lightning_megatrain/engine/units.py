"""A unit is a group of parameters that live in one host arena: one streamed layer, or everything
outside the layers (embeddings, head, norms, raw parameters, tied weights), which is bound on the
device for the whole step.

Module parameters become views into the arena's fp32 master buffer, so ``parameters()``,
``state_dict()`` keys, optimizers and user code keep working on the same ``Parameter`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .host import HostArena, add_widened


@dataclass
class Entry:
    """One parameter: where it sits in the flat buffers and every (module, name) that holds it."""

    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    goffset: int | None  # None: frozen, no gradient space
    refs: list[tuple[nn.Module, str]] = field(default_factory=list)
    name: str = ""


def collect_entries(modules: list[tuple[str, nn.Module]], exclude: set[int], grads: bool = True) -> list[Entry]:
    """Parameters reachable from ``modules``, each once, in registration order; skip ids in ``exclude``."""
    entries: dict[int, Entry] = {}
    for prefix, root in modules:
        for mod_name, module in root.named_modules(prefix=prefix, remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is None or id(p) in exclude:
                    continue
                e = entries.get(id(p))
                if e is None:
                    e = entries[id(p)] = Entry(p, 0, p.numel(), p.shape, None, name=f"{mod_name}.{name}".lstrip("."))
                if (module, name) not in [(m, n) for m, n in e.refs]:
                    e.refs.append((module, name))
    offset = goffset = 0
    for e in entries.values():
        e.offset = offset
        offset += e.numel
        if e.param.requires_grad and grads:
            e.goffset = goffset
            goffset += e.numel
    return list(entries.values())


class Unit:
    """Host arena of one group: fp32 master, fp32 gradient, compute-dtype copy, gradient staging."""

    def __init__(
        self,
        name: str,
        index: int,
        entries: list[Entry],
        compute_dtype: torch.dtype,
        pin: bool,
        staging: bool,
        module: nn.Module | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.mutates_buffers = False
        self.index = index
        self.entries = entries
        self.numel = sum(e.numel for e in entries)
        self.gnumel = sum(e.numel for e in entries if e.goffset is not None)
        self.compute_dtype = compute_dtype
        self.ticket = 0  # worker ticket of the last host task that updates the masters
        separate = compute_dtype != torch.float32
        layout = [(self.numel, torch.float32), (self.gnumel, torch.float32)]
        if separate:
            layout.append((self.numel, compute_dtype))
        if staging:
            layout.append((self.gnumel, compute_dtype))
        self.arena = HostArena(layout, pin=pin)
        bufs = self.arena.buffers
        self.master, self.grad = bufs[0], bufs[1]
        self.compute = bufs[2] if separate else self.master
        self.staging = bufs[-1] if staging else None
        with torch.no_grad():
            for e in entries:
                view = self.master[e.offset : e.offset + e.numel].view(e.shape)
                view.copy_(e.param.data)
                e.param.data = view  # the old storage is freed here, one unit at a time
        self._synced = -1
        self.refresh_compute()

    def buffers(self) -> list[torch.Tensor]:
        return list(self.module.buffers()) if self.module is not None else []

    def buffer_versions(self) -> list[int]:
        return [b._version for b in self.buffers()]

    @property
    def trainable(self) -> bool:
        return self.gnumel > 0

    def _version(self) -> int:
        return self.master._version + sum(e.param._version for e in self.entries)

    def refresh_compute(self) -> None:
        """Re-cast the compute copy if the masters changed in place since the last cast."""
        version = self._version()
        if version == self._synced:
            return
        if self.compute is not self.master:
            self.compute.copy_(self.master)
        self._synced = self._version()

    def param_view(self, buf: torch.Tensor, e: Entry) -> torch.Tensor:
        return buf[e.offset : e.offset + e.numel].view(e.shape)

    def grad_view(self, e: Entry) -> torch.Tensor:
        assert e.goffset is not None
        return self.grad[e.goffset : e.goffset + e.numel].view(e.shape)

    def accumulate(self, src: torch.Tensor, produced: list[bool]) -> None:
        """Add packed gradients into the fp32 host ``.grad`` with autograd's semantics.

        A parameter whose ``.grad`` is None gets its arena view, filled with the new gradient; one that
        got no gradient keeps None (an optimizer then skips it, as in plain training).
        """
        trainable = [e for e in self.entries if e.goffset is not None]
        if all(produced):
            if all(e.param.grad is None for e in trainable):
                self.grad.copy_(src)
                for e in trainable:
                    e.param.grad = self.grad_view(e)
                return
            if all(e.param.grad is not None and e.param.grad.data_ptr() == self.grad_view(e).data_ptr() for e in trainable):
                add_widened(self.grad, src)
                return
        for e, ok in zip(trainable, produced):
            if not ok:
                continue
            g = src[e.goffset : e.goffset + e.numel].view(e.shape)
            if e.param.grad is None:
                view = self.grad_view(e)
                view.copy_(g)
                e.param.grad = view
            elif e.param.grad.is_contiguous():
                add_widened(e.param.grad, g)
            else:
                e.param.grad.add_(g)

    def bind(self, tensors: Sequence[torch.Tensor]) -> None:
        for e, t in zip(self.entries, tensors):
            for module, name in e.refs:
                module._parameters[name] = t  # type: ignore[assignment]

    def unbind(self) -> None:
        for e in self.entries:
            for module, name in e.refs:
                module._parameters[name] = e.param

    def detach(self) -> None:
        """Give every parameter (and gradient) back its own ordinary memory and free the arena."""
        with torch.no_grad():
            for e in self.entries:
                grad = e.param.grad
                e.param.data = e.param.data.clone()
                if grad is not None and e.goffset is not None and grad.data_ptr() == self.grad_view(e).data_ptr():
                    e.param.grad = grad.clone()
        self.master = self.grad = self.compute = self.staging = None  # type: ignore[assignment]
        self.arena.release()
