"""GPU slots, streams and events; on the CPU the same bookkeeping runs with synchronous copies.

A slot is a device buffer that holds one layer's compute-dtype weights. ``ready`` is recorded on the
H2D stream after the copy into it; ``free`` on the compute stream after the last kernel reading it.
A copy into a slot waits (on the GPU) for ``free``; a kernel reading it waits for ``ready``. No
host-device synchronisation happens here.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from typing import Any

import torch


class _NoEvent:
    """Stand-in for ``torch.cuda.Event`` on the CPU, where every copy is already complete."""

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class Streams:
    """The H2D and D2H streams of one device, created once; compute runs on the caller's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None

    def event(self) -> Any:
        return torch.cuda.Event() if self.cuda else _NoEvent()

    def on(self, stream: Any) -> Any:
        """Make ``stream`` current (collectives queue after, and make it wait for, what it holds)."""
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def compute(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def wait(self, stream: Any, event: Any) -> None:
        if self.cuda:
            stream.wait_event(event)

    def copy(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue ``dst.copy_(src)`` on ``stream`` (on the CPU: copy now)."""
        if self.cuda:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)

    def synchronize(self) -> None:
        """Wait for all work on the device (before freeing memory that queued copies may still use).
        An error the device reports here (a failed kernel) is not raised: teardown must go on."""
        if self.cuda:
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass

    def record_all(self) -> list[Any]:
        """Events after everything enqueued so far on the H2D and compute streams."""
        if not self.cuda:
            return []
        events = [torch.cuda.Event(), torch.cuda.Event()]
        events[0].record(self.h2d)
        events[1].record(self.compute())
        return events


class Slot:
    def __init__(self, buf: torch.Tensor, streams: Streams) -> None:
        self.buf = buf
        self.unit: Any = None
        self.version: Any = None  # the unit's weight version the slot holds (``Unit._version``)
        self.ready = streams.event()
        self.free = streams.event()
        self.last_use = 0
        self.shard: torch.Tensor | None = None  # data parallel: this rank's bytes, gathered into ``buf``


class SlotPool:
    """``n`` device buffers reused round the layers; a layer already resident is not copied again."""

    def __init__(self, n: int, numel: int, dtype: torch.dtype, streams: Streams) -> None:
        self.streams = streams
        self.slots = [Slot(torch.empty(numel, dtype=dtype, device=streams.device), streams) for _ in range(n)]
        self._clock = 0
        self.loads = 0  # H2D copies issued, for tests and telemetry
        self.bytes_h2d = 0
        self._bytes_reported = 0
        self._stalls: list[tuple[Any, Any]] = []
        self.time_stalls = False  # set by telemetry: timing events cost a little and must be collected

    def invalidate(self, which: Callable[[Any], bool] | None = None) -> None:
        """Forget residency (of the units ``which`` selects; default all), e.g. when an optimizer step
        is about to change their masters."""
        for slot in self.slots:
            if slot.unit is not None and (which is None or which(slot.unit)):
                slot.unit = None

    def find(self, unit: Any) -> Slot | None:
        for slot in self.slots:
            if slot.unit is unit:
                return slot
        return None

    def load(self, unit: Any, src: torch.Tensor, keep: tuple[Slot, ...] = (), fill: Callable[[Slot], int] | None = None) -> Slot:
        """Make ``unit`` resident (copying ``src`` if it is not) without evicting the slots in ``keep``.
        ``fill(slot)`` replaces the copy (data parallel: copy a shard and all-gather), returning the bytes
        it moved over the host link."""
        slot = self.find(unit)
        if slot is None:
            candidates = [s for s in self.slots if s not in keep]
            slot = min(candidates, key=lambda s: s.last_use)
            slot.unit = None
            h2d = self.streams.h2d
            self.streams.wait(h2d, slot.free)
            if fill is not None:
                moved = fill(slot)
            else:
                self.streams.copy(h2d, slot.buf[: src.numel()], src)
                moved = src.numel() * src.element_size()
            slot.ready.record(h2d)
            slot.unit = unit
            self.loads += 1
            self.bytes_h2d += moved
        self._clock += 1
        slot.last_use = self._clock
        return slot

    def begin_use(self, slot: Slot) -> None:
        compute = self.streams.compute()
        if self.streams.cuda and self.time_stalls:
            # a pair of timing events around the wait measures how long the GPU stalled on the copy
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(slot.ready)
            after.record(compute)
            self._stalls.append((before, after))
        else:
            self.streams.wait(compute, slot.ready)

    def collect_stall(self) -> float:
        """Seconds the compute stream waited for weight copies, over the completed waits (no sync)."""
        total, pending = 0.0, []
        for before, after in self._stalls:
            if after.query():
                total += before.elapsed_time(after) / 1000
            else:
                pending.append((before, after))
        self._stalls = pending
        return total

    def take_bytes(self) -> int:
        new = self.bytes_h2d - self._bytes_reported
        self._bytes_reported = self.bytes_h2d
        return new

    def end_use(self, slot: Slot) -> None:
        slot.free.record(self.streams.compute())


class GradChannel:
    """A device buffer to pack one layer's gradients into and the pinned host buffer it is copied to."""

    def __init__(self, dev: torch.Tensor, host: torch.Tensor, streams: Streams) -> None:
        self.dev = dev
        self.host = host
        self.packed = streams.event()
        self.done = streams.event()
        self.rs: torch.Tensor | None = None  # data parallel: this rank's reduce-scattered gradients


class ChannelPool:
    """Channels go back to the pool only after the host has consumed them, so reuse needs no GPU wait."""

    def __init__(self, channels: list[GradChannel]) -> None:
        self._free: queue.Queue[GradChannel] = queue.Queue()
        for ch in channels:
            self._free.put(ch)

    def get(self, check: Callable[[], None] | None = None, poll_s: float = 0.05) -> GradChannel:
        """A free channel; while none is free, ``check()`` runs every ``poll_s`` seconds so that a failed
        host worker (which raises there) cannot leave the caller blocked forever."""
        if check is None:
            return self._free.get()
        while True:
            check()
            try:
                return self._free.get(timeout=poll_s)
            except queue.Empty:
                continue

    def put(self, ch: GradChannel) -> None:
        self._free.put(ch)
