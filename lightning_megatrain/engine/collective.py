"""Data parallel megatrain: process groups, node-shared host arenas, and which bytes each rank owns.

Only imported when more than one process trains (the single-device path never touches it).

The ranks of a node share one copy of the training state: every unit's host arena (fp32 masters,
fp32 gradients, the streamed image) is a file in node-shared memory (``/dev/shm``) that every rank of
the node maps. Each rank *owns* one contiguous 1/N of each unit's image bytes, and with them the
elements of each parameter whose streamed copy lies there: it copies only those bytes to its GPU (the
layer is all-gathered on the device), receives only their gradients (reduce-scattered on the device),
adds them into the shared fp32 gradient, and steps only their masters, with optimizer state for
only those elements in its own memory. Parameters and gradients stay whole, shared views, so
``parameters()``, ``state_dict()`` and hooks read the full model on every rank. Nodes are replicas:
the gradient shard is all-reduced across the ranks with the same local rank on every node.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .procs import pid_alive

ALIGN = 64  # bytes: rank boundaries in an image fall on element boundaries for every dtype


class CollectiveError(RuntimeError):
    """Another rank failed, died or did not arrive in time; the message names it."""


class NodeBoard:
    """A few counters per rank in node-shared memory, for waits that must not be collectives.

    A rank that reads the whole (shared) model must wait until every rank of its node has finished its
    part of the host work (its gradient shard of a backward, its optimizer shard of a step). Those
    readers (``parameters()``, ``state_dict()``, hooks) run where only one rank may call them, so the
    wait is on counters each rank's host worker publishes, not a barrier: it cannot deadlock, and a rank
    that died or stopped is named when the wait times out.
    """

    FIELDS = ("pid", "backward", "step", "failed", "arrive", "ckpt")  # ckpt: an async checkpoint write's progress
    FAILED, STOPPED = 1, 2  # "failed": its own error; "stopped": a collective failed under it (not the cause)

    def __init__(self, path: str, rank: int, size: int, create: bool) -> None:
        self.rank, self.size, self.path = rank, size, path
        n = size * len(self.FIELDS)
        self.table = torch.from_file(path, shared=True, size=n, dtype=torch.int64).view(size, len(self.FIELDS))
        if create:
            self.table.zero_()
        self.table[rank, 0] = os.getpid()

    def publish(self, name: str, value: int) -> None:
        self.table[self.rank, self.FIELDS.index(name)] = value

    def wait_all(self, name: str, value: int, timeout_s: float, what: str) -> None:
        """Until every rank's ``name`` counter is at least ``value``."""
        col = self.FIELDS.index(name)
        deadline = time.monotonic() + timeout_s
        delay = 1e-5
        while True:
            behind = [r for r in range(self.size) if int(self.table[r, col]) < value]
            if not behind:
                return
            self.check(behind, what)
            if time.monotonic() > deadline:
                raise CollectiveError(
                    f"rank(s) {behind} of this node did not finish {what} within {timeout_s:.0f} s "
                    f"(this is local rank {self.rank}); they may be stuck or much slower. Their pids: "
                    f"{[int(self.table[r, 0]) for r in behind]}."
                )
            time.sleep(delay)
            delay = min(delay * 2, 1e-2)

    def check(self, ranks: list[int] | None = None, what: str = "its work", blame_only: bool = False) -> None:
        """Raise :class:`CollectiveError` naming a rank of this node that failed or whose process is gone
        (``blame_only``: not one that only stopped because a collective failed under it)."""
        for r in ranks if ranks is not None else range(self.size):
            if r == self.rank:
                continue
            pid = int(self.table[r, 0])
            state = int(self.table[r, 3])
            if state == self.FAILED:
                raise CollectiveError(f"local rank {r} (pid {pid}) failed while this rank waited for {what}; see its log for the cause.")
            if state == self.STOPPED and not blame_only:
                raise CollectiveError(f"local rank {r} (pid {pid}) stopped (a collective failed under it) while this rank waited for {what}.")
            if pid and not pid_alive(pid):
                raise CollectiveError(f"local rank {r} (pid {pid}) is gone (killed or crashed) while this rank waited for {what}.")

    def barrier(self, timeout_s: float, what: str) -> None:
        """Every rank of the node has come here (as often as this one): a barrier in shared memory,
        without a collective (so no device synchronisation on a GPU)."""
        col = self.FIELDS.index("arrive")
        value = int(self.table[self.rank, col]) + 1
        self.table[self.rank, col] = value
        self.wait_all("arrive", value, timeout_s, what)

    def failed(self, rank: int) -> bool:
        return bool(int(self.table[rank, 3]))

    def mark_failed(self, state: int = 1) -> None:
        self.table[self.rank, 3] = state


