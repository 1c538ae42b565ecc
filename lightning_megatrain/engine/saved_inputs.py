"""The layers' saved inputs between forward and backward: kept on the device, or offloaded to host memory.

With ``offload_activations`` each layer's hidden-state input is copied to pinned host memory on the
D2H stream as forward goes, and fetched back on the H2D stream one layer ahead in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import Stats
from .host import HostArena
from .layer_fn import LayerCall
from .stream import Streams


@dataclass
class Offloaded:
    """One saved layer input kept in host memory between forward and backward."""

    host: torch.Tensor
    shape: torch.Size
    done: Any  # D2H finished
    device: torch.Tensor | None = None  # fetched back for backward
    ready: Any = None  # H2D finished


def size_class(nbytes: int) -> int:
    """The smallest m * 2**k >= nbytes with m in 4..7: few distinct sizes, at most 25% unused."""
    if nbytes <= 4:
        return max(nbytes, 1)
    k = max(nbytes.bit_length() - 3, 0)
    m = -(-nbytes // (1 << k))
    return m << k


class SavedInputs:
    """What each layer call keeps for its recompute, and the host buffers of offloaded inputs."""

    def __init__(self, streams: Streams, offload: bool, pin: bool, stats: Stats) -> None:
        self.streams, self.offload, self.pin, self.stats = streams, offload, pin, stats
        self.calls: list[LayerCall] = []  # this step's layer calls with offloaded inputs, in forward order
        self.used = 0  # host buffers handed out this step
        self.arenas: list[HostArena] = []  # host buffers for offloaded inputs, reused step to step

    def new_step(self) -> None:
        self.calls = []
        self.used = 0

    def save(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The inputs to keep for backward; with ``offload_activations`` the ones that need a gradient
        (the hidden states) are copied to host memory on the D2H stream instead."""
        if not self.offload:
            return list(tensors)
        kept: list[torch.Tensor | None] = []
        for i, t in enumerate(tensors):
            if t.requires_grad and t.is_floating_point() and t.numel():
                call.offloaded[i] = self._offload(t)
                kept.append(None)
            else:
                kept.append(t)
        if call.offloaded:
            call.seq = len(self.calls)
            self.calls.append(call)
        return kept

    def _host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next host buffer for an offloaded input, reused step to step.

        Each position in the step's order owns one arena of raw bytes, sized to a size class (at most
        25% above the request) and only ever grown, so steps whose sequence lengths vary reuse the same
        page-locked memory instead of unregistering and registering it again (a slow, synchronising call).
        """
        index = self.used
        self.used += 1
        nbytes = numel * dtype.itemsize
        arena = self.arenas[index] if index < len(self.arenas) else None
        if arena is None or arena.nbytes < nbytes:
            if arena is not None:
                arena.release()
            arena = HostArena([(size_class(nbytes), torch.uint8)], pin=self.pin)
            if index < len(self.arenas):
                self.arenas[index] = arena
            else:
                self.arenas.append(arena)
        return arena.buffers[0][:nbytes].view(dtype)

    def _offload(self, t: torch.Tensor) -> Offloaded:
        streams = self.streams
        host = self._host_buffer(t.numel(), t.dtype)
        produced = streams.event()
        produced.record(streams.compute())
        streams.wait(streams.d2h, produced)
        if streams.cuda:
            t.record_stream(streams.d2h)  # the copy reads it after the caller may have dropped it
        streams.copy(streams.d2h, host.view(t.shape), t.detach())
        done = streams.event()
        done.record(streams.d2h)
        self.stats.offload_bytes += t.numel() * t.element_size()
        return Offloaded(host=host, shape=t.shape, done=done)

    def _fetch(self, record: Offloaded) -> None:
        if record.device is not None:
            return
        streams = self.streams
        record.device = torch.empty(record.shape, dtype=record.host.dtype, device=streams.device)
        # the block may have just been freed by a kernel still queued on the compute stream: the copy
        # into it waits for the compute stream to get here
        allocated = streams.event()
        allocated.record(streams.compute())
        streams.wait(streams.h2d, allocated)
        streams.wait(streams.h2d, record.done)
        streams.copy(streams.h2d, record.device, record.host.view(record.shape))
        record.ready = streams.event()
        record.ready.record(streams.h2d)

    def restore(self, call: LayerCall, kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The layer's inputs for its recompute: offloaded ones come back from host memory (already
        on their way if the previous backward prefetched them), and the next layer's are started."""
        if not call.offloaded:
            return kept  # type: ignore[return-value]
        for record in call.offloaded.values():
            self._fetch(record)
        if call.seq > 0:
            for record in self.calls[call.seq - 1].offloaded.values():
                self._fetch(record)  # prefetch for the next backward
        out = list(kept)
        compute = self.streams.compute()
        for i, record in call.offloaded.items():
            self.streams.wait(compute, record.ready)
            out[i] = record.device
            record.device = None
        call.offloaded = {}
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for arena in self.arenas:
            arena.release()
        self.arenas = []
