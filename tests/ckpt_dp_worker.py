"""A data-parallel checkpoint writer without the engine, for tests/test_checkpoint_dp.py.

Run under ``python -m torch.distributed.run --standalone --nproc_per_node=N ckpt_dp_worker.py SRC OUT``:
every rank loads the single-device checkpoint SRC, keeps the optimizer state of the elements it would
own at world size N (as the engine's ``shard_optimizer_state`` gives it) and saves with
``save_sharded_distributed``, in the scenarios the tests check:

- ``OUT/ok``: a normal save by all N ranks of one node;
- ``OUT/nodes``: N nodes of one rank each: only node 0 writes (the others are replicas);
- two overwrites of ``OUT/ok`` in which the last rank, then rank 0, fails in the middle of its writes:
  every rank records the error it raised in ``OUT/fail<who>-r<rank>.txt``.

Each rank records the files it wrote in ``OUT/files-<scenario>-r<rank>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_megatrain import checkpoint as ck


def param_shapes(optimizer_state: dict[str, Any]) -> list[tuple[int, ...]]:
    """Each parameter's shape (in param_groups order), from its full optimizer state."""
    n = sum(len(g["params"]) for g in optimizer_state["param_groups"])
    shapes = []
    for idx in range(n):
        full = [v for k, v in optimizer_state["state"][idx].items() if isinstance(v, torch.Tensor) and k != "step"]
        shapes.append(tuple(full[0].shape))
    return shapes


def owned(shapes: list[tuple[int, ...]], rank: int, world: int, unit: int = 4) -> list[tuple[int, int]]:
    """[lo, hi) of each parameter that ``rank`` owns, as the engine cuts them: consecutive parameters
    (``unit`` at a time, like a layer's) laid end to end in one flat image, cut in ``world`` equal
    contiguous chunks; a parameter may be split between ranks or lie in one rank's chunk."""
    out = []
    for first in range(0, len(shapes), unit):
        sizes = [torch.Size(s).numel() for s in shapes[first : first + unit]]
        chunk = -(-sum(sizes) // world)
        start, end = rank * chunk, (rank + 1) * chunk
        at = 0
        for n in sizes:
            lo, hi = max(start - at, 0), min(end - at, n)
            out.append((lo, hi) if lo < hi else (0, 0))
            at += n
    return out


def shard(optimizer_state: dict[str, Any], ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """This rank's part of a full optimizer state: 1-D slices of what it owns, 0-d tensors whole,
    nothing for parameters it owns nothing of."""
    state = {}
    for idx, pstate in optimizer_state["state"].items():
        lo, hi = ranges[idx]
        if hi > lo:
            state[idx] = {
                k: (v.reshape(-1)[lo:hi].clone() if isinstance(v, torch.Tensor) and k != "step" else v) for k, v in pstate.items()
            }
    return {**optimizer_state, "state": state}


def rank_checkpoint(full: dict[str, Any], rank: int, world: int) -> tuple[dict[str, Any], list[list[tuple[int, int, tuple[int, ...]]]]]:
    states, spans = [], []
    for osd in full["optimizer_states"]:
        shapes = param_shapes(osd)
        ranges = owned(shapes, rank, world)
        states.append(shard(osd, ranges))
        spans.append([(lo, hi, s) for (lo, hi), s in zip(ranges, shapes)])
    return {**full, "optimizer_states": states}, spans


class Recording:
    """Which files this rank's writers opened, and an injected failure in the middle of its writes."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.fail_after: int | None = None
        init, write = ck._ShardWriter.__init__, ck._ShardWriter.write
        recording = self

        def patched_init(writer: Any, path: Path, *args: Any, **kwargs: Any) -> None:
            recording.files.append(path.name)
            init(writer, path, *args, **kwargs)

        def patched_write(writer: Any, t: torch.Tensor) -> None:
            if recording.fail_after is not None:
                if recording.fail_after == 0:
                    raise OSError(28, "No space left on device (injected)")
                recording.fail_after -= 1
            write(writer, t)

        ck._ShardWriter.__init__ = patched_init  # type: ignore[method-assign]
        ck._ShardWriter.write = patched_write  # type: ignore[method-assign]


def main(src: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(out)
    full = ck.materialize(ck.load_sharded(src))
    rec = Recording()

    def save(name: str, local_rank: int, local_size: int, node: int) -> None:
        rec.files = []
        checkpoint, spans = rank_checkpoint(full, local_rank, local_size)
        ck.save_sharded_distributed(checkpoint, out_dir / "ok" if name.startswith("fail") else out_dir / name, spans,
                                    local_rank=local_rank, local_size=local_size, node=node, checksums=True)
        (out_dir / f"files-{name}-r{rank}.json").write_text(json.dumps(rec.files))

    save("ok", rank, world, 0)
    save("nodes", 0, 1, rank)
    for who in (world - 1, 0):
        rec.fail_after = 1 if rank == who else None
        try:
            save(f"fail{who}", rank, world, 0)
            message = "no error"
        except ck.CheckpointWriteError as err:
            message = str(err)
        rec.fail_after = None
        (out_dir / f"fail{who}-r{rank}.txt").write_text(message)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