@dataclass
class Collective:
    """The groups one rank trains in.

    ``group``: the ranks of this node, which share (and shard) one copy of the host state; ``rank`` and
    ``size`` are this rank's place in it. ``replicas``: the ranks with this local rank on every node
    (None on one node), across which gradient shards are all-reduced. Gradients are averaged over
    ``world_size`` ranks, as DDP does.
    """

    group: Any
    rank: int
    size: int
    world_size: int
    world_rank: int
    node: int = 0
    replicas: Any = None
    shm_dir: str = "/dev/shm"
    name: str = ""  # unique per job and node: the prefix of this node's shared-memory files
    timeout_s: float = 1800.0
    board: NodeBoard | None = field(default=None, repr=False)
    created: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def from_world(cls, ranks_per_node: int, timeout: timedelta | None = None, shm_dir: str | None = None) -> Collective:
        """Build the node and replica groups; every rank must call it, after ``init_process_group``."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % ranks_per_node:
            raise ValueError(f"world size {world} is not a multiple of the ranks per node ({ranks_per_node})")
        nodes = world // ranks_per_node
        node, local = divmod(rank, ranks_per_node)
        created: list[Any] = []  # the subgroups made here (several nodes), destroyed by close()
        if nodes == 1:
            group, replicas = dist.group.WORLD, None
        else:
            group = replicas = None
            for n in range(nodes):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(n * ranks_per_node, (n + 1) * ranks_per_node)))
                created.append(g)
                if n == node:
                    group = g
            for lr in range(ranks_per_node):
                g = dist.new_group([lr + n * ranks_per_node for n in range(nodes)])
                created.append(g)
                if lr == local:
                    replicas = g
        shm_dir = shm_dir or os.environ.get("MEGATRAIN_SHM_DIR", "/dev/shm")
        # one name per job and node, chosen by the node's first rank and sent to the others
        token = [uuid.uuid4().hex[:12] if local == 0 else None]
        dist.broadcast_object_list(token, src=node * ranks_per_node, group=group)
        timeout_s = timeout.total_seconds() if timeout is not None else 1800.0
        out = cls(group, local, ranks_per_node, world, rank, node, replicas, shm_dir, f"megatrain-{token[0]}-n{node}", timeout_s)
        out.created = created
        path = out.shm_path("board")
        if local == 0:
            out.board = NodeBoard(path, local, ranks_per_node, create=True)
        out.barrier()
        if local != 0:
            out.board = NodeBoard(path, local, ranks_per_node, create=False)
        out.barrier()
        if local == 0:
            os.unlink(path)  # every rank has it mapped: nothing is left behind, whatever happens next
        return out

    def close(self) -> None:
        """Destroy the subgroups this made (every rank calls it, as for their creation)."""
        for g in self.created:
            dist.destroy_process_group(g)
        self.created = []

    # ------------------------------------------------------------------ shared memory
    def shm_path(self, what: str) -> str:
        return os.path.join(self.shm_dir, f"{self.name}-{what}")

    def barrier(self) -> None:
        """All ranks of this node (a collective: only where every rank comes)."""
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------ geometry
    def chunk(self, nbytes: int) -> int:
        """Bytes of a unit image each rank owns (the image is padded to ``size`` of these)."""
        per = -(-nbytes // self.size)
        return -(-per // ALIGN) * ALIGN

    # ------------------------------------------------------------------ collectives on device tensors
    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> None:
        """``out`` (``size`` shards) from every rank's ``shard``, on the current stream's order."""
        dist.all_gather_into_tensor(out, shard, group=self.group)  # (also for one rank: one code path)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> None:
        """This rank's shard of the sum over all ranks of ``full``, averaged over the world."""
        dist.reduce_scatter_tensor(out, full, group=self.group)
        if self.replicas is not None:
            dist.all_reduce(out, group=self.replicas)
        out.div_(self.world_size)

    def broadcast_from_node0(self, t: torch.Tensor, device: torch.device) -> None:
        """Node 0's values of a host tensor on every node (the replicas start equal, as DDP's broadcast
        from rank 0 makes them); through ``device`` where the backend (NCCL) needs device tensors."""
        if self.replicas is None or not t.numel():
            return
        src = dist.get_global_rank(self.replicas, 0)
        if dist.get_backend(self.replicas) == "gloo":
            dist.broadcast(t, src=src, group=self.replicas)
            return
        dev = t.to(device)
        dist.broadcast(dev, src=src, group=self.replicas)
        t.copy_(dev.cpu())

    def all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Over this node's ranks (shards); replicas hold the same values."""
        if self.size > 1:
            dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=self.group)
        return t


