"""One device: every unit is held, copied to the device, given its gradients and stepped whole.

The single-device side of the placement the engine's parts call where data parallel differs
(``sharded.py`` is the other side, with the same methods); nothing here waits on other processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .config import Stats
from .materialize import Materializer
from .one_pass import update_unit
from .stream import GradChannel, Slot, Streams
from .units import Entry, Unit


class Whole:
    """This process holds every unit whole."""

    coll = None
    send_early = True  # a non-layer unit's gradients go home as soon as all of them are final
    prefetch_from_worker = True  # the host worker issues the non-layer copies right after their update
    waits_after_backward = False  # the host step is queued behind the gradients: only readers wait
    keeps_residency = True  # a layer still in a slot after backward is used again while its weights are unchanged
    steps_early = True  # a layer is updated as soon as its gradients are final (``HostStep.prepare``)

    def __init__(self, streams: Streams, device: torch.device, stats: Stats) -> None:
        self.streams, self.device, self.stats = streams, device, stats

    # ----------------------------------------------------------------- setup
    def host_threads(self, cores: int) -> int:
        return cores - 1

    def plans_checked(self) -> None:
        """Every process has checked its memory plan (one device: nothing to wait for)."""

    def make_unit(
        self, name: str, index: int, entries: list[Entry], dtype: torch.dtype, pin: bool, staging: bool,
        module: nn.Module | None = None, materialize: Materializer | None = None,
    ) -> Unit:
        return Unit(name, index, entries, dtype, pin=pin, staging=staging, module=module, materialize=materialize)

    def before_units(self) -> None:
        pass

    def after_units(self, units: list[Unit], outer: Sequence[Unit], pin: bool) -> None:
        pass

    def slot_geometry(self, layer_units: Sequence[Unit]) -> tuple[int, int, int]:
        """Bytes of one weight slot, gradient elements of a device channel and of its host buffer."""
        gnumel = max((u.gnumel for u in layer_units), default=0)
        return max((u.nbytes for u in layer_units), default=0), gnumel, gnumel

    def fit_slot(self, slot: Slot) -> None:
        pass

    def fit_channel(self, channel: GradChannel, host_gnumel: int) -> None:
        pass

    def outer_buffers(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device), None

    # ----------------------------------------------------------------- weights in
    def slot_fill(self, unit: Unit) -> Callable[[Slot], int] | None:
        return None  # the slot pool copies the unit's image

    def copy_outer(self, dev: torch.Tensor, shard: torch.Tensor | None, unit: Unit) -> None:
        self.streams.copy(self.streams.h2d, dev, unit.compute)

    # ----------------------------------------------------------------- gradients out
    def pack_layer(self, unit: Unit, trainable: list[Entry], grads: Sequence[torch.Tensor | None], channel: GradChannel) -> tuple[torch.Tensor, list[bool]]:
        """The layer's weight gradients packed into the channel's device buffer."""
        produced = []
        for e, g in zip(trainable, grads):
            dst = channel.dev[e.goffset : e.goffset + e.numel]
            if g is None:
                dst.zero_()
                produced.append(False)
            else:
                dst.copy_(g.reshape(-1))
                produced.append(True)
        return channel.dev[: unit.gnumel], produced

    def pack_outer(self, unit: Unit, trainable: list[Entry], packed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A non-layer unit's summed gradients and the host buffer they go to; None: nothing to send."""
        if packed is None:
            return None
        if unit.staging.dtype != packed.dtype:
            packed = packed.to(unit.staging.dtype)  # on the device: the D2H is a plain copy
        return packed, unit.staging

    def reduce(self, unit: Unit, dev: torch.Tensor, release: GradChannel | None) -> torch.Tensor:
        return dev

    def consume(self, unit: Unit, host: torch.Tensor, numel: int, produced: list[bool], done: Any) -> None:
        """On the host worker: wait for the gradients' copy, then add them into the fp32 ``.grad``."""
        done.synchronize()
        start = time.perf_counter()
        unit.accumulate(host[: unit.gnumel], produced)
        self.stats.accumulate_s += time.perf_counter() - start

    def after_backward(self) -> None:
        pass

    # ----------------------------------------------------------------- the optimizer step
    def wait(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def step_params(self, per_unit: list[list[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
        return per_unit

    def step_state(self, optimizer: Optimizer) -> Any:
        return None

    def update(
        self, unit: Unit, optimizer: Optimizer, hparams: list[dict[str, Any]], params: list[list[torch.Tensor]], kwargs: dict[str, Any],
        state: Any, lean: Any, arriving: torch.Tensor | None = None, produced: Sequence[bool] | None = None,
    ) -> None:
        """Update one unit on the host worker: its arriving gradient (if any) added, the user's optimizer
        run and the streamed copy written, in one pass over memory (``one_pass.py``)."""
        update_unit(unit, optimizer, hparams, params, kwargs, lean, arriving, produced)

    def after_step(self, worker: Any) -> None:
        pass

    def owned(self, param: torch.Tensor) -> tuple[int, int]:
        return (0, param.numel())

    # ----------------------------------------------------------------- teardown
    def detach(self, units_live: bool) -> None:
        pass

    def release(self) -> None:
        pass
