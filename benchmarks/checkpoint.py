"""Checkpoint benchmark: sharded save and load time, peak extra host memory, and the step-time stall
of a checkpoint with and without ``async_checkpoint``.

    python benchmarks/checkpoint.py --hidden 1024 --layers 12 --steps 12 --every 4 --out benchmarks/results/checkpoint.json
    python benchmarks/checkpoint.py --repeats 3 --no-training     # save/load only, with and without per-shard CRC-32

Runs on the GPU when there is one, otherwise on the CPU. Prints a table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import zlib
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import lightning_megatrain  # noqa: E402
from _machine import machine, save_json  # noqa: E402
from lightning_megatrain import checkpoint as ck  # noqa: E402
from lightning_megatrain.memory import HostMemoryPeak  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(L.LightningModule):
    def __init__(self, d: int, n: int, vocab: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.emb(batch[0])
        for b in self.blocks:
            x = b(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), batch[0].flatten())


    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _train(args: argparse.Namespace, root: Path, mode: str) -> dict[str, Any]:
    L.seed_everything(0)
    model = Model(args.hidden, args.layers)
    strategy = lightning_megatrain.MegaTrainStrategy(async_checkpoint=mode == "async", checkpoint_shard_bytes=args.shard_mib * 2**20)
    every = args.every

    class Timer(L.Callback):
        """Wall time from one batch start to the next, so a checkpoint's cost lands on its step."""

        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            self.starts.append(time.perf_counter())

    timer = Timer()
    callbacks: list[Any] = [timer]
    if mode != "none":
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        strategy=strategy, accelerator="auto", devices=1, max_steps=args.steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=mode != "none", callbacks=callbacks, precision=args.precision,
    )
    data = DataLoader(TensorDataset(torch.randint(0, 256, (args.steps * args.batch, args.seq))), batch_size=args.batch)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    return {
        "mode": mode,
        "checkpoints": args.steps // every if mode != "none" else 0,
        "median_step_s": statistics.median(steps[1:]),
        "max_step_s": max(steps[1:]),
        "fit_s": total,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--shard-mib", type=int, default=256)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--repeats", type=int, default=1, help="saves with and without checksums, alternating; medians reported")
    parser.add_argument("--no-training", action="store_true", help="only the save/load measurements")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        # save / load of one checkpoint, outside the training loop
        L.seed_everything(0)
        model = Model(args.hidden, args.layers)
        opt = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        state = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
        plain_s, summed_s = [], []
        for i in range(args.repeats):  # new names each time: no replacement of an older save is timed
            with HostMemoryPeak() as save_mem:
                t0 = time.perf_counter()
                ck.save_sharded(state, root / f"one-{i}", shard_bytes=args.shard_mib * 2**20)
                plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ck.save_sharded(state, root / f"summed-{i}", shard_bytes=args.shard_mib * 2**20, checksums=True)
            summed_s.append(time.perf_counter() - t0)
            if i:
                shutil.rmtree(root / f"one-{i}")
                shutil.rmtree(root / f"summed-{i - 1}")
        save_s, checksum_s = statistics.median(plain_s), statistics.median(summed_s)
        # the CPU cost alone (no disk): CRC-32 over every tensor of the state, in memory
        tensors = list(state["state_dict"].values()) + [
            v for s in state["optimizer_states"][0]["state"].values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
        ]
        t0 = time.perf_counter()
        for t in tensors:
            zlib.crc32(memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))
        crc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ck.load_sharded(root / f"summed-{args.repeats - 1}")  # reads every shard once to verify its CRC-32
        verify_s = time.perf_counter() - t0
        with HostMemoryPeak() as load_mem:
            t0 = time.perf_counter()
            loaded = ck.load_sharded(root / "one-0")
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(loaded["state_dict"][k])
            load_s = time.perf_counter() - t0
        single = {"state_bytes": nbytes, "save_s": save_s, "save_GBps": nbytes / save_s / 1e9,
                  "save_peak_extra_MiB": save_mem.extra / 2**20, "load_s": load_s,
                  "load_peak_extra_MiB": load_mem.extra / 2**20, "shard_MiB": args.shard_mib,
                  "save_s_all": plain_s, "save_checksums_s": checksum_s, "save_checksums_s_all": summed_s,
                  "checksum_cost_pct": 100 * (checksum_s - save_s) / save_s, "load_verify_checksums_s": verify_s,
                  "crc32_in_memory_s": crc_s, "crc32_GBps": nbytes / crc_s / 1e9}
        del model, opt, state, loaded
        runs = [] if args.no_training else [_train(args, root / f"run-{m}", m) for m in ("none", "sync", "async")]
        base = runs[0]["fit_s"] if runs else 0.0
        for r in runs[1:]:
            r["overhead_per_checkpoint_s"] = (r["fit_s"] - base) / r["checkpoints"]

    result = {"machine": machine(), "args": vars(args), "save_load": single, "training": runs}
    print(f"\nmachine: {result['machine']}")
    print(f"state {nbytes / 2**20:.0f} MiB (weights + AdamW state), shards of {args.shard_mib} MiB")
    print(f"  save {single['save_s']:.2f} s ({single['save_GBps']:.2f} GB/s), peak extra anonymous RSS {single['save_peak_extra_MiB']:.0f} MiB")
    print(f"  load + copy into the model {single['load_s']:.2f} s, peak extra anonymous RSS {single['load_peak_extra_MiB']:.0f} MiB")
    print(f"  save with per-shard CRC-32 {checksum_s:.2f} s ({single['checksum_cost_pct']:+.0f}% vs {save_s:.2f} s, medians of "
          f"{args.repeats}); load verifying them {verify_s:.2f} s; CRC-32 alone in memory {crc_s:.2f} s "
          f"({single['crc32_GBps']:.2f} GB/s)")
    print(f"\n{'checkpoints':<12}{'params':>12}{'steps':>6}{'saves':>6}{'fit s':>8}{'median step s':>14}{'max step s':>11}{'cost per save s':>16}")
    for r in runs:
        cost = f"{r['overhead_per_checkpoint_s']:.2f}" if "overhead_per_checkpoint_s" in r else "-"
        print(f"{r['mode']:<12}{r['params']:>12,}{args.steps:>6}{r['checkpoints']:>6}{r['fit_s']:>8.1f}{r['median_step_s']:>14.2f}{r['max_step_s']:>11.2f}{cost:>16}")
    save_json(args.out, result)


if __name__ == "__main__":
    main()