@dataclass
class UnitShard:
    """Which part of one unit a rank owns, and where every rank's gradients go in the padded layout.

    Rank ``s`` owns image bytes ``[s*chunk, (s+1)*chunk)``, hence a contiguous element range of each
    parameter (``ranges``) and a contiguous range ``[gstarts[s], gstarts[s+1])`` of the unit's
    trainable elements (gradients are packed in entry order, like the image). Reduce-scatter needs
    equal pieces: on the device, rank ``s``'s gradient elements are placed at ``s*gchunk`` (``pack``).
    """

    chunk: int
    lo: int  # this rank's image bytes [lo, lo + chunk)
    ranges: dict[int, tuple[int, int]]  # id(entry) -> this rank's elements [a, b) (owned entries only)
    gstarts: list[int]
    gchunk: int
    pack: list[tuple[Any, int, int, int]]  # (entry, a, b, dst): trainable elements [a, b) go to padded dst

    @property
    def glo(self) -> int:
        return self.gstarts[self.rank]

    @property
    def gnumel(self) -> int:
        """Gradient elements this rank owns."""
        return self.gstarts[self.rank + 1] - self.gstarts[self.rank]

    rank: int = 0


def shard_unit(entries: list[Any], nbytes: int, rank: int, size: int, chunk: int) -> UnitShard:
    """The ownership of one unit (entries with ``boffset``, ``stream_dtype``, ``numel``, ``goffset``)."""

    def start(e: Any, s: int) -> int:  # first element of entry e at or after rank s's first byte
        k = e.stream_dtype.itemsize
        return min(max(-(-(s * chunk - e.boffset) // k), 0), e.numel)

    ranges = {}
    for e in entries:
        a, b = start(e, rank), start(e, rank + 1)
        if b > a:
            ranges[id(e)] = (a, b)
    trainable = [e for e in entries if e.goffset is not None]
    gstarts = [sum(start(e, s) for e in trainable) for s in range(size + 1)]
    gchunk = max((gstarts[s + 1] - gstarts[s] for s in range(size)), default=0)
    pack = []
    for e in trainable:
        for s in range(size):
            a, b = start(e, s), start(e, s + 1)
            if b > a:
                pack.append((e, a, b, s * gchunk + e.goffset + a - gstarts[s]))
    return UnitShard(chunk, rank * chunk, ranges, gstarts, gchunk, pack, rank)
