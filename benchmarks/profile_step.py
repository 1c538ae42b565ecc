"""Where a megatrain step's time goes: one torch.profiler trace of a few steps and a summary of it.

    python benchmarks/profile_step.py --out-dir $OUT            # 1B Llama-style, bf16, seq 4096 x batch 4

Writes ``profile_trace.json.gz`` (a Chrome trace: open it in https://ui.perfetto.dev or
chrome://tracing; gzip keeps it small enough to bring back) and ``profile.json``, and prints:

- GPU busy: the fraction of the profiled wall time in which some kernel ran;
- H2D / D2H busy: the same for host-to-device and device-to-host copies, and the fraction of each
  copy direction's time that overlapped a kernel (copies hidden behind compute);
- compute waited on copies: the time the compute stream stalled for weight copies (timing events
  around its waits, as the telemetry callback measures it);
- forward waited on the host optimizer: the time the training thread waited for the previous
  step's update of the unit it needed, per step and as a share of the step (issue 25's target: < 5%
  at 1B and 16k tokens). Without ``--clip`` each layer's update starts during backward, as soon as
  its gradients are final (``Runtime.prepare_step``, what the strategy does when nothing reads
  gradients); ``--clip NORM`` clips by the global norm first, so the updates run after backward,
  overlapped with the next forward.

On a machine without a GPU it profiles the CPU (no kernels or copies: a smoke run of the code).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402

Interval = tuple[float, float]


def _union(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in intervals)


def _intersection(a: list[Interval], b: list[Interval]) -> float:
    """Length of the overlap of two merged, sorted interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _kind(event: dict[str, Any]) -> Optional[str]:
    cat = str(event.get("cat", "")).lower()
    name = str(event.get("name", ""))
    if cat == "kernel":
        return "kernel"
    if cat in ("gpu_memcpy", "memcpy"):
        if "HtoD" in name:
            return "h2d"
        if "DtoH" in name:
            return "d2h"
        return "copy_other"
    return None


def summarize(trace: dict[str, Any] | list[dict[str, Any]]) -> dict[str, float]:
    """Busy fractions and overlap from a Chrome trace (``traceEvents`` with ``cat``, ``name``, ``ts``,
    ``dur`` in microseconds). The wall time is the span of all complete events in the trace."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans: dict[str, list[Interval]] = {"kernel": [], "h2d": [], "d2h": []}
    lo, hi = float("inf"), float("-inf")
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        lo, hi = min(lo, start), max(hi, end)
        kind = _kind(e)
        if kind in spans:
            spans[kind].append((start, end))
    wall = hi - lo if hi > lo else 0.0
    merged = {k: _union(v) for k, v in spans.items()}
    out: dict[str, float] = {"wall_s": wall / 1e6}
    for k, name in (("kernel", "gpu"), ("h2d", "h2d"), ("d2h", "d2h")):
        busy = _length(merged[k])
        out[f"{name}_busy_s"] = busy / 1e6
        out[f"{name}_busy_fraction"] = busy / wall if wall else 0.0
    for k in ("h2d", "d2h"):
        busy = _length(merged[k])
        out[f"{k}_overlapped_with_compute_fraction"] = _intersection(merged[k], merged["kernel"]) / busy if busy else 0.0
    both = _intersection(merged["h2d"], merged["d2h"])
    out["h2d_d2h_concurrent_s"] = both / 1e6
    return out


def build(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    return transformers.LlamaForCausalLM(cfg)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (a few: the trace grows with each)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip", type=float, default=None, help="clip gradients by this global norm (the host step then runs after backward)")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args(argv)
    from lightning_megatrain.engine import Runtime, RuntimeConfig
    from lightning_megatrain.losses import chunked_linear_cross_entropy

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build(args)
    rt = Runtime(model, device, dtype, RuntimeConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rt.attach_optimizer(opt)
    rt.slots.time_stalls = True
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    cuda = device.type == "cuda"

    def step() -> None:
        with rt.bound(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = model.model(input_ids=ids).last_hidden_state
            loss = chunked_linear_cross_entropy(h[:, :-1], model.lm_head.weight, ids[:, 1:])
        opt.zero_grad()  # after the forward, as Lightning does
        if args.clip is None:
            rt.prepare_step(opt)  # nothing reads the gradients: each layer steps once its gradients are final
        loss.backward()
        rt.after_backward(wait=args.clip is not None)
        if args.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        rt.step(opt)

    activities = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    try:
        for _ in range(args.warmup):
            step()
        rt.wait()
        if cuda:
            torch.cuda.synchronize()
        rt.stats()  # count from here
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            rt.wait()
            if cuda:
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        stats = rt.stats()
    finally:
        rt.detach()
    raw = out_dir / "profile_trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    summary = summarize(trace)
    summary.update({
        "steps": args.steps,
        "step_s": elapsed / args.steps,
        "compute_waited_on_copies_s_per_step": stats.transfer_wait_s / args.steps,
        "forward_waited_on_host_optimizer_s_per_step": stats.host_wait_s / args.steps,
        "forward_waited_on_host_optimizer_fraction": stats.host_wait_s / elapsed,
        "host_updates_during_backward_per_step": stats.early_updates / args.steps,
        "schedule": "after backward (clipping by norm)" if args.clip is not None else "during backward",
        "host_optimizer_s_per_step": stats.optimizer_s / args.steps,
        "host_accumulate_s_per_step": stats.accumulate_s / args.steps,
    })
    result["summary"] = summary
    result["trace"] = "profile_trace.json.gz"
    save_json(out_dir / "profile.json", result)
    print(f"machine: {result['machine']}")
    print(f"{args.steps} steps of {sum(p.numel() for p in model.parameters()):,} parameters, {args.batch}x{args.seq} tokens: "
          f"{summary['step_s']:.3f} s/step")
    print(f"GPU busy {summary['gpu_busy_fraction']:.1%} of {summary['wall_s']:.3f} s traced")
    for k in ("h2d", "d2h"):
        print(f"{k.upper()} busy {summary[f'{k}_busy_fraction']:.1%}, overlapped with compute "
              f"{summary[f'{k}_overlapped_with_compute_fraction']:.1%}")
    print(f"compute waited on copies {summary['compute_waited_on_copies_s_per_step']:.4f} s/step; host optimizer "
          f"{summary['host_optimizer_s_per_step']:.3f} s/step, accumulation {summary['host_accumulate_s_per_step']:.3f} s/step")
    print(f"forward waited on the host {summary['forward_waited_on_host_optimizer_s_per_step']:.4f} s/step = "
          f"{summary['forward_waited_on_host_optimizer_fraction']:.1%} of the step (target < 5% without clipping); host step "
          f"{summary['schedule']}, {summary['host_updates_during_backward_per_step']:.0f} unit updates per step during backward")
    return result


if __name__ == "__main__":
    main()
