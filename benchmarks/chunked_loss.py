"""Chunked linear cross-entropy benchmark: peak memory and time of one forward + backward of an
lm-head loss, ``chunked_linear_cross_entropy`` against ``F.cross_entropy(F.linear(...).float())``.

    python benchmarks/chunked_loss.py --sizes 8192x32000 16384x128256 --hidden 4096 --chunk 4096 \
        --autocast --out benchmarks/results/chunked_loss-gpu.json
    python benchmarks/chunked_loss.py --sizes 1024x32000 2048x32000 4096x32000 --hidden 64 --chunk 512 \
        --out benchmarks/results/chunked_loss-cpu.json

Runs on the GPU when there is one (peak = ``torch.cuda.max_memory_allocated`` above the inputs),
otherwise on the CPU (peak = growth of the process's resident memory: the kernel's exact high-water
mark ``VmHWM``, reset before each run, on Linux; psutil sampled every millisecond elsewhere). Both
peaks include the gradients of ``hidden`` and ``weight``; the inputs are allocated before. Prints a
table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402
from lightning_megatrain.losses import chunked_linear_cross_entropy  # noqa: E402
from lightning_megatrain.memory import peak_rss_growth  # noqa: E402

MIB = 2**20


class PeakMeter:
    """Peak memory above the level at the start of ``measure``, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            return out, torch.cuda.max_memory_allocated() - base
        return peak_rss_growth(fn)


def run_one(
    tokens: int, vocab: int, hidden_size: int, chunk: int, chunked: bool, device: torch.device,
    autocast: bool, repeat: int, warmup: int, meter: PeakMeter,
) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def step() -> float:
        hidden.grad = weight.grad = None
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
        with ctx:
            if chunked:
                loss = chunked_linear_cross_entropy(hidden, weight, target, chunk_size=chunk)
            else:
                loss = F.cross_entropy(F.linear(hidden, weight).float(), target)
        loss.backward()
        return loss.item()

    for _ in range(warmup):
        step()
    times, peaks, losses = [], [], []
    for _ in range(repeat):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        loss, peak = meter.measure(step)
        times.append(time.perf_counter() - t0)
        peaks.append(peak)
        losses.append(loss)
    return {
        "tokens": tokens, "vocab": vocab, "hidden": hidden_size, "variant": "chunked" if chunked else "unchunked",
        "chunk_size": chunk if chunked else None, "autocast_bf16": autocast,
        "logits_fp32_mib": tokens * vocab * 4 / MIB, "peak_mib": max(peaks) / MIB,
        "time_s": statistics.median(times), "times_s": times, "loss": losses[-1],
    }


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024x32000", "2048x32000", "4096x32000"],
                        help="TOKENSxVOCAB pairs (tokens = batch * sequence length)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (matmuls in bf16, softmax in fp32)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meter = PeakMeter(device)
    how = "torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda" else "process RSS growth (VmHWM)"
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes]
    rows = []
    for tokens, vocab in sizes:
        pair = {}
        for chunked in (True, False):
            r = run_one(tokens, vocab, args.hidden, args.chunk, chunked, device, args.autocast, args.repeat, args.warmup, meter)
            pair[chunked] = r
            rows.append(r)
        pair[True]["loss_abs_diff"] = abs(pair[True]["loss"] - pair[False]["loss"])

    print(f"device: {device} ({'bf16 autocast' if args.autocast else 'fp32'}), hidden {args.hidden}, "
          f"chunk_size {args.chunk}, median of {args.repeat} forward+backward; peak = {how}")
    header = f"| {'tokens':>7} | {'vocab':>7} | {'logits fp32 MiB':>15} | {'variant':>9} | {'peak MiB':>9} | {'time s':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['tokens']:>7} | {r['vocab']:>7} | {r['logits_fp32_mib']:>15.1f} | {r['variant']:>9} | "
              f"{r['peak_mib']:>9.1f} | {r['time_s']:>7.3f} |")
    diffs = [r["loss_abs_diff"] for r in rows if "loss_abs_diff" in r]
    print(f"largest |loss chunked - loss unchunked|: {max(diffs):.2e}")

    result = {"benchmark": "chunked_loss", "machine": machine(), "device": str(device), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": rows}
    save_json(args.out, result)


if __name__ == "__main__":
    main()
