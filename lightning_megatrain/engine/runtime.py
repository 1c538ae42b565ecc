"""The one object the Lightning glue talks to: attach to a module, bind, stream, step, wait, detach."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .layer_fn import LayerCall, LayerFunction, strip_caches
from .host import HostArena, PinnedRange
from .layers import LayerClasses, find_layers
from .stepper import Worker, check_optimizer, default_host_threads, enable_fused, make_waiting, restore_class, snapshot_groups, split_params, step_unit
from .state import LeanState
from .stream import ChannelPool, GradChannel, SlotPool, Streams
from .units import Entry, Unit, assign_offsets, collect_entries, image_layout, stream_dtypes


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
class _OuterCopy:
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


@dataclass
class _StateHolder:
    """What ``LeanState`` reads of an optimizer (its ``state``), for a rank's own state in data parallel."""

    state: Any
    param_groups: list = field(default_factory=list)


@dataclass
class _ShardParam:
    """Data parallel: the elements ``[a, b)`` of one parameter this rank owns, as a parameter of their
    own (a view of the shared master) that the optimizer steps, with its own optimizer state."""

    param: nn.Parameter
    entry: Entry
    a: int
    b: int


@dataclass
class RuntimeConfig:
    """Engine options; see :class:`lightning_megatrain.MegaTrainStrategy` for their meaning."""

    layer_cls: LayerClasses | None = None
    prefetch: int = 1
    pin_memory: bool = True
    fused_optimizer: bool = True
    grads: bool = True  # False for validate/test/predict: no gradient memory at all
    offload_activations: bool = False
    # "fast": a compute-dtype copy of each layer on the host, streamed (half the PCIe bytes);
    # "compact": the fp32 masters are streamed and autocast casts them on the device (no host copy);
    # "lean": "compact" plus floating optimizer state held in bf16 between steps (engine/state.py)
    host_memory: str = "fast"
    grad_channels: int = 2  # layers' gradients in flight to the host before backward waits for the host
    host_threads: int | None = None  # intra-op threads of the host worker; None: all cores but one
    collective: Any = None  # data parallel: an ``engine.collective.Collective``; None: one device


