"""What this machine allows: pinned H2D and D2H bandwidth (each alone and both at once), matmul
TFLOPS, fused CPU AdamW parameters/s, and from them the lower bound on a megatrain step,

    max(compute including recompute, PCIe traffic, host optimizer),

with megatrain's measured step time as a ratio to it.

    python benchmarks/limits.py --hidden 2048 --layers 16 --intermediate 5632 --seq 4096 --batch 4 \\
        --out benchmarks/results/limits.json

On a machine without a GPU the "transfers" are host memory copies and the compute runs on the CPU:
the same formula, other hardware.

Counting: N = parameters of the streamed layers (the non-layer parameters move once per step);
compute = (2 forward + 2 recompute + 4 backward) · N · tokens FLOPs plus causal attention
(2·batch·seq²·hidden per layer forward, ×4 for forward, recompute and backward); traffic = H2D of the layer weights
twice (forward, backward) in the compute dtype + D2H of their gradients once; host optimizer = all
trainable parameters at the measured fused-AdamW rate.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402


def _time(fn: Callable[[], None], device: torch.device, repeat: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth(device: torch.device, nbytes: int) -> dict[str, float]:
    """GB/s host->device, device->host, and both at once (on separate streams); pinned host memory."""
    n = nbytes // 2
    pin = device.type == "cuda"
    host_a = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    host_b = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    dev_a = torch.empty(n, dtype=torch.bfloat16, device=device)
    dev_b = torch.empty(n, dtype=torch.bfloat16, device=device)
    if device.type == "cuda":
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def h2d() -> None:
            with torch.cuda.stream(s1):
                dev_a.copy_(host_a, non_blocking=True)
            s1.synchronize()

        def d2h() -> None:
            with torch.cuda.stream(s2):
                host_b.copy_(dev_b, non_blocking=True)
            s2.synchronize()

        def both() -> None:
            with torch.cuda.stream(s1):
                dev_a.copy_(host_a, non_blocking=True)
            with torch.cuda.stream(s2):
                host_b.copy_(dev_b, non_blocking=True)
            s1.synchronize()
            s2.synchronize()
    else:
        def h2d() -> None:
            dev_a.copy_(host_a)

        def d2h() -> None:
            host_b.copy_(dev_b)

        def both() -> None:
            t = threading.Thread(target=d2h)
            t.start()
            h2d()
            t.join()

    return {
        "h2d_GBps": nbytes / _time(h2d, device) / 1e9,
        "d2h_GBps": nbytes / _time(d2h, device) / 1e9,
        "both_GBps_each": nbytes / _time(both, device) / 1e9,
    }


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _time(lambda: torch.mm(a, b), device) / 1e12


def adamw_params_per_s(numel: int) -> float:
    p = torch.zeros(numel, requires_grad=True)
    p.grad = torch.randn(numel)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    return numel / _time(opt.step, torch.device("cpu"))


def megatrain_step_s(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[float, int, int]:
    """Median time of a megatrain step (forward, backward, host update) for the model and batch."""
    import transformers

    from lightning_megatrain.engine import Runtime, RuntimeConfig
    from lightning_megatrain.losses import chunked_linear_cross_entropy

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(cfg)
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    total = sum(p.numel() for p in model.parameters())
    rt = Runtime(model, device, dtype, RuntimeConfig(prefetch=args.prefetch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rt.attach_optimizer(opt)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    times = []
    try:
        for _ in range(args.steps):
            start = time.perf_counter()
            with rt.bound(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                h = model.model(input_ids=ids).last_hidden_state
                loss = chunked_linear_cross_entropy(h[:, :-1], model.lm_head.weight, ids[:, 1:])
            # as Lightning does: zero_grad after the forward (it waits for the pending update, which the
            # forward has overlapped), not before it
            opt.zero_grad()
            loss.backward()
            rt.after_backward()
            rt.step(opt)  # overlaps the next forward, as in training
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rt.wait()
    finally:
        rt.detach()
    warm = times[1:] or times
    return sorted(warm)[len(warm) // 2], layer_params, total


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--copy-mib", type=int, default=1024, help="bytes per bandwidth measurement")
    parser.add_argument("--matmul", type=int, default=8192, help="square matmul size for the TFLOPS measurement")
    parser.add_argument("--adam-params", type=int, default=50_000_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-step", action="store_true", help="only the machine figures, no megatrain step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    # each figure is written as soon as it is measured: a timeout loses only what had not run yet
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    bw = result["bandwidth"] = bandwidth(device, args.copy_mib * 2**20)
    save_json(args.out, result)
    tflops = result["matmul_tflops"] = matmul_tflops(device, dtype, args.matmul)
    save_json(args.out, result)
    adam = result["fused_adamw_params_per_s"] = adamw_params_per_s(args.adam_params)
    save_json(args.out, result)
    print(f"machine: {result['machine']}")
    print(f"H2D {bw['h2d_GBps']:.1f} GB/s, D2H {bw['d2h_GBps']:.1f} GB/s, both at once {bw['both_GBps_each']:.1f} GB/s each")
    print(f"{args.precision} matmul {tflops:.1f} TFLOPS ({args.matmul}^3); fused CPU AdamW {adam / 1e6:.0f} M params/s")
    if not args.skip_step:
        step, n_layers, n_total = megatrain_step_s(args, device, dtype)
        tokens = args.batch * args.seq
        size = 2 if dtype == torch.bfloat16 else 4
        attention_flops = 8 * args.batch * args.seq**2 * args.hidden * args.layers  # causal: half of 4·T²·d per layer
        compute_s = (8 * n_layers * tokens + attention_flops) / (tflops * 1e12)
        h2d_s, d2h_s = 2 * n_layers * size / (bw["h2d_GBps"] * 1e9), n_layers * size / (bw["d2h_GBps"] * 1e9)
        pcie_s = max(h2d_s, d2h_s, (2 * n_layers * size + n_layers * size) / (2 * bw["both_GBps_each"] * 1e9))
        optim_s = n_total / adam
        bound = max(compute_s, pcie_s, optim_s)
        bounds = {"compute_s": compute_s, "pcie_s": pcie_s, "host_optimizer_s": optim_s}
        result.update({"layer_params": n_layers, "params": n_total, "tokens_per_step": tokens, "bounds": bounds,
                       "attention_flops": attention_flops,
                       "lower_bound_s": bound, "megatrain_step_s": step, "ratio_to_bound": step / bound})
        print(f"model: {n_total:,} parameters ({n_layers:,} in streamed layers), {tokens:,} tokens per step")
        print("lower bound terms: " + ", ".join(f"{k} {v:.3f}" for k, v in bounds.items()))
        print(f"lower bound {bound:.3f} s ({max(bounds, key=bounds.get)}); megatrain step {step:.3f} s = {step / bound:.2f}x the bound")
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
