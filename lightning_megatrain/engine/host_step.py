"""The host step: the user's optimizer run on the host worker, unit by unit in forward order.

``step`` returns at once. Each unit's update is one ticket on the worker; whoever needs a unit's
fresh weights (the next forward's prefetch, the non-layer binding) waits for its ticket only, and
whoever reads parameters, gradients or optimizer state waits for all host work (``wait``).
Hyperparameters are snapshotted when the step starts, so a scheduler that runs meanwhile changes
nothing in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from .config import Stats
from .stepper import Worker, check_optimizer, enable_fused, make_waiting, restore_class, snapshot_groups, split_params
from .stream import Streams
from .units import Unit


@dataclass
class _Prepared:
    """One optimizer step's snapshot: what every unit's update runs with, and which have started."""

    optimizer: Optimizer
    kwargs: dict[str, Any]
    hparams: list[dict[str, Any]]
    per_unit: list[list[list[torch.Tensor]]]
    state: Any
    started: set[int] = field(default_factory=set)


class HostStep:
    """Launches optimizer steps on the worker and answers who waits for what."""

    def __init__(self, units: list[Unit], place: Any, worker: Worker, streams: Streams, lean: Any, fused: bool, stats: Stats) -> None:
        self.units, self.place, self.worker, self.streams = units, place, worker, streams
        self.lean, self.fused, self.stats = lean, fused, stats
        self.owner = {id(e.param): u.index for u in units for e in u.entries}
        # Called with a unit's index before the optimizer updates it; an asynchronous checkpoint save
        # uses it to hold each layer's update until that layer's tensors are written.
        self.gate: Callable[[int], None] | None = None
        self.launching: list[Callable[[], None]] = []  # run when a step is launched, before its tasks
        self.updated: Callable[[Unit], None] = lambda unit: None  # on the worker, after a unit's update
        self.patched: list[Optimizer] = []
        self._early: _Prepared | None = None
        self.hook_handles: list[Any] = []

    def attach(self, optimizer: Optimizer, wait: Callable[[], None]) -> None:
        """Make the optimizer's readers wait for the pending step, and pick fused kernels."""
        check_optimizer(optimizer)
        if self.fused:
            enable_fused(optimizer)
        make_waiting(optimizer, wait)
        self.patched.append(optimizer)
        if self.lean is not None:
            self.lean.narrow(optimizer)
            # Optimizer.load_state_dict casts loaded state to the parameters' dtype: narrow it again
            self.hook_handles.append(optimizer.register_load_state_dict_post_hook(self.lean.narrow))

    def refresh_fused(self, optimizer: Optimizer) -> None:
        if self.fused:
            enable_fused(optimizer)

    def prepare(self, optimizer: Optimizer, kwargs: dict[str, Any]) -> None:
        """The coming step's snapshot, taken before the backward of its last micro-batch: from then on a
        unit whose gradients are final is updated as soon as they arrive (``early``), while backward goes on.

        Exact only where nothing reads or changes gradients or hyperparameters between this backward and
        the step (no clipping, no hook that reads gradients, automatic optimization): the glue decides.
        The updates run on the host worker in the order the gradients arrive, each one task with the
        arriving gradient added (``one_pass.py``), so the step itself has only the rest to launch.
        """
        self.worker.check()
        self._early = _Prepared(optimizer, dict(kwargs), *self._snapshot(optimizer))

    def early(self, unit: Unit) -> Callable[[torch.Tensor, list[bool]], None] | None:
        """The update that consumes ``unit``'s final gradients of a prepared step (on the host worker), or
        None: no step prepared, or already started for this unit."""
        prepared = self._early
        if prepared is None or unit.index in prepared.started or not any(prepared.per_unit[unit.index]):
            return None
        prepared.started.add(unit.index)
        self.stats.early_updates += 1
        return self._task(unit, prepared)

    def step(self, optimizer: Optimizer, kwargs: dict[str, Any]) -> None:
        """Launch the user's optimizer on the host, unit by unit in forward order, and return at once;
        units a prepared step already updated during backward are not launched again."""
        self.worker.check()  # a failed host task stops training here rather than after the next forward
        prepared, self._early = self._early, None
        if prepared is None or prepared.optimizer is not optimizer or prepared.kwargs != kwargs:
            if prepared is not None and prepared.started:
                raise RuntimeError(
                    "megatrain started this optimizer step during backward, but a different optimizer or step "
                    "arguments came: the glue must prepare the step it runs"
                )
            prepared = _Prepared(optimizer, dict(kwargs), *self._snapshot(optimizer))
        for fn in self.launching:
            fn()
        pending = self.streams.record_all()
        if pending:
            def sync_pending() -> None:
                for e in pending:
                    e.synchronize()

            self.worker.submit(sync_pending)
        for unit in self.units:
            if unit.index not in prepared.started:
                task = self._task(unit, prepared)
                unit.ticket = self.worker.submit(lambda task=task: task(None, None))
        self.place.after_step(self.worker)
        optimizer._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check that step ran

    def cancel(self) -> None:
        """Forget a prepared step whose updates have not started (its backward failed or sent nothing)."""
        if self._early is not None and not self._early.started:
            self._early = None

    def _snapshot(self, optimizer: Optimizer) -> tuple[list[dict[str, Any]], list[list[list[torch.Tensor]]], Any]:
        hparams = snapshot_groups(optimizer)  # a scheduler that runs meanwhile changes nothing in flight
        self.place.before_step()
        per_unit = self.place.step_params(split_params(optimizer, self.owner, len(self.units)))
        return hparams, per_unit, self.place.step_state(optimizer)

    def _task(self, unit: Unit, prepared: _Prepared) -> Callable[[torch.Tensor | None, list[bool] | None], None]:
        optimizer, kwargs, hparams, state = prepared.optimizer, prepared.kwargs, prepared.hparams, prepared.state
        params = prepared.per_unit[unit.index]
        gate, lean, stats, updated, place = self.gate, self.lean, self.stats, self.updated, self.place

        def task(arriving: torch.Tensor | None, produced: list[bool] | None) -> None:
            if gate is not None:
                gate(unit.index)
            start = time.perf_counter()
            # add the arriving gradient, step and write what the next forward streams, in one task (one_pass.py)
            if arriving is None:
                place.update(unit, optimizer, hparams, params, kwargs, state, lean)
            else:
                place.update(unit, optimizer, hparams, params, kwargs, state, lean, arriving, produced)
            stats.optimizer_s += time.perf_counter() - start
            updated(unit)

        return task

    def ticket_done(self, ticket: int) -> bool:
        return self.worker.done(ticket)

    def wait_ticket(self, ticket: int) -> None:
        start = time.perf_counter()
        self.worker.wait(ticket)
        self.stats.host_wait_s += time.perf_counter() - start

    def close(self) -> None:
        for optimizer in self.patched:
            restore_class(optimizer)
        self.patched = []
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []
