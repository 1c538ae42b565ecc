"""The parameters outside the layer stack: bound on the device for a step, their gradients flushed home.

Embeddings, the final norm, the head and raw parameters live in two units around the layer stack:
the input side (stepped first, needed first) and the output side (bound when one of its modules is
called or the last layer has run). Each keeps one device copy of its image, issued by the host
worker right after the unit's update, and reused across the micro-batches of an optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Stats
from .grad_link import GradLink
from .stream import Streams
from .units import Entry, Unit


@dataclass
class OuterCopy:
    """The device side of one non-layer unit: a copy of its image (fp32 masters, frozen parameters as
    stored) made on the H2D stream, issued by the host worker right after the unit's update so it is on
    its way before the next step needs it. The leaves view it: embeddings, norms and head compute in
    fp32 as in plain mixed-precision training. The copy is kept across micro-batches until the masters
    change."""

    unit: Unit
    side: str  # "input" (embeddings: stepped first, needed first) or "output" (final norm, head)
    dev: torch.Tensor | None = None  # the image on the device (bytes); the leaves view it
    shard: torch.Tensor | None = None  # data parallel: this rank's part of the image, gathered into dev
    ready: Any = None  # H2D into dev done
    free: Any = None  # the compute stream is done reading dev
    issued: int | None = None  # unit version the last copy was issued from
    leaves: list[nn.Parameter] | None = None  # bound leaves, valid while ``issued`` matches the unit
    bindings: list[list[nn.Parameter]] = field(default_factory=list)  # leaves bound this step
    fired: set[int] = field(default_factory=set)  # leaves whose gradient is final in this backward
    flushed: bool = False  # gradients were sent home since the last bind (the step's backward ran)


def check_trainable(unit: Unit, grads: bool) -> None:
    """Which parameters train is fixed when the host memory is laid out."""
    if not grads:
        return
    for e in unit.entries:
        if e.param.requires_grad != (e.goffset is not None):
            raise RuntimeError(
                f"parameter {e.name!r} changed requires_grad after megatrain set up its host memory. Freeze or "
                "unfreeze parameters before trainer.fit (e.g. in configure_model or __init__)."
            )


def _retired(grad: torch.Tensor) -> None:
    raise RuntimeError(
        "megatrain: a backward reached parameters from before an optimizer step of the same training_step: "
        "its graph was built before opt.step() changed the weights (plain PyTorch refuses this too: a variable "
        "needed for gradient computation was modified in place). Call manual_backward before opt.step(), or "
        "build the graph again after it."
    )


class OuterParams:
    """The two non-layer units' device copies, their binding into the module for a step, and the flush
    of their gradients (early for the output side, in ``after_backward`` for the rest)."""

    def __init__(
        self, module: nn.Module, outer_in: Unit, outer_out: Unit, has_layers: bool, place: Any, streams: Streams,
        link: GradLink, wait_ticket: Callable[[int], None], stats: Stats, grads: bool,
    ) -> None:
        self.outer_in, self.outer_out = outer_in, outer_out
        self.has_layers = has_layers
        self.place, self.streams, self.link = place, streams, link
        self.wait_ticket, self.stats, self.grads = wait_ticket, stats, grads
        self.copies = {outer_in.index: self._copy(outer_in, "input"), outer_out.index: self._copy(outer_out, "output")}
        self.depth = 0  # bound() nesting
        self.stale = False  # the host parameters were put back inside a step (manual optimization)
        self.out_pending = False  # the output side is bound lazily, when first needed in a step
        owners = {id(m): m for e in outer_in.entries for m, _ in e.refs}
        owners[id(module)] = module
        self.out_owners = {id(m): m for e in outer_out.entries for m, _ in e.refs}
        owners.update(self.out_owners)
        self.hooks = [m.register_forward_pre_hook(self._before_module) for m in owners.values()]

    def _copy(self, unit: Unit, side: str) -> OuterCopy:
        out = OuterCopy(unit, side, ready=self.streams.event(), free=self.streams.event())
        if unit.numel:
            out.dev, out.shard = self.place.outer_buffers(unit)
        return out

    # ----------------------------------------------------------------- one step
    @contextlib.contextmanager
    def bound(self, start: Callable[[], None]) -> Iterator[None]:
        """Bind the non-layer parameters on the device for one step (re-entrant); ``start`` runs when
        the outermost binding begins."""
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        for outer in self.copies.values():
            outer.bindings = []
            outer.fired = set()
        start()
        self.depth = 1
        try:
            self.rebind()
            yield
        finally:
            self.depth = 0
            self.stale = False
            self.unbind()

    def rebind(self) -> None:
        """Device copies of the input-side parameters, waiting only for their own update; the output
        side follows when first needed (its update is the last of the optimizer step)."""
        self.stale = False
        self._bind(self.copies[self.outer_in.index])
        self.out_pending = True
        if not self.has_layers:
            self.bind_output_if_pending()

    def bind_output_if_pending(self) -> None:
        if self.depth and self.out_pending:
            self.out_pending = False
            self._bind(self.copies[self.outer_out.index])

    def unbind(self) -> None:
        self.out_pending = False
        self.outer_in.unbind()
        self.outer_out.unbind()

    def put_back(self) -> None:
        """After a backward or an optimizer step inside a step: the host parameters go back into the
        module (clipping and hooks see them with their gradients); the next module call binds again."""
        if self.depth:
            self.unbind()
            self.stale = True

    def _before_module(self, module: nn.Module, args: Any) -> None:
        if self.depth and self.stale:
            self.rebind()
        if id(module) in self.out_owners:
            self.bind_output_if_pending()

    def issue(self, outer: OuterCopy) -> None:
        """Copy the unit's image into ``dev`` on the H2D stream (any thread)."""
        unit = outer.unit
        unit.refresh_compute()
        streams = self.streams
        streams.wait(streams.h2d, outer.free)
        self.place.copy_outer(outer.dev, outer.shard, unit)
        outer.ready.record(streams.h2d)
        outer.issued = unit._version()
        self.stats.h2d_bytes += outer.dev.numel()

    def _bind(self, outer: OuterCopy) -> None:
        unit = outer.unit
        self.wait_ticket(unit.ticket)
        check_trainable(unit, self.grads)
        outer.flushed = False
        if not unit.entries:
            return
        changed = outer.issued != unit._version()  # not prefetched (CPU, first step) or changed since
        if outer.leaves is None or changed:
            if changed:
                outer.free.record(self.streams.compute())
                self.issue(outer)
            outer.leaves = [self._leaf(outer, e) for e in unit.entries]
        # also when the leaves are reused: the host worker may have copied the updated values into the
        # same device buffer since (after an optimizer step), and the kernels must wait for that copy
        compute = self.streams.compute()
        self.streams.wait(compute, outer.ready)
        outer.free.record(compute)
        unit.bind(outer.leaves)
        if not outer.bindings or outer.bindings[-1] is not outer.leaves:
            outer.bindings.append(outer.leaves)

    def _leaf(self, outer: OuterCopy, e: Entry) -> nn.Parameter:
        leaf = nn.Parameter(outer.unit.param_view(outer.dev, e), requires_grad=e.goffset is not None)
        if outer.side == "output" and e.goffset is not None:
            # the output side's gradients are final early in backward: send them home then
            leaf.register_post_accumulate_grad_hook(lambda t, outer=outer: self._grad_final(outer, t))
        return leaf

    def _grad_final(self, outer: OuterCopy, leaf: torch.Tensor) -> None:
        if len(outer.bindings) != 1 or outer.leaves is not outer.bindings[0]:
            return  # several bindings in this step (manual optimization): after_backward sums them
        if not self.place.send_early:
            return  # data parallel: every rank sends in after_backward, in the same order
        outer.fired.add(id(leaf))
        trainable = [leaf for leaf, e in zip(outer.leaves, outer.unit.entries) if e.goffset is not None]
        if all(id(t) in outer.fired for t in trainable):
            outer.fired = set()
            self.flush(outer)

    # ----------------------------------------------------------------- gradients and updates
    def flush_all(self) -> None:
        for outer in self.copies.values():
            outer.fired = set()
            self.flush(outer)

    def flush(self, outer: OuterCopy) -> None:
        """Pack the unit's device gradients (summed over this step's bindings) and send them on the D2H stream."""
        unit = outer.unit
        trainable = [e for e in unit.entries if e.goffset is not None]
        produced = [False] * len(trainable)
        packed: torch.Tensor | None = None
        for leaves in outer.bindings:
            by_entry = {id(e): leaf for e, leaf in zip(unit.entries, leaves)}
            for i, e in enumerate(trainable):
                leaf = by_entry[id(e)]
                if leaf.grad is None:
                    continue
                if packed is None:
                    packed = torch.zeros(unit.gnumel, dtype=torch.float32, device=self.link.device)
                packed[e.goffset : e.goffset + e.numel].add_(leaf.grad.reshape(-1))
                leaf.grad = None
                produced[i] = True
        out = self.place.pack_outer(unit, trainable, packed)
        if out is not None:
            dev, host = out
            self.link.send(unit, dev, host, produced, release=None)
        outer.flushed = True

    def masters_changing(self) -> None:
        """An optimizer step was launched: the worker copies the masters again after their update."""
        for outer in self.copies.values():
            outer.issued = None
            if self.depth and outer.bindings and outer.dev is not None:
                # a step inside training_step (manual optimization). Before any backward (a loss over
                # forwards on both sides of the step), the graph reads the current device copy: the next
                # one goes to a fresh buffer. After a backward, the copy is reused, so k rounds of
                # forward, backward and step in one training_step hold one copy, not k + 1: the next copy
                # into it waits for the kernels queued so far (``free``, waited for in ``issue``), and a
                # graph built before the step whose backward comes after it, which plain PyTorch refuses
                # too (the step changed its weights in place), is refused at its first gradient here
                if outer.flushed:
                    outer.free.record(self.streams.compute())
                    for leaves in outer.bindings:
                        for leaf in leaves:
                            if leaf.requires_grad:
                                leaf.register_hook(_retired)
                    outer.bindings = []
                else:
                    outer.dev = torch.empty_like(outer.dev)
                outer.leaves = None

    def updated(self, unit: Unit) -> None:
        """On the host worker, right after ``unit``'s update: a non-layer unit's copy is issued now, on
        its way to the device while the host steps the following units."""
        outer = self.copies.get(unit.index)
        if outer is not None and self.streams.cuda and self.place.prefetch_from_worker:
            with torch.cuda.device(self.link.device):
                self.issue(outer)

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        self.copies = {}
