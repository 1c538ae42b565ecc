"""The host side of megatrain as figures: gradient accumulation and the optimizer step on the host
worker, against bare torch fused AdamW and a plain memory copy over the same number of parameters,
in one run.

    python benchmarks/host_pipeline.py --params 50000000 --layers 16 --out benchmarks/results/host_pipeline-cpu.json

Rows (parameters/s, and GB/s of memory traffic by the byte counts below):

- copy: ``dst.copy_(src)`` of fp32 (8 B/param: read 4, write 4), the machine's memory speed here;
- accumulate, first micro-batch: bf16 gradients copied into the fp32 ``.grad`` (6 B/param);
- accumulate, later micro-batches: bf16 added into fp32 (10 B/param: read 2, read+write 8), through
  the chunked scratch megatrain uses, and (for comparison) ``grad.add_(bf16)``, which widens all of
  it into a temporary first;
- optimizer: megatrain's layer-by-layer host step (fused AdamW, 28 B/param, plus the bf16 re-cast of
  the compute copy, 6 B/param) against bare fused AdamW on the same parameter shapes (28 B/param).

The worker's rows run on the host worker thread with ``--host-threads`` intra-op threads (default:
all cores, like the bare AdamW on the main thread); ``--default-cap`` adds the optimizer row with
megatrain's default cap (all cores but one). Targets (issue 10): optimizer >= 0.9x bare fused AdamW,
later-micro-batch accumulation >= copy GB/s / 3.

Then, per ``host_memory`` mode, the whole host update of one optimizer step as training runs it
(issue 25): the last micro-batch's gradients arrive layer by layer (backward order) and each layer's
update adds them, steps and writes what the next forward streams in one pass (``HostStep.prepare`` /
``early``), against bare fused AdamW over the same parameters, whose gradients are already complete:
``host update per step / bare fused AdamW: fast F, compact C, lean L`` (targets F, C <= 1.1, L <= C).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402


class Layers(nn.Module):
    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(n)])


def _best(fn: Callable[[], float], repeat: int) -> float:
    fn()  # warm-up: first touch of pages, optimizer state
    return min(fn() for _ in range(repeat))


def _on_worker(rt: Any, body: Callable[[], None]) -> float:
    """Seconds ``body`` takes on the host worker thread (queueing excluded)."""
    out: list[float] = []

    def task() -> None:
        start = time.perf_counter()
        body()
        out.append(time.perf_counter() - start)

    rt.worker.submit(task)
    rt.wait()
    return out[0]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--host-threads", type=int, default=None, help="worker intra-op threads (default: all cores)")
    parser.add_argument("--default-cap", action="store_true", help="also time the optimizer with the default cap")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from lightning_megatrain.engine import Runtime, RuntimeConfig
    from lightning_megatrain.engine.stepper import default_host_threads

    threads = args.host_threads or torch.get_num_threads()
    d = max(int((args.params / args.layers) ** 0.5), 1)
    torch.manual_seed(0)
    model = Layers(args.layers, d)
    n = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "params": n, "worker_threads": threads, "rows": []}
    rows: list[dict[str, Any]] = result["rows"]

    def row(name: str, seconds: float, bytes_per_param: int) -> None:
        rows.append({"row": name, "s": seconds, "params_per_s": n / seconds, "GBps": n * bytes_per_param / seconds / 1e9,
                     "bytes_per_param": bytes_per_param})
        save_json(args.out, result)

    # the machine's memory speed: an fp32 copy over the same number of parameters
    a, b = torch.randn(n), torch.empty(n)
    row("copy fp32 (main thread)", _best(lambda: _time(lambda: b.copy_(a)), args.repeat), 8)
    del a, b

    rt = Runtime(model, torch.device("cpu"), torch.bfloat16, RuntimeConfig(host_threads=threads))
    try:
        units = rt.layer_units
        srcs = [torch.randn(u.gnumel).bfloat16() for u in units]
        every = [[True] * sum(1 for e in u.entries if e.goffset is not None) for u in units]

        def first() -> None:
            for u in units:
                for e in u.entries:
                    e.param.grad = None
            for u, s, p in zip(units, srcs, every):
                u.accumulate(s, p)

        def later() -> None:
            for u, s, p in zip(units, srcs, every):
                u.accumulate(s, p)

        def temporary() -> None:
            for u, s in zip(units, srcs):
                u.grad.add_(s)

        row("accumulate, first micro-batch (worker)", _best(lambda: _on_worker(rt, first), args.repeat), 6)
        row("accumulate, later micro-batches (worker, chunked scratch)", _best(lambda: _on_worker(rt, later), args.repeat), 10)
        row("accumulate, later, grad.add_(bf16) temporary (worker, before)", _best(lambda: _on_worker(rt, temporary), args.repeat), 10)

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rt.attach_optimizer(opt)  # fused

        def step() -> float:
            start = time.perf_counter()
            rt.step(opt)
            rt.wait()
            return time.perf_counter() - start

        row("optimizer: megatrain host step, fused AdamW + bf16 re-cast (worker)", _best(step, args.repeat), 34)
        if args.default_cap and default_host_threads() != threads:
            rt.detach()
            rt = Runtime(model, torch.device("cpu"), torch.bfloat16, RuntimeConfig())
            for u, s, p in zip(rt.layer_units, srcs, every):
                u.accumulate(s, p)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            rt.attach_optimizer(opt)
            row(f"optimizer: megatrain, default cap ({default_host_threads()} threads)", _best(step, args.repeat), 34)
    finally:
        rt.detach()

    shapes = [p.shape for p in model.parameters()]
    del model
    bare = [nn.Parameter(torch.randn(s)) for s in shapes]
    for p in bare:
        p.grad = torch.randn(p.shape)
    bare_opt = torch.optim.AdamW(bare, lr=1e-4, fused=True)
    row("optimizer: bare torch fused AdamW (main thread)", _best(lambda: _time(bare_opt.step), args.repeat), 28)

    bare_s = rows[-1]["s"]
    per_step: dict[str, float] = {}
    for mode in ("fast", "compact", "lean"):
        seconds = _update_per_step(args.layers, d, threads, mode, args.repeat)
        per_step[mode] = seconds / bare_s
        # bytes per parameter the pass moves: arriving gradient (bf16 in fast), .grad, master and the two
        # moments read and written (moments in bf16 under lean), the bf16 streamed copy written (fast)
        traffic = {"fast": 2 + 8 + 8 + 16 + 2, "compact": 4 + 8 + 8 + 16, "lean": 4 + 8 + 8 + 8}[mode]
        row(f"host update per step, {mode} (worker; the last micro-batch's gradients added in the pass)", seconds, traffic)

    by = {r["row"]: r for r in rows}
    copy = by["copy fp32 (main thread)"]
    acc = by["accumulate, later micro-batches (worker, chunked scratch)"]
    opt_row = by["optimizer: megatrain host step, fused AdamW + bf16 re-cast (worker)"]
    bare_row = by["optimizer: bare torch fused AdamW (main thread)"]
    result["targets"] = {
        "optimizer_vs_bare_params_per_s": opt_row["params_per_s"] / bare_row["params_per_s"],
        "accumulate_vs_copy_GBps": acc["GBps"] / copy["GBps"],
        "scratch_speedup": by["accumulate, later, grad.add_(bf16) temporary (worker, before)"]["s"] / acc["s"],
        **{f"update_per_step_vs_bare_{mode}": v for mode, v in per_step.items()},
    }
    save_json(args.out, result)
    print(f"machine: {result['machine']}")
    print(f"{n:,} parameters in {args.layers} layers; worker threads {threads}, main thread {torch.get_num_threads()}")
    print(f"{'row':<72}{'ms':>9}{'Mparams/s':>11}{'GB/s':>8}")
    for r in rows:
        print(f"{r['row']:<72}{r['s'] * 1e3:>9.1f}{r['params_per_s'] / 1e6:>11.0f}{r['GBps']:>8.2f}")
    t = result["targets"]
    print(f"optimizer / bare fused AdamW: {t['optimizer_vs_bare_params_per_s']:.2f}x params/s (target >= 0.9); "
          f"accumulation / copy: {t['accumulate_vs_copy_GBps']:.2f}x GB/s (target >= 0.33); "
          f"scratch vs temporary: {t['scratch_speedup']:.2f}x faster")
    print(f"host update per step / bare fused AdamW: fast {per_step['fast']:.2f}, compact {per_step['compact']:.2f}, "
          f"lean {per_step['lean']:.2f}")
    return result


def _update_per_step(n_layers: int, d: int, threads: int, mode: str, repeat: int) -> float:
    """Seconds of one optimizer step's host work in ``mode``: the last micro-batch's gradients (in the
    dtype they cross PCIe in) handed to each layer's update as backward would, from the last layer,
    then the step and a wait for it; an earlier micro-batch's gradients are already in ``.grad``."""
    from lightning_megatrain.engine import Runtime, RuntimeConfig

    torch.manual_seed(0)
    model = Layers(n_layers, d)
    rt = Runtime(model, torch.device("cpu"), torch.bfloat16, RuntimeConfig(host_threads=threads, host_memory=mode))
    try:
        units = rt.layer_units
        srcs = [torch.randn(u.gnumel).to(rt.compute_dtype) for u in units]
        every = [[True] * sum(1 for e in u.entries if e.goffset is not None) for u in units]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rt.attach_optimizer(opt)  # fused

        def once() -> float:
            for u, s, p in zip(units, srcs, every):  # the earlier micro-batch, not timed
                rt.worker.submit(lambda u=u, s=s, p=p: u.accumulate(s, p))
            rt.wait()
            start = time.perf_counter()
            rt.host.prepare(opt, {})
            for u, s, p in reversed(list(zip(units, srcs, every))):
                update = rt.host.early(u)
                assert update is not None
                rt.worker.submit(lambda update=update, s=s, p=p: update(s, p))
            rt.step(opt)
            rt.wait()
            seconds = time.perf_counter() - start
            opt.zero_grad()
            return seconds

        return _best(once, repeat)
    finally:
        rt.detach()


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
