"""The one object the Lightning glue talks to: attach to a module, bind, stream, step, wait, detach."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .layer_fn import LayerCall, LayerFunction, strip_caches
from .host import HostArena
from .layers import LayerClasses, find_layers
from .stepper import Worker, check_optimizer, enable_fused, make_waiting, restore_class, snapshot_groups, split_params, step_unit
from .stream import ChannelPool, GradChannel, SlotPool, Streams
from .units import Unit, collect_entries


@dataclass
class Stats:
    """Counters since the last ``Runtime.stats()``; read by the telemetry callback."""

    h2d_bytes: int = 0  # weights copied to the device (layer slots and non-layer parameters)
    d2h_bytes: int = 0  # gradients copied to the host
    host_wait_s: float = 0.0  # training thread blocked on the host worker (the previous step's update)
    optimizer_s: float = 0.0  # host worker time in optimizer updates
    accumulate_s: float = 0.0  # host worker time adding gradients into the fp32 .grad
    transfer_wait_s: float = 0.0  # device time the compute stream waited for weight copies (CUDA only)
    offload_bytes: int = 0  # saved layer inputs copied to host memory (offload_activations)


@dataclass
class _Offloaded:
    """One saved layer input kept in host memory between forward and backward."""

    host: torch.Tensor
    shape: torch.Size
    done: Any  # D2H finished
    device: torch.Tensor | None = None  # fetched back for backward
    ready: Any = None  # H2D finished


@dataclass
class RuntimeConfig:
    """Engine options; see :class:`lightning_megatrain.MegaTrainStrategy` for their meaning."""

    layer_cls: LayerClasses | None = None
    prefetch: int = 1
    pin_memory: bool = True
    fused_optimizer: bool = True
    grads: bool = True  # False for validate/test/predict: no gradient memory at all
    offload_activations: bool = False


def _check_side_outputs(module: nn.Module) -> None:
    """Refuse what megatrain would silently get wrong: a loss built from tensors captured inside a
    streamed layer (HF's router logits are recorded by forward hooks inside each decoder layer)."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if getattr(config, "output_router_logits", False) is True:
            raise ValueError(
                f"{type(m).__name__} has config.output_router_logits=True: its router auxiliary loss is computed from "
                "router logits recorded by hooks inside each decoder layer, which megatrain runs without an autograd "
                "graph (the layer is recomputed in backward), so that loss would send no gradient to the routers. Set "
                "config.output_router_logits=False, or compute the auxiliary loss inside the layer's own outputs."
            )


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
        if config.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (layers copied ahead of the one computing), got {config.prefetch}")
        self.module = module
        self.device = torch.device(device)
        self.config = config
        self.compute_dtype = compute_dtype
        self.layers = find_layers(module, config.layer_cls)
        self._check_sharing()
        _check_side_outputs(module)
        for name, p in module.named_parameters():
            if p.dtype != torch.float32:
                raise TypeError(
                    f"megatrain keeps fp32 master weights, but parameter {name!r} is {p.dtype}. Build the model in "
                    "float32 (the precision setting picks the compute dtype)."
                )
        if before_alloc is not None:
            before_alloc(self.layers)
        pin = config.pin_memory and self.device.type == "cuda"
        self.streams = Streams(self.device)
        self.worker = Worker()
        self.units: list[Unit] = []
        self._forwards: list[tuple[nn.Module, Any]] = []
        try:
            layer_ids = {id(p) for layer in self.layers for p in layer.parameters()}
            outer = collect_entries([("", module)], exclude=layer_ids, grads=config.grads)
            self.outer = Unit("outer", 0, outer, torch.float32, pin=pin, staging=True)
            self.units.append(self.outer)
            for i, layer in enumerate(self.layers):
                entries = collect_entries([("", layer)], exclude=set(), grads=config.grads)
                self.units.append(Unit(f"layer{i}", i + 1, entries, compute_dtype, pin=pin, staging=False, module=layer))
            self.layer_units = self.units[1:]
            self._owner = {id(e.param): u.index for u in self.units for e in u.entries}
            self._move_buffers()
            self._make_device_buffers(pin)
            for layer, unit in zip(self.layers, self.layer_units):
                self._wrap(layer, unit)
        except BaseException:
            self.detach()
            raise
        self._leaves: list[list[nn.Parameter]] = []
        self._bound = 0
        self._stale = False
        owners = {id(m): m for e in self.outer.entries for m, _ in e.refs}
        owners[id(module)] = module
        self._hooks = [m.register_forward_pre_hook(self._rebind_if_stale) for m in owners.values()]
        self._guarded = self._guard(module)
        self._anchor = torch.empty(0, device=self.device, requires_grad=True)
        self._patched: list[Optimizer] = []
        # Called with a unit's index before the optimizer updates it; an asynchronous checkpoint save
        # uses it to hold each layer's update until that layer's tensors are written.
        self.gate: Callable[[int], None] | None = None
        self._stats = Stats()
        self._calls: list[LayerCall] = []  # this step's layer calls with offloaded inputs, in forward order
        self._act_used = 0  # host buffers handed out this step
        self._act_arenas: list[HostArena] = []  # host buffers for offloaded inputs, reused step to step

    # ----------------------------------------------------------------- setup
    _GUARDED = ("parameters", "named_parameters", "state_dict", "load_state_dict", "zero_grad")

    def _guard(self, module: nn.Module) -> dict[str, Any]:
        """The root module's readers of parameters and gradients wait for the pending optimizer step
        (e.g. Lightning's zero_grad before validation, an EMA callback reading ``parameters()``)."""
        saved = {}
        for name in self._GUARDED:
            saved[name] = module.__dict__.get(name)
            method = getattr(module, name)

            def waiting(*args: Any, __m: Any = method, **kwargs: Any) -> Any:
                self.wait()
                return __m(*args, **kwargs)

            object.__setattr__(module, name, waiting)
        return saved

    def _check_sharing(self) -> None:
        seen: dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                if id(p) in seen and seen[id(p)] != i:
                    raise ValueError(
                        f"a parameter is shared by streamed layers {seen[id(p)]} and {i}; megatrain streams each "
                        "layer's own weights. Pass layer_cls naming modules that do not share parameters."
                    )
                seen[id(p)] = i
        layer_params = set(seen)
        outside = self._params_outside_layers()
        shared = layer_params & outside
        if shared:
            raise ValueError(
                "a parameter of a streamed layer is also used outside the layer stack (tied weight); megatrain "
                "cannot stream it. Pass layer_cls naming modules that hold no tied weight."
            )

    def _params_outside_layers(self) -> set[int]:
        layer_ids = {id(m) for layer in self.layers for m in layer.modules()}
        out: set[int] = set()
        for m in self.module.modules():
            if id(m) in layer_ids:
                continue
            out.update(id(p) for p in m._parameters.values() if p is not None)
        return out

    def _move_buffers(self) -> None:
        for m in self.module.modules():
            for name, b in m._buffers.items():
                if b is not None and b.device != self.device:
                    m._buffers[name] = b.to(self.device)

    def _make_device_buffers(self, pin: bool) -> None:
        numel = max((u.numel for u in self.layer_units), default=0)
        gnumel = max((u.gnumel for u in self.layer_units), default=0)
        n_slots = self.config.prefetch + 1
        self.slots = SlotPool(n_slots if numel else 0, numel, self.compute_dtype, self.streams)
        channels = []
        if gnumel:
            self._channel_arena = HostArena([(gnumel, self.compute_dtype)] * n_slots, pin=pin)
            for host in self._channel_arena.buffers:
                dev = torch.empty(gnumel, dtype=self.compute_dtype, device=self.device)
                channels.append(GradChannel(dev, host, self.streams))
        self.channels = ChannelPool(channels)

    def _wrap(self, layer: nn.Module, unit: Unit) -> None:
        if getattr(layer, "gradient_checkpointing", False):
            warnings.warn(
                f"{type(layer).__name__} has gradient checkpointing on; megatrain already recomputes every "
                "streamed layer in backward, so it is turned off for these layers to avoid a second recompute.",
                stacklevel=2,
            )
            layer.gradient_checkpointing = False  # type: ignore[assignment]
        previous = layer.__dict__.get("forward")
        fn = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._run_layer(unit, fn, args, kwargs)

        layer.forward = forward
        self._forwards.append((layer, previous))

    # ----------------------------------------------------------------- optimizer
    def attach_optimizer(self, optimizer: Optimizer) -> None:
        """Make the optimizer's readers wait for the pending step, and pick fused kernels."""
        check_optimizer(optimizer)
        if self.config.fused_optimizer:
            enable_fused(optimizer)
        make_waiting(optimizer, self.wait)
        self._patched.append(optimizer)

    def refresh_fused(self, optimizer: Optimizer) -> None:
        if self.config.fused_optimizer:
            enable_fused(optimizer)

    def step(self, optimizer: Optimizer, **kwargs: Any) -> None:
        """Launch the user's optimizer on the host, unit by unit in forward order, and return at once."""
        self.worker.check()  # a failed host task stops training here rather than after the next forward
        hparams = snapshot_groups(optimizer)
        per_unit = split_params(optimizer, self._owner, len(self.units))
        self.slots.invalidate()
        pending = self.streams.record_all()
        if pending:
            def sync_pending() -> None:
                for e in pending:
                    e.synchronize()

            self.worker.submit(sync_pending)
        gate = self.gate
        for unit, params in zip(self.units, per_unit):

            def task(unit: Unit = unit, params: Any = params) -> None:
                if gate is not None:
                    gate(unit.index)
                start = time.perf_counter()
                step_unit(optimizer, hparams, params, kwargs)
                unit.refresh_compute()
                self._stats.optimizer_s += time.perf_counter() - start

            unit.ticket = self.worker.submit(task)
        optimizer._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check that step ran
        if self._bound:
            self.outer.unbind()
            self._stale = True

    def wait(self) -> None:
        """Block until all host work (gradients, optimizer step) is done."""
        self.worker.wait()

    def stats(self, reset: bool = True) -> Stats:
        """Transfer and host-time counters since the last call (the device stall time of copies that
        have completed; nothing here synchronises with the device)."""
        out = self._stats
        out.transfer_wait_s += self.slots.collect_stall() if self.slots is not None else 0.0
        out.h2d_bytes += self.slots.take_bytes() if self.slots is not None else 0
        if reset:
            self._stats = Stats()
        return out

    def _wait_ticket(self, ticket: int) -> None:
        start = time.perf_counter()
        self.worker.wait(ticket)
        self._stats.host_wait_s += time.perf_counter() - start

    def unit_of(self) -> dict[int, int]:
        """Unit index of every parameter, keyed by its data pointer (state_dict tensors share it)."""
        return {e.param.data_ptr(): u.index for u in self.units for e in u.entries if e.numel}

    # ----------------------------------------------------------------- binding
    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Bind the non-layer parameters on the device for one step (re-entrant)."""
        if self._bound:
            self._bound += 1
            try:
                yield
            finally:
                self._bound -= 1
            return
        self._leaves = []
        self._calls = []
        self._act_used = 0
        self.slots.invalidate()
        for unit in self.layer_units:
            self._check_trainable(unit)
        self._bound = 1
        try:
            self.rebind()
            yield
        finally:
            self._bound = 0
            self._stale = False
            self.outer.unbind()

    def rebind(self) -> None:
        """Fresh device copies of the non-layer parameters, waiting only for their own update."""
        outer = self.outer
        self._stale = False
        self._wait_ticket(outer.ticket)
        self._check_trainable(outer)
        if not outer.entries:
            return
        dev = torch.empty(outer.numel, dtype=torch.float32, device=self.device)
        self.streams.copy(self.streams.compute(), dev, outer.master)
        self._stats.h2d_bytes += outer.numel * 4
        leaves = [nn.Parameter(outer.param_view(dev, e), requires_grad=e.goffset is not None) for e in outer.entries]
        outer.bind(leaves)
        self._leaves.append(leaves)

    def _rebind_if_stale(self, module: nn.Module, args: Any) -> None:
        # Inside one training_step (manual optimization) the host parameters are put back after each
        # backward, so that clipping and hooks see them with their gradients; the next module call
        # binds fresh device copies again.
        if self._bound and self._stale:
            self.rebind()

    def after_backward(self) -> None:
        """Send the non-layer gradients home and wait until every gradient of this backward is on the host."""
        outer = self.outer
        trainable = [e for e in outer.entries if e.goffset is not None]
        produced = [False] * len(trainable)
        packed: torch.Tensor | None = None
        # every binding of this step (several in manual optimization) adds into one packed buffer:
        # one copy into the host staging buffer, consumed before the next backward can reuse it
        for leaves in self._leaves:
            by_entry = {id(e): leaf for e, leaf in zip(outer.entries, leaves)}
            for i, e in enumerate(trainable):
                leaf = by_entry[id(e)]
                if leaf.grad is None:
                    continue
                if packed is None:
                    packed = torch.zeros(outer.gnumel, dtype=torch.float32, device=self.device)
                packed[e.goffset : e.goffset + e.numel].add_(leaf.grad.reshape(-1))
                leaf.grad = None
                produced[i] = True
        if packed is not None:
            self._send(outer, packed, outer.staging, produced, release=None)
        self.worker.wait()
        if self._bound:
            self.outer.unbind()
            self._stale = True

    def _send(self, unit: Unit, dev: torch.Tensor, host: torch.Tensor, produced: list[bool], release: GradChannel | None) -> None:
        streams = self.streams
        compute = streams.compute()
        if release is not None:
            release.packed.record(compute)
            streams.wait(streams.d2h, release.packed)
            stream, done = streams.d2h, release.done
        else:
            stream, done = compute, streams.event()
        streams.copy(stream, host[: dev.numel()], dev)
        done.record(stream)
        self._stats.d2h_bytes += dev.numel() * dev.element_size()

        def task(dev: torch.Tensor = dev) -> None:  # holds the device buffer until its copy is done
            done.synchronize()
            start = time.perf_counter()
            unit.accumulate(host[: unit.gnumel], produced)
            self._stats.accumulate_s += time.perf_counter() - start

        # the channel goes back even when the task fails or is skipped: backward may be waiting for it
        pool = self.channels
        self.worker.submit(task, cleanup=(lambda: pool.put(release)) if release is not None else None)

    def _check_trainable(self, unit: Unit) -> None:
        if not self.config.grads:
            return
        for e in unit.entries:
            if e.param.requires_grad != (e.goffset is not None):
                raise RuntimeError(
                    f"parameter {e.name!r} changed requires_grad after megatrain set up its host memory. Freeze or "
                    "unfreeze parameters before trainer.fit (e.g. in configure_model or __init__)."
                )

    # ----------------------------------------------------------------- layers
    def _acquire(self, unit: Unit, direction: int) -> Any:
        """Make ``unit`` resident and start copying the next ones in ``direction``."""
        slot = self._load(unit, keep=())
        kept = [slot]
        idx = unit.index - 1
        for k in range(1, self.config.prefetch + 1):
            j = idx + direction * k
            if not 0 <= j < len(self.layer_units) or len(kept) >= len(self.slots.slots):
                break
            kept.append(self._load(self.layer_units[j], keep=tuple(kept)))
        return slot

    def _load(self, unit: Unit, keep: tuple) -> Any:
        if self.slots.find(unit) is None:
            self._wait_ticket(unit.ticket)
            unit.refresh_compute()
        return self.slots.load(unit, unit.compute, keep=keep)

    def _views(self, unit: Unit, slot: Any, grad: bool) -> list[torch.Tensor]:
        views = [unit.param_view(slot.buf, e) for e in unit.entries]
        if grad:
            views = [v.detach().requires_grad_(e.goffset is not None) for v, e in zip(views, unit.entries)]
        return views

    def _run_layer(self, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> Any:
        if torch.is_grad_enabled():
            call = LayerCall(self, unit, fn, *strip_caches(args, kwargs))
            tensors = call.tensors()
            if unit.trainable or any(t.requires_grad for t in tensors):
                outs = LayerFunction.apply(call, self._anchor, *tensors)
                return call.join_output(outs)
        slot = self._acquire(unit, +1)
        self.slots.begin_use(slot)
        try:
            unit.bind(self._views(unit, slot, grad=False))
            return fn(*args, **kwargs)
        finally:
            unit.unbind()
            self.slots.end_use(slot)

    def run_forward(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> Any:
        unit = call.unit
        slot = self._acquire(unit, +1)
        self.slots.begin_use(slot)
        try:
            unit.bind(self._views(unit, slot, grad=False))
            versions = unit.buffer_versions()
            out = call.call(tensors)
            if unit.buffer_versions() != versions:
                unit.mutates_buffers = True  # e.g. BatchNorm running stats
            return out
        finally:
            unit.unbind()
            self.slots.end_use(slot)

    # ----------------------------------------------------------------- activation offload
    def save_inputs(self, call: LayerCall, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The inputs to keep for backward; with ``offload_activations`` the ones that need a gradient
        (the hidden states) are copied to host memory on the D2H stream instead."""
        if not self.config.offload_activations:
            return list(tensors)
        kept: list[torch.Tensor | None] = []
        for i, t in enumerate(tensors):
            if t.requires_grad and t.is_floating_point() and t.numel():
                call.offloaded[i] = self._offload(t)
                kept.append(None)
            else:
                kept.append(t)
        if call.offloaded:
            call.seq = len(self._calls)
            self._calls.append(call)
        return kept

    def _host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        index = self._act_used
        self._act_used += 1
        pin = self.config.pin_memory and self.device.type == "cuda"
        if index < len(self._act_arenas):
            arena = self._act_arenas[index]
            buf = arena.buffers[0] if arena.buffers else None
            if buf is not None and buf.dtype == dtype and buf.numel() == numel:
                return buf
            arena.release()
            self._act_arenas[index] = arena = HostArena([(numel, dtype)], pin=pin)
        else:
            arena = HostArena([(numel, dtype)], pin=pin)
            self._act_arenas.append(arena)
        return arena.buffers[0]

    def _offload(self, t: torch.Tensor) -> _Offloaded:
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
        self._stats.offload_bytes += t.numel() * t.element_size()
        return _Offloaded(host=host, shape=t.shape, done=done)

    def _fetch(self, record: _Offloaded) -> None:
        if record.device is not None:
            return
        streams = self.streams
        record.device = torch.empty(record.shape, dtype=record.host.dtype, device=self.device)
        # the block may have just been freed by a kernel still queued on the compute stream: the copy
        # into it waits for the compute stream to get here
        allocated = streams.event()
        allocated.record(streams.compute())
        streams.wait(streams.h2d, allocated)
        streams.wait(streams.h2d, record.done)
        streams.copy(streams.h2d, record.device, record.host.view(record.shape))
        record.ready = streams.event()
        record.ready.record(streams.h2d)

    def restore_inputs(self, call: LayerCall, kept: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The layer's inputs for its recompute: offloaded ones come back from host memory (already
        on their way if the previous backward prefetched them), and the next layer's are started."""
        if not call.offloaded:
            return kept  # type: ignore[return-value]
        for record in call.offloaded.values():
            self._fetch(record)
        if call.seq > 0:
            for record in self._calls[call.seq - 1].offloaded.values():
                self._fetch(record)  # prefetch for the next backward
        out = list(kept)
        compute = self.streams.compute()
        for i, record in call.offloaded.items():
            self.streams.wait(compute, record.ready)
            out[i] = record.device
            record.device = None
        call.offloaded = {}
        return out  # type: ignore[return-value]

    def run_backward(
        self, call: LayerCall, inputs: list[torch.Tensor], wrt: list[torch.Tensor], grad_outputs: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        unit = call.unit
        slot = self._acquire(unit, -1)
        self.slots.begin_use(slot)
        try:
            return self._backward_in_slot(call, unit, slot, inputs, wrt, grad_outputs)
        finally:
            self.slots.end_use(slot)  # also on failure: the slot's next copy must wait for these kernels

    def _backward_in_slot(
        self, call: LayerCall, unit: Unit, slot: Any, inputs: list[torch.Tensor], wrt: list[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor | None]:
        try:
            weights = self._views(unit, slot, grad=True)
            unit.bind(weights)
            # the recompute must not update buffers a second time (BatchNorm running stats)
            saved = [b.clone() for b in unit.buffers()] if unit.mutates_buffers else None
            with torch.enable_grad(), call.replay_context():
                outs = call.split_output(call.call(inputs))
            call.out_leaves = []
            pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
            trainable = [w for w, e in zip(weights, unit.entries) if e.goffset is not None]
            targets = list(wrt) + trainable
            if pairs and targets:
                grads = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
            else:
                grads = (None,) * len(targets)
            if saved is not None:
                with torch.no_grad():
                    for b, v in zip(unit.buffers(), saved):
                        b.copy_(v)
        finally:
            unit.unbind()
        input_grads = list(grads[: len(wrt)])
        weight_grads = grads[len(wrt) :]
        if unit.trainable:
            # a failed host task raises here (WorkerError) instead of leaving backward blocked on a channel
            channel = self.channels.get(check=self.worker.check)
            try:
                produced = []
                with torch.no_grad():
                    for e, g in zip((e for e in unit.entries if e.goffset is not None), weight_grads):
                        dst = channel.dev[e.goffset : e.goffset + e.numel]
                        if g is None:
                            dst.zero_()
                            produced.append(False)
                        else:
                            dst.copy_(g.reshape(-1))
                            produced.append(True)
                self._send(unit, channel.dev[: unit.gnumel], channel.host, produced, release=channel)
            except BaseException:
                self.channels.put(channel)  # _send submits last: a failure in it means no task will return it
                raise
        return input_grads

    # ----------------------------------------------------------------- teardown
    def detach(self) -> None:
        """Restore the module and optimizers as plain host objects and free pinned memory, streams and threads."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            try:
                worker.wait()
            except Exception:  # noqa: BLE001 - teardown after a failure must still free everything
                pass
            worker.close()
        streams = getattr(self, "streams", None)
        if streams is not None:
            # copies and kernels still queued may read or write the pinned and device buffers freed below
            streams.synchronize()
        for optimizer in getattr(self, "_patched", []):
            restore_class(optimizer)
        self._patched = []
        for layer, previous in getattr(self, "_forwards", []):
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self._forwards = []
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        for name, previous in getattr(self, "_guarded", {}).items():
            if previous is None:
                self.module.__dict__.pop(name, None)
            else:
                object.__setattr__(self.module, name, previous)
        self._guarded = {}
        for unit in getattr(self, "units", []):
            unit.unbind()
            unit.detach()
        self.units = []
        for act in getattr(self, "_act_arenas", []):
            act.release()
        self._act_arenas = []
        arena = getattr(self, "_channel_arena", None)
        if arena is not None:
            arena.release()
            self._channel_arena = None
        self.slots = None  # type: ignore[assignment]
        self.channels = None  # type: ignore[assignment]