def _size_class(nbytes: int) -> int:
    """The smallest m * 2**k >= nbytes with m in 4..7: few distinct sizes, at most 25% unused."""
    if nbytes <= 4:
        return max(nbytes, 1)
    k = max(nbytes.bit_length() - 3, 0)
    m = -(-nbytes // (1 << k))
    return m << k


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
        if config.grad_channels < 1:
            raise ValueError(f"grad_channels must be >= 1 (layers' gradients in flight to the host), got {config.grad_channels}")
        if config.host_threads is not None and config.host_threads < 1:
            raise ValueError(f"host_threads must be >= 1 or None (all cores but one), got {config.host_threads}")
        self.module = module
        self.device = torch.device(device)
        self.config = config
        if config.host_memory not in ("fast", "compact", "lean"):
            raise ValueError(f"host_memory must be 'fast', 'compact' or 'lean', got {config.host_memory!r}")
        # the dtype layers are streamed in: without a host compute copy the fp32 masters go as they are
        # and autocast casts them on the device, exactly as in plain mixed-precision training
        self.compute_dtype = compute_dtype if config.host_memory == "fast" else torch.float32
        self.lean = LeanState() if config.host_memory == "lean" else None
        self.layers = find_layers(module, config.layer_cls)
        self._check_sharing()
        _check_side_outputs(module)
        for name, p in module.named_parameters():
            if p.requires_grad and config.grads and p.dtype != torch.float32:
                raise TypeError(
                    f"megatrain keeps fp32 master weights for trainable parameters, but {name!r} is {p.dtype} and "
                    "requires grad. Keep trainable parameters (e.g. adapters) in float32 and freeze the low-precision "
                    "ones (requires_grad_(False)); frozen parameters are stored as they are. The precision setting "
                    "picks the compute dtype."
                )
        if before_alloc is not None:
            before_alloc(self.layers)
        if config.collective is not None:
            # every rank of the node has checked the plan against free memory before any allocates the
            # node's shared arenas (a later check would count them as taken)
            config.collective.barrier()
        pin = config.pin_memory and self.device.type == "cuda"
        self.coll = config.collective
        self._shard: dict[int, Any] = {}  # data parallel: unit index -> UnitShard
        self._shm_files: list[str] = []
        self.streams = Streams(self.device)
        threads = config.host_threads
        if threads is None:
            # the node's cores are shared by its ranks: each worker takes its share, less the training thread
            cores = default_host_threads() + 1
            threads = max(1, cores // self.coll.size - 1) if self.coll is not None else cores - 1
        self.worker = Worker(threads=threads)
        self.units: list[Unit] = []
        self._forwards: list[tuple[nn.Module, Any]] = []
        try:
            layer_ids = {id(p) for layer in self.layers for p in layer.parameters()}
            outer = collect_entries([("", module)], exclude=layer_ids, grads=config.grads)
            inputs, outputs = self._split_outer(outer)
            # Non-layer parameters in two units around the layer stack, each stepped in its place:
            # the input side first (the next forward needs it first), the output side last.
            # They stream their fp32 masters (frozen ones as stored): embeddings, norms and head compute in
            # fp32 as in plain mixed precision, and they cross once per optimizer step, not per micro-batch.
            if self.coll is not None and self.coll.rank != 0:
                self.coll.barrier()  # the node's first rank fills the shared arenas first
            self.outer_in = self._unit("outer_in", 0, inputs, torch.float32, pin=pin, staging=True)
            self.units.append(self.outer_in)
            for i, layer in enumerate(self.layers):
                entries = collect_entries([("", layer)], exclude=set(), grads=config.grads)
                self.units.append(self._unit(f"layer{i}", i + 1, entries, self.compute_dtype, pin=pin, staging=False, module=layer))
            self.outer_out = self._unit("outer_out", len(self.layers) + 1, outputs, torch.float32, pin=pin, staging=True)
            self.units.append(self.outer_out)
            if self.coll is not None:
                self._share_units(pin)
            self.layer_units = self.units[1:-1]
            self._outer = {
                self.outer_in.index: self._outer_copy(self.outer_in, "input"),
                self.outer_out.index: self._outer_copy(self.outer_out, "output"),
            }
            self._owner = {id(e.param): u.index for u in self.units for e in u.entries}
            if self.lean is not None:
                # one streamed layer's state is widened at a time; bigger units go in chunks of that size
                self.lean.chunk_numel = max((u.gnumel for u in self.layer_units), default=0)
            self._move_buffers()
            self._make_device_buffers(pin)
            for layer, unit in zip(self.layers, self.layer_units):
                self._wrap(layer, unit)
        except BaseException:
            self.detach()
            raise
        self._bound = 0
        self._stale = False
        self._out_pending = False  # the output side is bound lazily, when first needed in a step
        owners = {id(m): m for e in self.outer_in.entries for m, _ in e.refs}
        owners[id(module)] = module
        self._out_owners = {id(m): m for e in self.outer_out.entries for m, _ in e.refs}
        owners.update(self._out_owners)
        self._hooks = [m.register_forward_pre_hook(self._before_outer_module) for m in owners.values()]
        self._guarded = self._guard(module)
        self._anchor = torch.empty(0, device=self.device, requires_grad=True)
        self._patched: list[Optimizer] = []
        self._hook_handles: list[Any] = []
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

    def _split_outer(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """Input side / output side of the non-layer parameters.

        The output side holds parameters of modules registered after the layer stack that do not
        contain it (a final norm, the head); everything else (embeddings, raw parameters of the modules
        around the stack, a head tied to the embedding) is the input side, which is bound when a step
        starts. The output side is bound when one of its modules is called or the last layer has run,
        whichever comes first; a parameter of it read directly before the layers would not be ready, so
        anything that could be used anywhere stays on the input side.
        """
        if not self.layers:
            return entries, []
        names = {id(m): n for n, m in self.module.named_modules()}
        order = {id(m): i for i, m in enumerate(self.module.modules())}
        layer_names = [names[id(layer)] for layer in self.layers if id(layer) in names]
        first = min(order[id(layer)] for layer in self.layers)

        def contains_layers(m: nn.Module) -> bool:
            name = names.get(id(m))
            return name is None or any(name == "" or ln.startswith(name + ".") for ln in layer_names)

        inputs, outputs = [], []
        for e in entries:
            after = all(order.get(id(m), -1) > first and not contains_layers(m) for m, _ in e.refs)
            (outputs if after else inputs).append(e)
        for side in (inputs, outputs):  # each side is a unit of its own: offsets from 0
            assign_offsets(side)
        return inputs, outputs

    def _outer_copy(self, unit: Unit, side: str) -> _OuterCopy:
        out = _OuterCopy(unit, side, ready=self.streams.event(), free=self.streams.event())
        if unit.numel:
            shard = self._shard.get(unit.index)
            if shard is None:
                out.dev = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
            else:
                out.dev = torch.empty(shard.chunk * self.coll.size, dtype=torch.uint8, device=self.device)
                out.shard = torch.empty(shard.chunk, dtype=torch.uint8, device=self.device)
        return out

    # ----------------------------------------------------------------- data parallel: shared units
    def _unit(self, name: str, index: int, entries: list[Entry], dtype: torch.dtype, pin: bool, staging: bool, module: nn.Module | None = None) -> Unit:
        coll = self.coll
        if coll is None:
            return Unit(name, index, entries, dtype, pin=pin, staging=staging, module=module)
        dtypes = stream_dtypes([e.param for e in entries], [e.goffset is not None for e in entries], dtype)
        nbytes = image_layout(dtypes, [e.numel for e in entries])[1]
        path = coll.shm_path(name)
        if coll.rank == 0:
            self._shm_files.append(path)
        # gradient staging is per rank (each receives its own shard): kept out of the shared arena
        # pinned later, each rank only the image bytes it copies to its GPU (_share_units)
        return Unit(
            name, index, entries, dtype, pin=False, staging=False, module=module, shared=path, fill=coll.rank == 0,
            image_bytes=coll.chunk(nbytes) * coll.size,
        )

    def _share_units(self, pin: bool) -> None:
        """After every rank of the node has mapped the shared arenas: remove their files (the mappings
        stay; nothing is left behind whatever happens next), and work out what this rank owns."""
        from .collective import shard_unit

        coll = self.coll
        if coll.rank == 0:
            coll.barrier()  # filled: the other ranks map them now
        coll.barrier()  # every rank has mapped them
        for path in self._shm_files:
            os.unlink(path)
        self._shm_files = []
        self._staging: dict[int, HostArena] = {}
        self._pinned: list[PinnedRange] = []
        self._shard_params: dict[int, _ShardParam] = {}
        self._entry_of: dict[int, tuple[Unit, Entry]] = {}
        for unit in self.units:
            shard = shard_unit(unit.entries, unit.nbytes, coll.rank, coll.size, coll.chunk(unit.nbytes))
            self._shard[unit.index] = shard
            unit.own = shard.ranges
            if pin:
                self._pinned.append(PinnedRange(unit.compute[shard.lo : shard.lo + shard.chunk]))
            if coll.replicas is not None:
                # every node starts from node 0's weights: each rank sends/receives what it owns
                for e in unit.entries:
                    a, b = shard.ranges.get(id(e), (0, 0))
                    if b > a:
                        coll.broadcast_from_node0(unit.store_view(e).view(-1)[a:b], self.device)
                unit._synced = {}  # every streamed copy from node 0's values, frozen ones too
                unit.refresh_compute()
            for e in unit.entries:
                self._entry_of[id(e.param)] = (unit, e)
                a, b = shard.ranges.get(id(e), (0, 0))
                if e.goffset is not None and b > a:
                    sp = nn.Parameter(unit.store_view(e).view(-1)[a:b])
                    self._shard_params[id(e.param)] = _ShardParam(sp, e, a, b)
            if unit.staging is None and unit in (self.outer_in, self.outer_out) and shard.gchunk:
                self._staging[unit.index] = HostArena([(shard.gchunk, torch.float32)], pin=pin)
        self._shard_by_piece = {id(sp.param): sp for sp in self._shard_params.values()}
        self.worker.watch = lambda: coll.board.check(what="this rank's host work")
        self._steps = 0  # optimizer steps launched; the node's board says how many each rank finished
        self._backwards = 0
        self._shard_states: dict[int, Any] = {}

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
        nbytes = max((u.nbytes for u in self.layer_units), default=0)
        gnumel = max((u.gnumel for u in self.layer_units), default=0)
        host_gnumel = gnumel
        shards = [self._shard[u.index] for u in self.layer_units] if self.coll is not None else []
        if shards:
            # data parallel: a slot holds the gathered (padded) image; each rank receives its gradient shard
            nbytes = max(sh.chunk for sh in shards) * self.coll.size
            gnumel = max(sh.gchunk for sh in shards) * self.coll.size
            host_gnumel = max(sh.gchunk for sh in shards)
        n_slots = self.config.prefetch + 1
        # a slot is a byte buffer laid out as the units' images (tensors of several dtypes)
        self.slots = SlotPool(n_slots if nbytes else 0, nbytes, torch.uint8, self.streams)
        if shards:
            for slot in self.slots.slots:
                slot.shard = torch.empty(nbytes // self.coll.size, dtype=torch.uint8, device=self.device)
        channels = []
        if gnumel:
            self._channel_arena = HostArena([(host_gnumel, self.compute_dtype)] * self.config.grad_channels, pin=pin)
            for host in self._channel_arena.buffers:
                dev = torch.empty(gnumel, dtype=self.compute_dtype, device=self.device)
                channel = GradChannel(dev, host, self.streams)
                if shards:
                    channel.rs = torch.empty(host_gnumel, dtype=self.compute_dtype, device=self.device)
                channels.append(channel)
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
        if self.lean is not None:
            self.lean.narrow(optimizer)
            # Optimizer.load_state_dict casts loaded state to the parameters' dtype: narrow it again
            self._hook_handles.append(optimizer.register_load_state_dict_post_hook(self.lean.narrow))

    def refresh_fused(self, optimizer: Optimizer) -> None:
        if self.config.fused_optimizer:
            enable_fused(optimizer)

    def step(self, optimizer: Optimizer, **kwargs: Any) -> None:
        """Launch the user's optimizer on the host, unit by unit in forward order, and return at once."""
        self.worker.check()  # a failed host task stops training here rather than after the next forward
        hparams = snapshot_groups(optimizer)
        per_unit = split_params(optimizer, self._owner, len(self.units))
        state = None
        if self.coll is not None:
            # every rank of the node is done reading the shared parameters and gradients (hooks) before
            # any rank starts changing its part of them
            self._wait_node()
            self.coll.board.barrier(self.coll.timeout_s, "the optimizer step")
            # data parallel: each rank steps the elements it owns, with its own optimizer state for them
            per_unit = [[[self._shard_params[id(p)].param for p in ps if id(p) in self._shard_params] for ps in groups] for groups in per_unit]
            state = self._shard_state(optimizer)
        self.slots.invalidate()
        pending = self.streams.record_all()
        if pending:
            def sync_pending() -> None:
                for e in pending:
                    e.synchronize()

            self.worker.submit(sync_pending)
        gate = self.gate
        for outer in self._outer.values():
            outer.issued = None  # the masters are about to change; the worker copies them again
            if self._bound and outer.bindings and outer.dev is not None:
                # a step inside training_step (manual optimization): this step's graph may still read
                # the current device copies, so the next ones go to fresh buffers
                outer.dev = torch.empty_like(outer.dev)
                outer.leaves = None
        for unit, params in zip(self.units, per_unit):

            def task(unit: Unit = unit, params: Any = params) -> None:
                if gate is not None:
                    gate(unit.index)
                start = time.perf_counter()
                if self.lean is not None:
                    # data parallel: the rank's own state (keyed by its pieces) is what is held narrow
                    holder = _StateHolder(state) if state is not None else optimizer
                    if state is not None:
                        self._shard_grads(params)
                    for piece in self.lean.chunks(params):
                        with self.lean.widened(holder, [p for ps in piece for p in ps]):
                            step_unit(optimizer, hparams, piece, kwargs, state=state)
                elif state is not None:
                    self._shard_grads(params)
                    step_unit(optimizer, hparams, params, kwargs, state=state)
                else:
                    step_unit(optimizer, hparams, params, kwargs)
                # fused optimizers update in place without bumping tensor versions: re-cast regardless
                unit.refresh_compute(force=True)
                self._stats.optimizer_s += time.perf_counter() - start
                outer = self._outer.get(unit.index)
                if outer is not None and self.streams.cuda and self.coll is None:  # (a collective: main thread only)
                    # prefetch: on its way to the device while the host steps the following units
                    with torch.cuda.device(self.device):
                        self._issue_outer(outer)

            unit.ticket = self.worker.submit(task)
        if self.coll is not None:
            self._steps += 1
            board, steps = self.coll.board, self._steps
            self.worker.submit(lambda: board.publish("step", steps))
        optimizer._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check that step ran
        if self._bound:
            self._unbind_outer()
            self._stale = True

    def wait(self) -> None:
        """Block until all host work (gradients, optimizer step) is done; in data parallel, also that of
        the node's other ranks (what they own of the shared parameters and gradients)."""
        self.worker.wait()
        if self.coll is not None and self.units:
            self._wait_node()

    def _wait_node(self) -> None:
        coll = self.coll
        coll.board.wait_all("backward", self._backwards, coll.timeout_s, "its share of the gradients")
        coll.board.wait_all("step", self._steps, coll.timeout_s, "its share of the optimizer step")

    # ----------------------------------------------------------------- data parallel: what a rank owns
    @property
    def collective(self) -> Any:
        """The data parallel groups (``engine.collective.Collective``), or None on one device."""
        return self.coll

    def owned(self, param: torch.Tensor) -> tuple[int, int]:
        """The flat elements ``[lo, hi)`` of a module parameter this rank owns; ``(0, 0)`` if none. On one
        device every parameter is owned whole."""
        if self.coll is None:
            return (0, param.numel())
        found = self._entry_of.get(id(param))
        if found is None:
            return (0, 0)
        unit, e = found
        return unit.own.get(id(e), (0, 0))

    def _shard_state(self, optimizer: Optimizer) -> Any:
        return self._shard_states.setdefault(id(optimizer), defaultdict(dict))

    def _shard_grads(self, params: list[list[torch.Tensor]]) -> None:
        """Point each owned piece's ``.grad`` at its part of the parameter's (shared) gradient."""
        by_param = self._shard_by_piece
        for group in params:
            for p in group:
                sp = by_param[id(p)]
                g = sp.entry.param.grad
                p.grad = None if g is None else g.view(-1)[sp.a : sp.b]

    def _owned_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            sp = self._shard_params.get(id(p))
            if sp is not None and p.grad is not None:
                out.append(p.grad.view(-1)[sp.a : sp.b])
        return out

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, each rank scaling the elements it owns
        (the gradients are shared: scaling them whole on every rank would scale them N times)."""
        import torch.distributed as dist

        self.wait()
        norm_type = float(norm_type)
        grads = self._owned_grads(list(params))
        inf = norm_type == float("inf")
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
            local = norms.max() if inf else norms.pow(norm_type).sum()
        else:
            local = torch.zeros(())
        total = local.to(torch.float32).reshape(1).to(self.device)
        self.coll.all_reduce(total, dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        total = total[0].cpu()
        if not inf:
            total = total.pow(1.0 / norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)  # (the all-reduce above: every rank had finished reading the gradients)
        self.coll.board.barrier(self.coll.timeout_s, "gradient clipping")  # ... and all are clipped now
        return total

    def clip_grad_value_(self, params: Sequence[torch.Tensor], clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_``, each rank clamping the elements it owns."""
        self.wait()
        self.coll.board.barrier(self.coll.timeout_s, "gradient clipping")  # nobody reads them any more
        with torch.no_grad():
            for g in self._owned_grads(list(params)):
                g.clamp_(-clip_value, clip_value)
        self.coll.board.barrier(self.coll.timeout_s, "gradient clipping")  # all are clipped now

    def shard_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` of what this rank holds: per parameter (indexed as the optimizer's
        own ``state_dict`` does), flat state tensors hold the elements :meth:`owned` names; 0-d ones
        (Adam's ``step``) are whole. Parameters this rank owns nothing of are absent."""
        self.wait()
        state = self._shard_state(optimizer)
        out_state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for group in optimizer.param_groups:
            ids = []
            for p in group["params"]:
                sp = self._shard_params.get(id(p))
                if sp is not None and sp.param in state:
                    out_state[index] = dict(state[sp.param])
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": out_state, "param_groups": groups}

    def load_shard_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        """Restore from a state dict whose per-parameter tensors are whole (a single-device checkpoint),
        or anything with ``.slice(lo, hi)`` (a checkpoint written by several ranks): this rank takes the
        elements it owns."""
        self.wait()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError(f"the optimizer state has {len(saved_groups)} parameter groups, the optimizer {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        state = self._shard_state(optimizer)
        state.clear()
        for key, values in state_dict["state"].items():
            p = params[int(key)]
            sp = self._shard_params.get(id(p))
            if sp is None:
                continue
            held = {}
            for name, v in values.items():
                if hasattr(v, "slice") and not isinstance(v, torch.Tensor):
                    held[name] = v.slice(sp.a, sp.b).to(torch.float32 if v.dtype.is_floating_point else v.dtype).clone()
                elif isinstance(v, torch.Tensor) and v.dim() > 0:
                    if v.numel() != p.numel():
                        raise ValueError(f"optimizer state {name!r} of parameter {int(key)} has {v.numel()} elements, the parameter {p.numel()}")
                    held[name] = v.reshape(-1)[sp.a : sp.b].clone()
                elif isinstance(v, torch.Tensor):
                    held[name] = v.clone()
                else:
                    held[name] = v
            state[sp.param] = held
        if self.lean is not None:
            self.lean.narrow(_StateHolder(state), [sp.param for sp in self._shard_params.values()])  # type: ignore[arg-type]

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
        for outer in self._outer.values():
            outer.bindings = []
            outer.fired = set()
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
            self._unbind_outer()

    def rebind(self) -> None:
        """Device copies of the input-side parameters, waiting only for their own update; the output
        side follows when first needed (its update is the last of the optimizer step)."""
        self._stale = False
        self._bind_outer(self._outer[self.outer_in.index])
        self._out_pending = True
        if not self.layers:
            self._bind_out_if_pending()

    def _bind_out_if_pending(self) -> None:
        if self._bound and self._out_pending:
            self._out_pending = False
            self._bind_outer(self._outer[self.outer_out.index])

    def _unbind_outer(self) -> None:
        self._out_pending = False
        self.outer_in.unbind()
        self.outer_out.unbind()

    def _issue_outer(self, outer: _OuterCopy) -> None:
        """Copy the unit's image into ``dev`` on the H2D stream (any thread)."""
        unit = outer.unit
        unit.refresh_compute()
        streams = self.streams
        streams.wait(streams.h2d, outer.free)
        if outer.shard is not None:
            self._gather(outer.dev, outer.shard, unit, self._shard[unit.index])
        else:
            streams.copy(streams.h2d, outer.dev, unit.compute)
        outer.ready.record(streams.h2d)
        outer.issued = unit._version()
        self._stats.h2d_bytes += outer.dev.numel()

    def _bind_outer(self, outer: _OuterCopy) -> None:
        unit = outer.unit
        self._wait_ticket(unit.ticket)
        self._check_trainable(unit)
        if not unit.entries:
            return
        changed = outer.issued != unit._version()  # not prefetched (CPU, first step) or changed since
        if outer.leaves is None or changed:
            if changed:
                outer.free.record(self.streams.compute())
                self._issue_outer(outer)
            outer.leaves = [self._outer_leaf(outer, e) for e in unit.entries]
        # also when the leaves are reused: the host worker may have copied the updated values into the
        # same device buffer since (after an optimizer step), and the kernels must wait for that copy
        compute = self.streams.compute()
        self.streams.wait(compute, outer.ready)
        outer.free.record(compute)
        unit.bind(outer.leaves)
        if not outer.bindings or outer.bindings[-1] is not outer.leaves:
            outer.bindings.append(outer.leaves)

    def _outer_leaf(self, outer: _OuterCopy, e: Entry) -> nn.Parameter:
        leaf = nn.Parameter(outer.unit.param_view(outer.dev, e), requires_grad=e.goffset is not None)
        if outer.side == "output" and e.goffset is not None:
            # the output side's gradients are final early in backward: send them home then
            leaf.register_post_accumulate_grad_hook(lambda t, outer=outer: self._grad_final(outer, t))
        return leaf

    def _grad_final(self, outer: _OuterCopy, leaf: torch.Tensor) -> None:
        if len(outer.bindings) != 1 or outer.leaves is not outer.bindings[0]:
            return  # several bindings in this step (manual optimization): after_backward sums them
        if self.coll is not None:
            # data parallel: whether every leaf got a gradient may differ between ranks, and the send is a
            # collective: every rank sends in after_backward, in the same order
            return
        outer.fired.add(id(leaf))
        trainable = [leaf for leaf, e in zip(outer.leaves, outer.unit.entries) if e.goffset is not None]
        if all(id(t) in outer.fired for t in trainable):
            outer.fired = set()
            self._flush_outer(outer)

    def _before_outer_module(self, module: nn.Module, args: Any) -> None:
        # Inside one training_step (manual optimization) the host parameters are put back after each
        # backward, so that clipping and hooks see them with their gradients; the next module call
        # binds the device copies again.
        if self._bound and self._stale:
            self.rebind()
        if id(module) in self._out_owners:
            self._bind_out_if_pending()

    def after_backward(self) -> None:
        """Send the non-layer gradients home and wait until every gradient of this backward is on the host.

        The wait is what Lightning's contract needs: ``on_after_backward``, clipping and
        ``on_before_optimizer_step`` read complete host gradients right after ``backward``.
        """
        for outer in self._outer.values():
            outer.fired = set()
            self._flush_outer(outer)
        self.worker.wait()
        if self.coll is not None:
            # every rank of the node has added its part: the shared gradients are whole
            self._backwards += 1
            self.coll.board.publish("backward", self._backwards)
            self._wait_node()
        if self._bound:
            self._unbind_outer()
            self._stale = True

    def _flush_outer(self, outer: _OuterCopy) -> None:
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
                    packed = torch.zeros(unit.gnumel, dtype=torch.float32, device=self.device)
                packed[e.goffset : e.goffset + e.numel].add_(leaf.grad.reshape(-1))
                leaf.grad = None
                produced[i] = True
        if packed is None and self.coll is not None and unit.gnumel:
            # data parallel: the reduce-scatter is a collective every rank takes part in, with zeros if
            # this rank's loss did not reach these parameters
            packed = torch.zeros(unit.gnumel, dtype=torch.float32, device=self.device)
        if packed is not None:
            if self.coll is not None:
                out = torch.empty(self._shard[unit.index].gchunk * self.coll.size, dtype=packed.dtype, device=self.device)
                padded = self._pack_padded(unit, trainable, [packed[e.goffset : e.goffset + e.numel] for e in trainable], out)
                self._send(unit, padded, self._staging[unit.index].buffers[0], produced, release=None)
                return
            if unit.staging.dtype != packed.dtype:
                packed = packed.to(unit.staging.dtype)  # on the device: the D2H is a plain copy
            self._send(unit, packed, unit.staging, produced, release=None)

    def _pack_padded(self, unit: Unit, trainable: list[Entry], grads: Sequence[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """Data parallel: the unit's gradients laid out for reduce-scatter (rank s's elements at s*gchunk);
        a parameter with no gradient on this rank contributes zeros."""
        shard = self._shard[unit.index]
        dev = out[: shard.gchunk * self.coll.size]
        by_entry = {id(e): g for e, g in zip(trainable, grads)}
        for e, a, b, dst in shard.pack:
            g = by_entry[id(e)]
            if g is None:
                dev[dst : dst + b - a].zero_()
            else:
                dev[dst : dst + b - a].copy_(g.reshape(-1)[a:b])
        return dev

    def _send(self, unit: Unit, dev: torch.Tensor, host: torch.Tensor, produced: list[bool], release: GradChannel | None) -> None:
        streams = self.streams
        compute = streams.compute()
        packed, done = (release.packed, release.done) if release is not None else (streams.event(), streams.event())
        packed.record(compute)
        streams.wait(streams.d2h, packed)
        if release is None and streams.cuda:
            dev.record_stream(streams.d2h)  # allocated on the compute stream, read on the D2H stream
        shard = self._shard.get(unit.index)
        if shard is not None:
            # data parallel: reduce-scatter on the D2H stream (overlapping the next layer's backward),
            # then this rank's shard, averaged over the world, goes home
            rs = release.rs if release is not None else torch.empty(shard.gchunk, dtype=dev.dtype, device=self.device)
            if release is None and streams.cuda:
                rs.record_stream(streams.d2h)
            with streams.on(streams.d2h):
                self.coll.reduce_scatter(rs[: shard.gchunk], dev)
            dev = rs[: shard.gnumel]
        streams.copy(streams.d2h, host[: dev.numel()], dev)
        done.record(streams.d2h)
        self._stats.d2h_bytes += dev.numel() * dev.element_size()

        board = self.coll.board if self.coll is not None else None

        def task(dev: torch.Tensor = dev) -> None:  # holds the device buffer until its copy is done
            if board is not None:
                # behind a reduce-scatter: a peer that died would block synchronize() for good (NCCL does
                # not notice a dead peer on its node); poll, and fail naming it
                while not done.query():
                    board.check(what="a gradient reduce-scatter")
                    time.sleep(2e-4)
            done.synchronize()
            start = time.perf_counter()
            if shard is not None:
                unit.accumulate_owned(host[: dev.numel()], shard.glo)
            else:
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
        if self.coll is None:
            return self.slots.load(unit, unit.compute, keep=keep)
        shard = self._shard[unit.index]

        def fill(slot: Any) -> int:  # on the H2D stream: this rank's bytes, then the layer from every rank
            self._gather(slot.buf, slot.shard, unit, shard)
            return shard.chunk

        return self.slots.load(unit, unit.compute, keep=keep, fill=fill)

    def _gather(self, dst: torch.Tensor, tmp: torch.Tensor, unit: Unit, shard: Any) -> None:
        """Copy this rank's image bytes to the device and all-gather the unit into ``dst``, queued on
        the H2D stream (which waits for the collective: no host synchronisation)."""
        streams = self.streams
        streams.copy(streams.h2d, tmp[: shard.chunk], unit.compute[shard.lo : shard.lo + shard.chunk])
        with streams.on(streams.h2d):
            self.coll.all_gather(dst[: shard.chunk * self.coll.size], tmp[: shard.chunk])

    def _views(self, unit: Unit, slot: Any, grad: bool) -> list[torch.Tensor]:
        views = [unit.param_view(slot.buf, e) for e in unit.entries]
        if grad:
            views = [v.detach().requires_grad_(e.goffset is not None) for v, e in zip(views, unit.entries)]
        return views

    def _run_layer(self, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> Any:
        out = self._run_layer_inner(unit, fn, args, kwargs)
        if unit is self.layer_units[-1]:
            self._bind_out_if_pending()  # the head and final norm come next
        return out

    def _run_layer_inner(self, unit: Unit, fn: Any, args: tuple, kwargs: dict) -> Any:
        if torch.is_grad_enabled():
            call = LayerCall(self, unit, fn, *strip_caches(args, kwargs))
            tensors = call.take_tensors()
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
        """The next host buffer for an offloaded input, reused step to step.

        Each position in the step's order owns one arena of raw bytes, sized to a size class (at most
        25% above the request) and only ever grown, so steps whose sequence lengths vary reuse the same
        page-locked memory instead of unregistering and registering it again (a slow, synchronising call).
        """
        index = self._act_used
        self._act_used += 1
        nbytes = numel * dtype.itemsize
        pin = self.config.pin_memory and self.device.type == "cuda"
        arena = self._act_arenas[index] if index < len(self._act_arenas) else None
        if arena is None or arena.nbytes < nbytes:
            if arena is not None:
                arena.release()
            arena = HostArena([(_size_class(nbytes), torch.uint8)], pin=pin)
            if index < len(self._act_arenas):
                self._act_arenas[index] = arena
            else:
                self._act_arenas.append(arena)
        return arena.buffers[0][:nbytes].view(dtype)

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
                    trainable = [e for e in unit.entries if e.goffset is not None]
                    if self.coll is not None:
                        dev = self._pack_padded(unit, trainable, weight_grads, channel.dev)
                        produced = [True] * len(trainable)
                    else:
                        dev = channel.dev[: unit.gnumel]
                        for e, g in zip(trainable, weight_grads):
                            dst = channel.dev[e.goffset : e.goffset + e.numel]
                            if g is None:
                                dst.zero_()
                                produced.append(False)
                            else:
                                dst.copy_(g.reshape(-1))
                                produced.append(True)
                self._send(unit, dev, channel.host, produced, release=channel)
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
                coll = getattr(self, "coll", None)
                if coll is not None and self.units and not coll.board.failed(coll.rank):
                    # the parameters stay views of the shared memory: the other ranks' last updates
                    # must be in it before anyone reads them after training
                    self._wait_node()
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
        for handle in getattr(self, "_hook_handles", []):
            handle.remove()
        self._hook_handles = []
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
        for path in getattr(self, "_shm_files", []):  # a setup that failed before every rank mapped them
            try:
                os.unlink(path)
            except OSError:
                pass
        self._shm_files = []
        for pinned in getattr(self, "_pinned", []):
            pinned.release()
        self._pinned = []
        for arena in getattr(self, "_staging", {}).values():
            arena.release()
        self._staging = {}
        for act in getattr(self, "_act_arenas", []):
            act.release()
        self._act_arenas = []
        arena = getattr(self, "_channel_arena", None)
        if arena is not None:
            arena.release()
            self._channel_arena = None
        self._outer = {}
        self.slots = None  # type: ignore[assignment]
        self.channels = None  # type: ignore[assignment]
