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
from typing import Any

import torch
from torch.optim import Optimizer

from .config import Stats
from .stepper import Worker, check_optimizer, enable_fused, make_waiting, restore_class, snapshot_groups, split_params
from .stream import Streams
from .units import Unit


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

    def step(self, optimizer: Optimizer, kwargs: dict[str, Any], arriving: dict[int, tuple[torch.Tensor, list[bool]]] | None = None) -> None:
        """Launch the user's optimizer on the host, unit by unit in forward order, and return at once.

        ``arriving``: unit index -> a micro-batch's packed gradients and which entries got one
        (``Unit.accumulate``'s arguments), not yet added: each such unit adds them in its update's one
        pass (exact where nothing reads the gradients between that micro-batch's backward and the step).
        """
        self.worker.check()  # a failed host task stops training here rather than after the next forward
        hparams = snapshot_groups(optimizer)
        per_unit = split_params(optimizer, self.owner, len(self.units))
        place = self.place
        place.before_step()
        per_unit = place.step_params(per_unit)
        state = place.step_state(optimizer)
        for fn in self.launching:
            fn()
        pending = self.streams.record_all()
        if pending:
            def sync_pending() -> None:
                for e in pending:
                    e.synchronize()

            self.worker.submit(sync_pending)
        gate, lean, stats, updated = self.gate, self.lean, self.stats, self.updated
        for unit, params in zip(self.units, per_unit):
            grads = (arriving or {}).get(unit.index, (None, None))

            def task(unit: Unit = unit, params: Any = params, grads: Any = grads) -> None:
                if gate is not None:
                    gate(unit.index)
                start = time.perf_counter()
                # step and write what the next forward streams, in one pass over the unit (one_pass.py)
                if grads[0] is None:
                    place.update(unit, optimizer, hparams, params, kwargs, state, lean)
                else:
                    place.update(unit, optimizer, hparams, params, kwargs, state, lean, *grads)
                stats.optimizer_s += time.perf_counter() - start
                updated(unit)

            unit.ticket = self.worker.submit(task)
        place.after_step(self.worker)
        optimizer._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check that step ran

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
