"""Data parallel: the ranks of a node share the host arenas, each owning, copying, reducing and stepping 1/N.

The data parallel side of the placement (``whole.py`` is the single-device side, with the same
methods). Which bytes a rank owns is worked out in ``collective.py``; this file applies it along one
micro-batch: the layer is gathered on the device from every rank's bytes, gradients are
reduce-scattered, each rank adds and steps its own elements, and the node's ranks wait for each
other through counters in shared memory before anyone reads the whole model.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .config import Stats
from .host import HostArena, PinnedRange
from .materialize import Materializer
from .stepper import step_unit
from .stream import GradChannel, Slot, Streams
from .units import Entry, Unit, image_layout, stream_dtypes


@dataclass
class _StateHolder:
    """What ``LeanState`` reads of an optimizer (its ``state``), for a rank's own state in data parallel."""

    state: Any
    param_groups: list = field(default_factory=list)


@dataclass
class _ShardParam:
    """The elements ``[a, b)`` of one parameter this rank owns, as a parameter of their own (a view of
    the shared master) that the optimizer steps, with its own optimizer state."""

    param: nn.Parameter
    entry: Entry
    a: int
    b: int


class NodeShards:
    """This rank's share of node-shared units (``engine.collective.Collective`` says who is who)."""

    send_early = False  # the gradient send is a collective: every rank sends in after_backward, in order
    prefetch_from_worker = False  # a collective is issued from the main thread only
    waits_after_backward = True  # the ranks publish their added shares after each backward
    keeps_residency = False  # a slot fill is a collective: every rank drops residency at each step alike
    steps_early = False  # gradients are reduce-scattered across the ranks first; the step follows backward

    def __init__(self, coll: Any, streams: Streams, device: torch.device, stats: Stats) -> None:
        self.coll, self.streams, self.device, self.stats = coll, streams, device, stats
        self.shards: dict[int, Any] = {}  # unit index -> UnitShard
        self.shm_files: list[str] = []
        self.staging: dict[int, HostArena] = {}
        self.pinned: list[PinnedRange] = []
        self.shard_params: dict[int, _ShardParam] = {}
        self.entry_of: dict[int, tuple[Unit, Entry]] = {}
        self.by_piece: dict[int, _ShardParam] = {}
        self.steps = 0  # optimizer steps launched; the node's board says how many each rank finished
        self.backwards = 0
        self.states: dict[int, Any] = {}

    # ----------------------------------------------------------------- setup
    def host_threads(self, cores: int) -> int:
        # the node's cores are shared by its ranks: each worker takes its share, less the training thread
        return max(1, cores // self.coll.size - 1)

    def plans_checked(self) -> None:
        # every rank of the node has checked the plan against free memory before any allocates the
        # node's shared arenas (a later check would count them as taken)
        self.coll.barrier()

    def before_units(self) -> None:
        if self.coll.rank != 0:
            self.coll.barrier()  # the node's first rank fills the shared arenas first

    def make_unit(
        self, name: str, index: int, entries: list[Entry], dtype: torch.dtype, pin: bool, staging: bool,
        module: nn.Module | None = None, materialize: Materializer | None = None,
    ) -> Unit:
        """The unit in node-shared memory; the node's first rank fills it (and reads any weights file)."""
        coll = self.coll
        dtypes = stream_dtypes([e.param for e in entries], [e.goffset is not None for e in entries], dtype)
        nbytes = image_layout(dtypes, [e.numel for e in entries])[1]
        path = coll.shm_path(name)
        if coll.rank == 0:
            self.shm_files.append(path)
        # gradient staging is per rank (each receives its own shard): kept out of the shared arena;
        # pinned later, each rank only the image bytes it copies to its GPU (after_units)
        return Unit(
            name, index, entries, dtype, pin=False, staging=False, module=module, shared=path, fill=coll.rank == 0,
            image_bytes=coll.chunk(nbytes) * coll.size, materialize=materialize,
        )

    def after_units(self, units: list[Unit], outer: Sequence[Unit], pin: bool) -> None:
        """After every rank of the node has mapped the shared arenas: remove their files (the mappings
        stay; nothing is left behind whatever happens next), and work out what this rank owns."""
        from .collective import shard_unit

        coll = self.coll
        if coll.rank == 0:
            coll.barrier()  # filled: the other ranks map them now
        coll.barrier()  # every rank has mapped them
        for path in self.shm_files:
            os.unlink(path)
        self.shm_files = []
        for unit in units:
            shard = shard_unit(unit.entries, unit.nbytes, coll.rank, coll.size, coll.chunk(unit.nbytes))
            self.shards[unit.index] = shard
            unit.own = shard.ranges
            if pin:
                self.pinned.append(PinnedRange(unit.compute[shard.lo : shard.lo + shard.chunk]))
            if coll.replicas is not None:
                # every node starts from node 0's weights: each rank sends/receives what it owns
                for e in unit.entries:
                    a, b = shard.ranges.get(id(e), (0, 0))
                    if b > a:
                        coll.broadcast_from_node0(unit.store_view(e).view(-1)[a:b], self.device)
                unit._synced = {}  # every streamed copy from node 0's values, frozen ones too
                unit.refresh_compute()
            for e in unit.entries:
                self.entry_of[id(e.param)] = (unit, e)
                a, b = shard.ranges.get(id(e), (0, 0))
                if e.goffset is not None and b > a:
                    sp = nn.Parameter(unit.store_view(e).view(-1)[a:b])
                    self.shard_params[id(e.param)] = _ShardParam(sp, e, a, b)
            if unit.staging is None and unit in outer and shard.gchunk:
                self.staging[unit.index] = HostArena([(shard.gchunk, torch.float32)], pin=pin)
        self.by_piece = {id(sp.param): sp for sp in self.shard_params.values()}

    def slot_geometry(self, layer_units: Sequence[Unit]) -> tuple[int, int, int]:
        """A slot holds the gathered (padded) image; each rank receives its gradient shard."""
        shards = [self.shards[u.index] for u in layer_units]
        if not shards:
            return 0, 0, 0
        host_gnumel = max(sh.gchunk for sh in shards)
        return max(sh.chunk for sh in shards) * self.coll.size, host_gnumel * self.coll.size, host_gnumel

    def fit_slot(self, slot: Slot) -> None:
        slot.shard = torch.empty(slot.buf.numel() // self.coll.size, dtype=torch.uint8, device=self.device)

    def fit_channel(self, channel: GradChannel, host_gnumel: int) -> None:
        channel.rs = torch.empty(host_gnumel, dtype=channel.dev.dtype, device=self.device)

    def outer_buffers(self, unit: Unit) -> tuple[torch.Tensor, torch.Tensor | None]:
        shard = self.shards[unit.index]
        dev = torch.empty(shard.chunk * self.coll.size, dtype=torch.uint8, device=self.device)
        return dev, torch.empty(shard.chunk, dtype=torch.uint8, device=self.device)

    # ----------------------------------------------------------------- weights in
    def slot_fill(self, unit: Unit) -> Callable[[Slot], int]:
        shard = self.shards[unit.index]

        def fill(slot: Slot) -> int:  # on the H2D stream: this rank's bytes, then the layer from every rank
            self.gather(slot.buf, slot.shard, unit)
            return shard.chunk

        return fill

    def copy_outer(self, dev: torch.Tensor, shard: torch.Tensor | None, unit: Unit) -> None:
        self.gather(dev, shard, unit)

    def gather(self, dst: torch.Tensor, tmp: torch.Tensor, unit: Unit) -> None:
        """Copy this rank's image bytes to the device and all-gather the unit into ``dst``, queued on
        the H2D stream (which waits for the collective: no host synchronisation)."""
        shard, streams = self.shards[unit.index], self.streams
        streams.copy(streams.h2d, tmp[: shard.chunk], unit.compute[shard.lo : shard.lo + shard.chunk])
        with streams.on(streams.h2d):
            self.coll.all_gather(dst[: shard.chunk * self.coll.size], tmp[: shard.chunk])

    # ----------------------------------------------------------------- gradients out
    def pack_padded(self, unit: Unit, trainable: list[Entry], grads: Sequence[torch.Tensor | None], out: torch.Tensor) -> torch.Tensor:
        """The unit's gradients laid out for reduce-scatter (rank s's elements at s*gchunk); a parameter
        with no gradient on this rank contributes zeros."""
        shard = self.shards[unit.index]
        dev = out[: shard.gchunk * self.coll.size]
        by_entry = {id(e): g for e, g in zip(trainable, grads)}
        for e, a, b, dst in shard.pack:
            g = by_entry[id(e)]
            if g is None:
                dev[dst : dst + b - a].zero_()
            else:
                dev[dst : dst + b - a].copy_(g.reshape(-1)[a:b])
        return dev

    def pack_layer(self, unit: Unit, trainable: list[Entry], grads: Sequence[torch.Tensor | None], channel: GradChannel) -> tuple[torch.Tensor, list[bool]]:
        return self.pack_padded(unit, trainable, grads, channel.dev), [True] * len(trainable)

    def pack_outer(self, unit: Unit, trainable: list[Entry], packed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if packed is None:
            if not unit.gnumel:
                return None
            # the reduce-scatter is a collective every rank takes part in, with zeros if this rank's
            # loss did not reach these parameters
            packed = torch.zeros(unit.gnumel, dtype=torch.float32, device=self.device)
        out = torch.empty(self.shards[unit.index].gchunk * self.coll.size, dtype=packed.dtype, device=self.device)
        padded = self.pack_padded(unit, trainable, [packed[e.goffset : e.goffset + e.numel] for e in trainable], out)
        return padded, self.staging[unit.index].buffers[0]

    def reduce(self, unit: Unit, dev: torch.Tensor, release: GradChannel | None) -> torch.Tensor:
        """Reduce-scatter on the D2H stream (overlapping the next layer's backward); this rank's shard,
        averaged over the world, is what goes home."""
        shard, streams = self.shards[unit.index], self.streams
        rs = release.rs if release is not None else torch.empty(shard.gchunk, dtype=dev.dtype, device=self.device)
        if release is None and streams.cuda:
            rs.record_stream(streams.d2h)
        with streams.on(streams.d2h):
            self.coll.reduce_scatter(rs[: shard.gchunk], dev)
        return rs[: shard.gnumel]

    def consume(self, unit: Unit, host: torch.Tensor, numel: int, produced: list[bool], done: Any) -> None:
        board = self.coll.board
        # behind a reduce-scatter: a peer that died would block synchronize() for good (NCCL does not
        # notice a dead peer on its node); poll, and fail naming it
        while not done.query():
            board.check(what="a gradient reduce-scatter")
            time.sleep(2e-4)
        done.synchronize()
        start = time.perf_counter()
        unit.accumulate_owned(host[:numel], self.shards[unit.index].glo)
        self.stats.accumulate_s += time.perf_counter() - start

    def after_backward(self) -> None:
        # every rank of the node has added its part: the shared gradients are whole
        self.backwards += 1
        self.coll.board.publish("backward", self.backwards)
        self.wait_node()

    # ----------------------------------------------------------------- the optimizer step
    def wait(self) -> None:
        self.wait_node()

    def wait_node(self) -> None:
        coll = self.coll
        coll.board.wait_all("backward", self.backwards, coll.timeout_s, "its share of the gradients")
        coll.board.wait_all("step", self.steps, coll.timeout_s, "its share of the optimizer step")

    def before_step(self) -> None:
        # every rank of the node is done reading the shared parameters and gradients (hooks) before
        # any rank starts changing its part of them
        self.wait_node()
        self.coll.board.barrier(self.coll.timeout_s, "the optimizer step")

    def step_params(self, per_unit: list[list[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
        """Each rank steps the elements it owns, as parameters of their own."""
        return [[[self.shard_params[id(p)].param for p in ps if id(p) in self.shard_params] for ps in groups] for groups in per_unit]

    def step_state(self, optimizer: Optimizer) -> Any:
        return self.states.setdefault(id(optimizer), defaultdict(dict))

    def update(self, unit: Unit, optimizer: Optimizer, hparams: list[dict[str, Any]], params: list[list[torch.Tensor]], kwargs: dict[str, Any], state: Any, lean: Any) -> None:
        """Step this rank's pieces of one unit, then re-cast what it owns of the streamed copy."""
        self.step(optimizer, hparams, params, kwargs, state, lean)
        # fused optimizers update in place without bumping tensor versions: re-cast regardless
        unit.refresh_compute(force=True)

    def step(self, optimizer: Optimizer, hparams: list[dict[str, Any]], params: list[list[torch.Tensor]], kwargs: dict[str, Any], state: Any, lean: Any) -> None:
        self.shard_grads(params)
        if lean is None:
            step_unit(optimizer, hparams, params, kwargs, state=state)
            return
        holder = _StateHolder(state)  # the rank's own state (keyed by its pieces) is what is held narrow
        for piece in lean.chunks(params):
            with lean.widened(holder, [p for ps in piece for p in ps]):
                step_unit(optimizer, hparams, piece, kwargs, state=state)

    def after_step(self, worker: Any) -> None:
        self.steps += 1
        board, steps = self.coll.board, self.steps
        worker.submit(lambda: board.publish("step", steps))

    def shard_grads(self, params: list[list[torch.Tensor]]) -> None:
        """Point each owned piece's ``.grad`` at its part of the parameter's (shared) gradient."""
        for group in params:
            for p in group:
                sp = self.by_piece[id(p)]
                g = sp.entry.param.grad
                p.grad = None if g is None else g.view(-1)[sp.a : sp.b]

    # ----------------------------------------------------------------- what a rank owns
    def owned(self, param: torch.Tensor) -> tuple[int, int]:
        found = self.entry_of.get(id(param))
        if found is None:
            return (0, 0)
        unit, e = found
        return unit.own.get(id(e), (0, 0))

    def owned_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            sp = self.shard_params.get(id(p))
            if sp is not None and p.grad is not None:
                out.append(p.grad.view(-1)[sp.a : sp.b])
        return out

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model, each rank scaling the elements it owns
        (the gradients are shared: scaling them whole on every rank would scale them N times)."""
        import torch.distributed as dist

        norm_type = float(norm_type)
        grads = self.owned_grads(list(params))
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
        self.coll.board.barrier(self.coll.timeout_s, "gradient clipping")  # nobody reads them any more
        with torch.no_grad():
            for g in self.owned_grads(list(params)):
                g.clamp_(-clip_value, clip_value)
        self.coll.board.barrier(self.coll.timeout_s, "gradient clipping")  # all are clipped now

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` of what this rank holds: per parameter (indexed as the optimizer's
        own ``state_dict`` does), flat state tensors hold the elements :meth:`owned` names; 0-d ones
        (Adam's ``step``) are whole. Parameters this rank owns nothing of are absent."""
        state = self.step_state(optimizer)
        out_state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for group in optimizer.param_groups:
            ids = []
            for p in group["params"]:
                sp = self.shard_params.get(id(p))
                if sp is not None and sp.param in state:
                    out_state[index] = dict(state[sp.param])
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": out_state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any], lean: Any) -> None:
        """Restore from a state dict whose per-parameter tensors are whole (a single-device checkpoint),
        or anything with ``.slice(lo, hi)`` (a checkpoint written by several ranks): this rank takes the
        elements it owns."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise ValueError(f"the optimizer state has {len(saved_groups)} parameter groups, the optimizer {len(optimizer.param_groups)}")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        state = self.step_state(optimizer)
        state.clear()
        for key, values in state_dict["state"].items():
            p = params[int(key)]
            sp = self.shard_params.get(id(p))
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
        if lean is not None:
            lean.narrow(_StateHolder(state), [sp.param for sp in self.shard_params.values()])  # type: ignore[arg-type]

    def hand_back_state(self, optimizer: Optimizer) -> None:
        """After training: this rank's optimizer state into ``optimizer.state``, keyed by the module's own
        parameters (1-D tensors of the elements :meth:`owned` names, 0-d ones whole), so it can be read and
        saved as in one process. Nothing changes if this runtime never stepped nor loaded ``optimizer``."""
        state = self.states.get(id(optimizer))
        if not state:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                sp = self.shard_params.get(id(p))
                if sp is not None and sp.param in state:
                    optimizer.state[p] = state[sp.param]

    # ----------------------------------------------------------------- teardown
    def detach(self, units_live: bool) -> None:
        """The parameters stay views of the shared memory: the other ranks' last updates must be in it
        before anyone reads them after training (skipped on a rank marked failed: its peers may be
        blocked on it)."""
        coll = self.coll
        if units_live and not coll.board.failed(coll.rank):
            self.wait_node()

    def release(self) -> None:
        for path in self.shm_files:  # a setup that failed before every rank mapped them
            try:
                os.unlink(path)
            except OSError:
                pass
        self.shm_files = []
        for pinned in self.pinned:
            pinned.release()
        self.pinned = []
        for arena in self.staging.values():
            arena.release()
        self.staging = {}
