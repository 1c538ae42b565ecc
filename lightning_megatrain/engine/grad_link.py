"""Gradients home: device gradient buffers copied to pinned host buffers, then added into the fp32 ``.grad``.

A layer's backward packs its weight gradients into a free channel (one device buffer and its pinned
host twin); the copy runs on the D2H stream and the host worker adds the gradients once it is done.
A channel goes back to the pool only after the host has consumed it, so reusing one needs no device
wait, and backward waits for the host only when every channel is still in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import Stats
from .host import HostArena
from .stepper import Worker
from .stream import ChannelPool, GradChannel, Streams
from .units import Unit


class GradLink:
    """The gradient channels and the send of one unit's packed gradients."""

    def __init__(self, place: Any, streams: Streams, worker: Worker, stats: Stats, dtype: torch.dtype) -> None:
        self.place, self.streams, self.worker, self.stats, self.dtype = place, streams, worker, stats, dtype
        self.device = streams.device
        self.arena: HostArena | None = None
        self.channels = ChannelPool([])
        # a unit's own host buffer (non-layer units: ``Unit.staging``) -> the task that last reads it:
        # training does not wait for the host after backward, so the next micro-batch's copy into the
        # same buffer waits for that task first (channels need not: they come back only once consumed)
        self._readers: dict[int, int] = {}

    def make_channels(self, layer_units: Sequence[Unit], count: int, pin: bool) -> None:
        """``count`` channels, each the largest layer's gradients in the compute dtype."""
        _, gnumel, host_gnumel = self.place.slot_geometry(layer_units)
        channels = []
        if gnumel:
            self.arena = HostArena([(host_gnumel, self.dtype)] * count, pin=pin)
            for host in self.arena.buffers:
                channel = GradChannel(torch.empty(gnumel, dtype=self.dtype, device=self.device), host, self.streams)
                self.place.fit_channel(channel, host_gnumel)
                channels.append(channel)
        self.channels = ChannelPool(channels)

    def take(self) -> GradChannel:
        # a failed host task raises here (WorkerError) instead of leaving backward blocked on a channel
        return self.channels.get(check=self.worker.check)

    def send(self, unit: Unit, dev: torch.Tensor, host: torch.Tensor, produced: list[bool], release: GradChannel | None) -> None:
        """Copy ``dev`` into ``host`` on the D2H stream once the compute stream has produced it, and
        have the host worker add it into the unit's gradients; ``release`` is the channel to give back."""
        streams = self.streams
        if release is None and host.data_ptr() in self._readers:
            self.worker.wait(self._readers.pop(host.data_ptr()))  # usually long done: a whole micro-batch ago
        compute = streams.compute()
        packed, done = (release.packed, release.done) if release is not None else (streams.event(), streams.event())
        packed.record(compute)
        streams.wait(streams.d2h, packed)
        if release is None and streams.cuda:
            dev.record_stream(streams.d2h)  # allocated on the compute stream, read on the D2H stream
        dev = self.place.reduce(unit, dev, release)
        streams.copy(streams.d2h, host[: dev.numel()], dev)
        done.record(streams.d2h)
        self.stats.d2h_bytes += dev.numel() * dev.element_size()
        place = self.place

        def task(dev: torch.Tensor = dev) -> None:  # holds the device buffer until its copy is done
            place.consume(unit, host, dev.numel(), produced, done)

        # the channel goes back even when the task fails or is skipped: backward may be waiting for it
        pool = self.channels
        ticket = self.worker.submit(task, cleanup=(lambda: pool.put(release)) if release is not None else None)
        if release is None:
            self._readers[host.data_ptr()] = ticket

    def close(self) -> None:
        if self.arena is not None:
            self.arena.release()
            self.arena = None
        self.channels = None  # type: ignore[assignment]
