"""Long context: the longest sequence (batch 1) that trains one step of a Llama-style model, with
``offload_activations`` off and on, with the step time and peak GPU / host memory.

    python benchmarks/long_context.py --hidden 2048 --layers 16 --intermediate 8192 --heads 16 --kv-heads 8 \\
        --min-len 16384 --max-len 1048576 --chunk-mlp 16 --out benchmarks/results/long_context.json

Uses the engine directly (one ``Runtime`` whose option is switched between runs), the chunked
cross-entropy (no B×T×V logits) and, with ``--chunk-mlp``, token-wise chunking of each layer's MLP.
Lengths double from ``--min-len`` until a step fails for lack of memory (or ``--max-len``), then are
bisected to ``--resolution``. On the CPU it is a smoke run: nothing runs out of memory below the cap.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

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


def longest(rt: Runtime, model: Any, opt: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    ok: Optional[dict[str, Any]] = None
    length, failed = args.min_len, None
    while length <= args.max_len:
        res = _try(rt, model, opt, length, device, dtype)
        print(f"  offload={rt.config.offload_activations} length={length}: {'ok' if res else 'out of memory'}", flush=True)
        if res is None:
            failed = length
            break
        ok, length = res, length * 2
    if ok is not None and failed is not None:
        lo, hi = ok["length"], failed
        while hi - lo > max(args.resolution, lo // 16):
            mid = (lo + hi) // 2
            res = _try(rt, model, opt, mid, device, dtype)
            print(f"  offload={rt.config.offload_activations} length={mid}: {'ok' if res else 'out of memory'}", flush=True)
            if res is None:
                hi = mid
            else:
                ok, lo = res, mid
    return {"offload_activations": rt.config.offload_activations, "longest": ok, "first_failure": failed, "cap": args.max_len}


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
    runs = []
    try:
        for offload in (False, True):
            rt.config.offload_activations = offload
            runs.append(longest(rt, model, opt, args, device, dtype))
    finally:
        rt.detach()
    result = {"machine": machine(), "args": vars(args), "params": params, "runs": runs}
    print(f"\nmachine: {result['machine']}\nmodel: {params:,} parameters, {args.layers} layers, hidden {args.hidden}, {args.precision}")
    print(f"{'offload':<9}{'longest tokens':>16}{'step s':>9}{'GPU peak GiB':>14}{'host peak+ GiB':>16}{'limit':>18}")
    for r in runs:
        best = r["longest"] or {}
        limit = f"OOM at {r['first_failure']}" if r["first_failure"] else f"cap {r['cap']}"
        gpu = f"{best['gpu_peak_GiB']:.2f}" if "gpu_peak_GiB" in best else "-"
        print(f"{str(r['offload_activations']):<9}{best.get('length', 0):>16,}{best.get('step_s', 0):>9.2f}{gpu:>14}"
              f"{best.get('host_peak_extra_GiB', 0):>16.2f}{limit:>18}")
    if len(runs) == 2 and runs[0]["longest"] and runs[1]["longest"]:
        print(f"offload reaches {runs[1]['longest']['length'] / runs[0]['longest']['length']:.2f}x the longest context without it")
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
