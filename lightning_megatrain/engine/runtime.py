"""The one object the Lightning glue talks to: attach to a module, bind, step, wait, detach.

A facade: each concern lives in a part of its own, in the order one micro-batch meets them:
``attach.py`` lays the module out in host units; ``outer.py`` binds the non-layer parameters for
the step; ``streamer.py`` runs each layer from a device slot and recomputes it in backward, with
its inputs kept by ``saved_inputs.py``; ``grad_link.py`` sends gradients home; ``host_step.py``
runs the optimizer on the host worker. Where data parallel differs, the parts ask the placement:
``whole.py`` on one device, ``sharded.py`` across the ranks of a node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .attach import build_units, check_module, guard, move_buffers, unguard
from .config import RuntimeConfig, Stats
from .grad_link import GradLink
from .host import PINS, page_locks
from .host_step import HostStep
from .layers import find_layers
from .materialize import Materializer
from .outer import OuterParams, check_trainable
from .saved_inputs import SavedInputs
from .sharded import NodeShards
from .state import LeanState
from .stepper import Worker, default_host_threads
from .stream import ChannelPool, SlotPool, Streams
from .streamer import LayerStreamer
from .units import Unit
from .whole import Whole

__all__ = ["Runtime", "RuntimeConfig", "Stats"]


class Runtime:
    """Host-resident training state of one module and the machinery that streams it through a device."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        compute_dtype: torch.dtype,
        config: RuntimeConfig,
        before_alloc: Callable[[list[nn.Module]], None] | None = None,
    ) -> None:
        config.check()
        self.module = module
        self.device = torch.device(device)
        self.config = config
        # the dtype layers are streamed in: without a host compute copy the fp32 masters go as they are
        # and autocast casts them on the device, exactly as in plain mixed-precision training
        self.compute_dtype = compute_dtype if config.host_memory == "fast" else torch.float32
        self.lean = LeanState() if config.host_memory == "lean" else None
        self.layers = find_layers(module, config.layer_cls)
        check_module(module, self.layers, config.grads)
        materialize = config.materialize if isinstance(config.materialize, Materializer) else Materializer(module)
        materialize.check()  # meta tensors that nothing fills: refused before anything is allocated
        if before_alloc is not None:
            before_alloc(self.layers)
        self._stats = Stats()
        self.streams = Streams(self.device)
        coll = config.collective
        self.place: Whole | NodeShards = Whole(self.streams, self.device, self._stats) if coll is None else NodeShards(coll, self.streams, self.device, self._stats)
        self.place.plans_checked()
        pin = config.pin_memory and page_locks(self.device)
        PINS.begin()  # what fails to page-lock during setup is warned about once, at its end
        threads = config.host_threads
        self.worker = Worker(threads=threads if threads is not None else self.place.host_threads(default_host_threads() + 1))
        self.units: list[Unit] = []
        try:
            self.units = build_units(module, self.layers, self.place, self.compute_dtype, pin, config.grads, materialize)
            materialize.buffers()
            self.outer_in, self.outer_out = self.units[0], self.units[-1]
            self.layer_units = self.units[1:-1]
            self.place.after_units(self.units, (self.outer_in, self.outer_out), pin)
            if self.lean is not None:
                # one streamed layer's state is widened at a time; bigger units go in chunks of that size
                self.lean.chunk_numel = max((u.gnumel for u in self.layer_units), default=0)
            move_buffers(module, self.device)
            self.host = HostStep(self.units, self.place, self.worker, self.streams, self.lean, config.fused_optimizer, self._stats)
            self.link = GradLink(self.place, self.streams, self.worker, self._stats, self.compute_dtype)
            self.link.make_channels(self.layer_units, config.grad_channels, pin)
            self.saved = SavedInputs(self.streams, config.offload_activations, pin, self._stats)
            self.outer = OuterParams(
                module, self.outer_in, self.outer_out, bool(self.layers), self.place, self.streams, self.link,
                self.host.wait_ticket, self._stats, config.grads,
            )
            self.streamer = LayerStreamer(
                self.layer_units, self.place, self.streams, self.link, self.saved, self.host.wait_ticket,
                self.host.ticket_done, config.prefetch, after_last=self.outer.bind_output_if_pending,
            )
            for layer, unit in zip(self.layers, self.layer_units):
                self.streamer.wrap(layer, unit)
            # a step changes only trainable layers: frozen ones stay resident across it
            self.host.launching = [lambda: self.streamer.slots.invalidate(lambda u: u.trainable), self.outer.masters_changing]
            self.host.updated = self.outer.updated
            if self.place.steps_early:
                self.link.early = self.host.early
        except BaseException:
            self.detach()
            raise
        finally:
            PINS.end_setup()
        self._guarded = guard(module, self.wait)

    # ----------------------------------------------------------------- what the glue and telemetry read
    @property
    def collective(self) -> Any:
        """The data parallel groups (``engine.collective.Collective``), or None on one device."""
        return self.config.collective

    @property
    def slots(self) -> SlotPool | None:
        streamer = getattr(self, "streamer", None)
        return streamer.slots if streamer is not None else None

    @property
    def channels(self) -> ChannelPool | None:
        link = getattr(self, "link", None)
        return link.channels if link is not None else None

    @property
    def gate(self) -> Callable[[int], None] | None:
        """Called with a unit's index before the optimizer updates it (an asynchronous checkpoint save
        holds each layer's update until that layer's tensors are written)."""
        return self.host.gate

    @gate.setter
    def gate(self, fn: Callable[[int], None] | None) -> None:
        self.host.gate = fn

    def stats(self, reset: bool = True) -> Stats:
        """Transfer and host-time counters since the last call (the device stall time of copies that
        have completed; nothing here synchronises with the device)."""
        slots = self.slots
        if slots is not None:
            self._stats.transfer_wait_s += slots.collect_stall()
            self._stats.h2d_bytes += slots.take_bytes()
        return self._stats.take(reset)

    def unit_of(self) -> dict[int, int]:
        """Unit index of every parameter, keyed by its data pointer (state_dict tensors share it)."""
        return {e.param.data_ptr(): u.index for u in self.units for e in u.entries if e.numel}

    def owned(self, param: torch.Tensor) -> tuple[int, int]:
        """The flat elements ``[lo, hi)`` of a module parameter this rank owns; ``(0, 0)`` if none. On one
        device every parameter is owned whole."""
        return self.place.owned(param)

    # ----------------------------------------------------------------- one step
    def bound(self) -> contextlib.AbstractContextManager[None]:
        """Bind the non-layer parameters on the device for one step (re-entrant)."""
        return self.outer.bound(start=self._start_step)

    def _start_step(self) -> None:
        self.saved.new_step()
        self.streamer.new_step()
        if not self.place.keeps_residency:  # one device: kept; a slot is dropped when its layer changes
            self.streamer.slots.invalidate()
        for unit in self.layer_units:
            check_trainable(unit, self.config.grads)

    def after_backward(self, wait: bool = True) -> None:
        """Send the non-layer gradients home; with ``wait``, also wait until the host has added every
        gradient of this backward.

        ``wait=False`` (the Lightning glue): the host worker adds gradients and runs the optimizer in
        submission order, so the step needs no wait, and whoever reads the host gradients
        (``on_after_backward``, clipping, hooks: the glue's ``readers.py``) calls ``wait`` first; the
        device goes on with the next micro-batch meanwhile. Data parallel always waits here: the
        node's ranks publish that their shares are added.
        """
        self.outer.flush_all()
        if wait or self.place.waits_after_backward:
            self.worker.wait()
        self.place.after_backward()
        self.outer.put_back()

    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Make the optimizer's readers wait for the pending step, and pick fused kernels."""
        self.host.attach(optimizer, self.wait)

    def refresh_fused(self, optimizer: Optimizer) -> None:
        self.host.refresh_fused(optimizer)

    def prepare_step(self, optimizer: Optimizer, **kwargs: Any) -> bool:
        """Before the backward of a step's last micro-batch: let each layer's update start as soon as its
        gradients are final, during backward (``HostStep.prepare``). The caller vouches that nothing reads
        or changes gradients or hyperparameters before ``step`` (no clipping, no hook reading gradients).
        False where this placement cannot (data parallel: the node's ranks reduce gradients first)."""
        if not self.place.steps_early:
            return False
        self.host.prepare(optimizer, kwargs)
        return True

    def step(self, optimizer: Optimizer, **kwargs: Any) -> None:
        """Launch the user's optimizer on the host, unit by unit in forward order, and return at once
        (after ``prepare_step``: only the units not updated during backward)."""
        self.host.step(optimizer, kwargs)
        self.outer.put_back()

    def cancel_step(self) -> None:
        """A prepared step will not come (its closure failed before backward): forget it."""
        self.host.cancel()

    def wait(self) -> None:
        """Block until all host work (gradients, optimizer step) is done; in data parallel, also that of
        the node's other ranks (what they own of the shared parameters and gradients)."""
        self.worker.wait()
        if self.units:
            self.place.wait()

    # ----------------------------------------------------------------- data parallel
    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the whole model's norm, each rank scaling the elements it owns (data parallel)."""
        self.wait()
        return self._sharded().clip_grad_norm_(params, max_norm, norm_type)

    def clip_grad_value_(self, params: Sequence[torch.Tensor], clip_value: float) -> None:
        """Clip by value, each rank clamping the elements it owns (data parallel)."""
        self.wait()
        self._sharded().clip_grad_value_(params, clip_value)

    def shard_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` of what this rank holds (see ``NodeShards.optimizer_state``)."""
        self.wait()
        return self._sharded().optimizer_state(optimizer)

    def owned_ranges(self, optimizer: Optimizer) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(lo, hi, shape)`` of each of the optimizer's parameters: the flat elements this rank owns."""
        return [(*self.owned(p), tuple(p.shape)) for g in optimizer.param_groups for p in g["params"]]

    def load_shard_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        """Take this rank's elements of a saved optimizer state (see ``NodeShards.load_optimizer_state``)."""
        self.wait()
        self._sharded().load_optimizer_state(optimizer, state_dict, self.lean)

    def _sharded(self) -> NodeShards:
        if not isinstance(self.place, NodeShards):
            raise RuntimeError("this runtime trains on one device: its parameters and optimizer state are whole")
        return self.place

    # ----------------------------------------------------------------- teardown
    def detach(self) -> None:
        """Restore the module and optimizers as plain host objects and free pinned memory, streams and threads."""
        worker = getattr(self, "worker", None)
        place = getattr(self, "place", None)
        if worker is not None:
            try:
                worker.wait()
                if place is not None:
                    place.detach(bool(self.units))
            except Exception:  # noqa: BLE001 - teardown after a failure must still free everything
                pass
            worker.close()
        streams = getattr(self, "streams", None)
        if streams is not None:
            # copies and kernels still queued may read or write the pinned and device buffers freed below
            streams.synchronize()
        host, streamer, outer = getattr(self, "host", None), getattr(self, "streamer", None), getattr(self, "outer", None)
        if host is not None:
            if isinstance(place, NodeShards) and self.units:
                for optimizer in host.patched:  # data parallel: each rank's share of the state stays readable
                    place.hand_back_state(optimizer)
            host.close()  # the optimizers get their own classes back
        if streamer is not None:
            streamer.unwrap()  # the layers their own forward
        if outer is not None:
            outer.close()
        unguard(self.module, getattr(self, "_guarded", {}))
        self._guarded = {}
        for unit in getattr(self, "units", []):
            unit.unbind()
            unit.detach()
        self.units = []
        if place is not None:
            place.release()
        saved = getattr(self, "saved", None)
        if saved is not None:
            saved.close()
        link = getattr(self, "link", None)
        if link is not None:
            link.close()
        if streamer is not None:
            streamer.slots = None  # type: ignore[assignment]
