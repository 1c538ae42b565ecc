"""Long context: the longest sequence (batch 1) that trains one step of a Llama-style model, with
``offload_activations`` off and on, with the step time and peak GPU / host memory.

    python benchmarks/long_context.py --hidden 2048 --layers 16 --intermediate 8192 --heads 16 --kv-heads 8 \\
        --min-len 16384 --max-len 1048576 --chunk-mlp 16 --out benchmarks/results/long_context.json

Uses the engine directly (one ``Runtime`` whose option is switched between runs), the chunked
cross-entropy (no B×T×V logits) and, with ``--chunk-mlp``, token-wise chunking of each layer's MLP.

The search is built to fit one device call: it starts at ``--start-len`` (near the expected answer),
grows by ``--growth`` while steps succeed, halves while they fail, then bisects to ``--resolution``.
A length the memory estimate says cannot fit (saved inputs and working set on the GPU, offloaded
inputs in host memory) is refused without trying it; a trial whose step time, extrapolated from the
last one (quadratic in length, attention), would exceed ``--trial-cap`` seconds or the time left of
``--budget`` is not run. Every trial is written to ``--out`` as soon as it ends. On the CPU it is a
smoke run: nothing runs out of memory below the cap.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402
from lightning_megatrain.chunking import chunk_tokenwise  # noqa: E402
from lightning_megatrain.engine import Runtime, RuntimeConfig  # noqa: E402
from lightning_megatrain.losses import chunked_linear_cross_entropy  # noqa: E402
from lightning_megatrain.memory import HostMemoryPeak  # noqa: E402


def build(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_len,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    if args.chunk_mlp > 1:
        for layer in model.model.layers:
            chunk_tokenwise(layer.mlp, args.chunk_mlp)
    return model


def one_step(rt: Runtime, model: Any, opt: torch.optim.Optimizer, length: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with HostMemoryPeak() as host:
        with rt.bound(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden = model.model(input_ids=ids).last_hidden_state
            loss = chunked_linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], chunk_size=4096)
        loss.backward()
        rt.after_backward()
        rt.step(opt)
        rt.wait()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out = {"length": length, "step_s": time.perf_counter() - start, "loss": loss.item(), "host_peak_extra_GiB": host.extra / 2**30}
    if device.type == "cuda":
        out["gpu_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _try(rt: Runtime, model: Any, opt: Any, length: int, device: torch.device, dtype: torch.dtype) -> Optional[dict[str, Any]]:
    try:
        return one_step(rt, model, opt, length, device, dtype)
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def estimate(args: argparse.Namespace, length: int, offload: bool, device: torch.device) -> dict[str, Any]:
    """Bytes a step of ``length`` tokens needs beyond the weights, and whether it can fit.

    Saved layer inputs are the fp32 residual stream (the embedding output is fp32 under autocast):
    ``layers · length · hidden · 4`` bytes, on the GPU, or in pinned host memory with offload. One
    layer's working set ≈ ``(16 / chunk_mlp + 8) · length · hidden`` bytes in bf16 on the GPU (the MLP
    chunked, attention with a fused kernel)."""
    saved = args.layers * length * args.hidden * 4
    working = int((16 / max(args.chunk_mlp, 1) + 8) * length * args.hidden * 2) + 2 * 4096 * args.vocab * 4
    gpu = working + (0 if offload else saved)
    host = saved if offload else 0
    import psutil

    host_free = psutil.virtual_memory().available
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    fits = host < 0.8 * host_free and (gpu_free is None or gpu < gpu_free)
    return {"gpu_bytes": gpu, "host_bytes": host, "gpu_free": gpu_free, "host_free": host_free, "fits": fits}


def longest(rt: Runtime, model: Any, opt: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            deadline: float, record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    offload = rt.config.offload_activations
    ok: Optional[dict[str, Any]] = None
    failed: Optional[int] = None
    stop: Optional[str] = None
    last: Optional[dict[str, Any]] = None

    def trial(length: int) -> Optional[bool]:
        """True: trained; False: out of memory (measured or refused by the estimate); None: not run."""
        nonlocal ok, failed, stop, last
        plan = estimate(args, length, offload, device)
        if not plan["fits"]:
            record({"offload": offload, "length": length, "result": "refused by the memory estimate", **plan})
            return False
        if last is not None:
            predicted = last["step_s"] * (length / last["length"]) ** 2
            left = deadline - time.perf_counter()
            if predicted > args.trial_cap or predicted > left:
                stop = f"length {length}: predicted {predicted:.0f} s per step (trial cap {args.trial_cap:.0f} s, {left:.0f} s left)"
                record({"offload": offload, "length": length, "result": "not run: " + stop})
                return None
        res = _try(rt, model, opt, length, device, dtype)
        record({"offload": offload, "length": length, "result": "ok" if res else "out of memory", **(res or {})})
        print(f"  offload={offload} length={length}: {'ok' if res else 'out of memory'}", flush=True)
        if res is not None:
            last = res
        return res is not None

    length = min(max(args.start_len or args.min_len, args.min_len), args.max_len)
    # grow while it trains, halve while it does not
    while True:
        got = trial(length)
        if got is None:
            break
        if got:
            ok = last
            if length >= args.max_len:
                break
            nxt = min(int(length * args.growth), args.max_len)
            if failed is not None and nxt >= failed:
                break
            length = nxt
        else:
            failed = length if failed is None else min(failed, length)
            if ok is not None or length <= args.min_len:
                break
            length = max(length // 2, args.min_len)
    if ok is not None and failed is not None and stop is None:
        lo, hi = ok["length"], failed
        while hi - lo > max(args.resolution, lo // 16):
            mid = (lo + hi) // 2
            got = trial(mid)
            if got is None:
                break
            if got:
                ok, lo = last, mid
            else:
                hi = mid
    return {"offload_activations": offload, "longest": ok, "first_failure": failed, "cap": args.max_len, "stopped": stop}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--min-len", type=int, default=16384)
    parser.add_argument("--max-len", type=int, default=1 << 20)
    parser.add_argument("--resolution", type=int, default=4096)
    parser.add_argument("--start-len", type=int, default=None, help="first length tried (default: --min-len)")
    parser.add_argument("--growth", type=float, default=2.0, help="factor between lengths while steps succeed")
    parser.add_argument("--trial-cap", type=float, default=120.0, help="seconds: do not run a step predicted to take longer")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds for the whole search (both runs)")
    parser.add_argument("--offload", choices=["both", "on", "off"], default="both", help="which runs, offload on first if both")
    parser.add_argument("--chunk-mlp", type=int, default=8)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = build(args)
    params = sum(p.numel() for p in model.parameters())
    rt = Runtime(model, device, dtype, RuntimeConfig(prefetch=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rt.attach_optimizer(opt)
    runs: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    result = {"machine": machine(), "args": vars(args), "params": params, "runs": runs, "trials": trials}

    def record(row: dict[str, Any]) -> None:
        trials.append(row)
        save_json(args.out, result)

    order = {"both": (True, False), "on": (True,), "off": (False,)}[args.offload]
    start = time.perf_counter()
    try:
        for i, offload in enumerate(order):
            rt.config.offload_activations = offload
            # the first run may use the budget the second does not need; each keeps a share for the next
            share = (args.budget - (time.perf_counter() - start)) / (len(order) - i)
            runs.append(longest(rt, model, opt, args, device, dtype, time.perf_counter() + share, record))
            save_json(args.out, result)
    finally:
        rt.detach()
    print(f"\nmachine: {result['machine']}\nmodel: {params:,} parameters, {args.layers} layers, hidden {args.hidden}, {args.precision}")
    print(f"{'offload':<9}{'longest tokens':>16}{'step s':>9}{'GPU peak GiB':>14}{'host peak+ GiB':>16}{'limit':>18}")
    for r in runs:
        best = r["longest"] or {}
        limit = f"OOM at {r['first_failure']}" if r["first_failure"] else ("time cap" if r["stopped"] else f"cap {r['cap']}")
        gpu = f"{best['gpu_peak_GiB']:.2f}" if "gpu_peak_GiB" in best else "-"
        print(f"{str(r['offload_activations']):<9}{best.get('length', 0):>16,}{best.get('step_s', 0):>9.2f}{gpu:>14}"
              f"{best.get('host_peak_extra_GiB', 0):>16.2f}{limit:>18}")
    by = {r["offload_activations"]: r["longest"] for r in runs}
    if by.get(True) and by.get(False):
        print(f"offload reaches {by[True]['length'] / by[False]['length']:.2f}x the longest context without it")
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
