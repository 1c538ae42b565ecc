"""Throughput on one device: megatrain against plain training (with and without activation
checkpointing), DeepSpeed ZeRO-3 with CPU offload and FSDP with CPU offload, side by side.

    python benchmarks/throughput.py --sizes 1b 3b --seq 4096 --batch 4 --steps 8 --warmup 3 \\
        --strategies megatrain plain plain_ckpt deepspeed_stage_3_offload fsdp_offload \\
        --out benchmarks/results/throughput.json

Each (size, strategy) runs in its own subprocess (memory, process groups and out-of-memory errors
stay isolated). Llama-style models are built locally from configs with random init; the loss is the
chunked LM cross-entropy for every strategy; AdamW; bf16-mixed by default.

LoRA (``--strategies lora_megatrain lora_peft``): a bf16 base (frozen; random values, no
initialisation pass) with PEFT LoRA (r=``--lora-rank``, alpha 2r, dropout 0.05) on all linear layers
but the head, AdamW on the adapters, bf16-mixed. ``lora_megatrain`` streams the base from host memory
(built there); ``lora_peft`` is plain PEFT with the model on the GPU (``strategy="auto"``) and
gradient checkpointing, as PEFT users run it. Sizes ``8b`` (Llama-3-8B shape) and ``59b`` (Llama-3-70B's
layer shape, 66 of its 80 layers: the most whose LoRA plan fits a 128 GiB host less 16 GiB for the
process and an 80 GB GPU at 16,384 tokens per micro-batch, ``python benchmarks/lora_plan.py --largest
128 80 --batch-tokens 16384``). Model FLOPs of a LoRA step count what the work needs, not 6·N:
forward and input gradients of the frozen base (4·N_frozen) and forward, input and weight gradients
of the adapters (6·N_trainable), times tokens.

Reported: tokens/s; model TFLOPS = 6·N·tokens / step time with N = all parameters (embeddings and
head included; recompute is not counted); MFU against the bf16 matmul peak measured in the same
process; peak GPU memory (max allocated); peak host RSS; for megatrain the time the GPU waited on
weight copies and the host optimizer time per step. Warm-up steps are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256),
    "0.5b": dict(hidden=1024, layers=24, intermediate=4096, heads=16, kv_heads=16, vocab=32000),
    "1b": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "3b": dict(hidden=3072, layers=28, intermediate=8192, heads=24, kv_heads=8, vocab=32000),
    "7b": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "14b": dict(hidden=5120, layers=48, intermediate=13824, heads=40, kv_heads=8, vocab=32000),
    # LoRA sizes (Llama-3 vocabulary)
    "8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "59b": dict(hidden=8192, layers=66, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
}
FULL_STRATEGIES = ("megatrain", "plain", "plain_ckpt", "deepspeed_stage_3_offload", "fsdp_offload")
LORA_STRATEGIES = ("lora_megatrain", "lora_peft")
STRATEGIES = FULL_STRATEGIES + LORA_STRATEGIES


def _pageable_bytes() -> int:
    """Bytes megatrain meant to page-lock in the last run whose registration failed (0 off a GPU)."""
    from lightning_megatrain.engine.host import PINS

    return PINS.pageable


def _fill_random(module: Any, std: float = 0.02) -> None:
    """Give a model built without initialisation realistic values fast: matrices tile one random
    buffer (a GPU's matmul speed and power draw depend on the data, not on its periodicity), vectors
    (norm weights) are 1. A full random initialisation of a 59B model on the CPU takes minutes."""
    import torch

    buffers: dict[Any, Any] = {}
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim < 2:
                p.fill_(1.0)
                continue
            key = (p.device, p.dtype)
            if key not in buffers:
                buffers[key] = (torch.randn(1 << 24, device=p.device) * std).to(p.dtype)
            src, flat = buffers[key], p.view(-1)
            for i in range(0, flat.numel(), src.numel()):
                n = min(src.numel(), flat.numel() - i)
                flat[i : i + n].copy_(src[:n])


def _lora_model(cfg: Any, device: Any, rank: int, checkpointing: bool) -> Any:
    """A bf16 Llama built on ``device`` without an initialisation pass, random-filled, with PEFT LoRA on all linear layers."""
    import peft
    import torch
    import transformers

    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with torch.device(device), no_init_weights():
        base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    _fill_random(base)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear")
    return peft.get_peft_model(base, lora)  # adapters in fp32 (PEFT casts them up), base frozen


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, str(Path(__file__).parent))
    import lightning_megatrain
    from _machine import machine
    from lightning_megatrain.losses import chunked_linear_cross_entropy
    from lightning_megatrain.memory import HostMemoryPeak

    size = SIZES[args.size]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    strategy_name = args.one
    lora = strategy_name in LORA_STRATEGIES
    if strategy_name in ("deepspeed_stage_3_offload", "fsdp_offload") and not cuda:
        return {"skipped": f"{strategy_name} needs a CUDA device"}
    if strategy_name == "deepspeed_stage_3_offload":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return {"skipped": "deepspeed is not installed"}

    peak = None
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        torch.mm(a, a)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, a)
        torch.cuda.synchronize()
        peak = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
        del a

    cfg = transformers.LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                                   num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                                   num_key_value_heads=size["kv_heads"], max_position_embeddings=args.seq, use_cache=False)

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: Any = None

        def configure_model(self) -> None:
            if self.model is None and lora:
                # megatrain: built in host memory, where it stays; plain PEFT: built on the GPU
                where = device if strategy_name == "lora_peft" else torch.device("cpu")
                self.model = _lora_model(cfg, where, args.lora_rank, checkpointing=strategy_name == "lora_peft")
            if self.model is None:
                self.model = transformers.LlamaForCausalLM(cfg)
                if strategy_name == "plain_ckpt":
                    self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            ids = batch[0]
            hf = self.model.get_base_model() if lora else self.model  # PEFT's LoRA layers sit inside it
            h = hf.model(input_ids=ids).last_hidden_state
            return chunked_linear_cross_entropy(h[:, :-1], hf.lm_head.weight, ids[:, 1:])

        def configure_optimizers(self) -> Any:
            if strategy_name == "deepspeed_stage_3_offload":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(self.parameters(), lr=1e-5)
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-5)

    if strategy_name == "megatrain":
        strategy: Any = lightning_megatrain.MegaTrainStrategy(prefetch=args.prefetch, host_memory=args.host_memory)
    elif strategy_name == "lora_megatrain":
        strategy = lightning_megatrain.MegaTrainStrategy(prefetch=args.prefetch, plan_batch_tokens=args.batch * args.seq)
    elif strategy_name in ("plain", "plain_ckpt", "lora_peft"):
        strategy = "auto"
    elif strategy_name == "deepspeed_stage_3_offload":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True)
    else:
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp import CPUOffload

        strategy = FSDPStrategy(cpu_offload=CPUOffload(offload_params=True),
                                auto_wrap_policy={transformers.models.llama.modeling_llama.LlamaDecoderLayer},
                                activation_checkpointing_policy={transformers.models.llama.modeling_llama.LlamaDecoderLayer})

    times: list[float] = []
    stats: list[Any] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer: Any, *a: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            runtime = getattr(trainer.strategy, "runtime", None)
            if runtime is not None:
                if len(times) == 1:
                    runtime.slots.time_stalls = True
                stats.append(runtime.stats())

    steps = args.warmup + args.steps + 1
    data = DataLoader(TensorDataset(torch.randint(0, size["vocab"], (steps * args.batch, args.seq))), batch_size=args.batch)
    trainer = L.Trainer(strategy=strategy, accelerator="cuda" if cuda else "cpu", devices=1, precision=args.precision,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_started = time.perf_counter()
    with HostMemoryPeak(interval_s=0.01) as host, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LM()
        model.configure_model()
        built = time.perf_counter()
        trainer.fit(model, data)
    for w in caught:
        if "cudaHostRegister" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    step_times = [b - a for a, b in zip(times, times[1:])][args.warmup :]
    n = sum(p.numel() for p in model.parameters()) if strategy_name != "deepspeed_stage_3_offload" else sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    step = sorted(step_times)[len(step_times) // 2]
    flops_per_token = 6 * n
    if lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops_per_token = 4 * (n - trainable) + 6 * trainable  # no weight gradients for the frozen base
    out: dict[str, Any] = {
        "params": n, "tokens_per_step": tokens, "step_s": step, "tokens_per_s": tokens / step,
        "model_tflops": flops_per_token * tokens / step / 1e12, "host_peak_GiB": (host.peak) / 2**30,
        "bf16_matmul_peak_tflops": peak, "machine": machine(),
    }
    if lora:
        out.update(trainable=trainable, build_s=built - setup_started, first_step_at_s=times[0] - built if times else None,
                   pageable_host_bytes=_pageable_bytes())
    if peak:
        out["mfu"] = out["model_tflops"] / peak
    if cuda:
        out["gpu_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if stats:
        measured = stats[args.warmup + 1 :] or stats
        out["gpu_wait_transfer_s"] = sum(s.transfer_wait_s for s in measured) / len(measured)
        out["host_optimizer_s"] = sum(s.optimizer_s for s in measured) / len(measured)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1b"], choices=sorted(SIZES))
    parser.add_argument("--strategies", nargs="+", default=list(FULL_STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--host-memory", default="auto", choices=["auto", "fast", "compact", "lean"],
                        help="host_memory of the megatrain rows")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the lora_* strategies")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all runs: a run gets at most what is left, none once under 30 s are left")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        try:
            res = _child(args)
        except Exception as err:  # noqa: BLE001 - reported in the table (e.g. out of memory)
            res = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        Path(args.result).write_text(json.dumps(res))
        return res

    from _machine import save_json

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def partial() -> dict[str, Any]:
        machine_info = next((r["machine"] for r in rows if "machine" in r), None)
        return {"machine": machine_info, "args": {k: v for k, v in vars(args).items() if k not in ("one", "size", "result")}, "rows": rows}

    for size in args.sizes:
        for strategy in args.strategies:
            timeout = args.timeout
            if args.budget is not None:
                timeout = min(timeout, int(args.budget - (time.perf_counter() - started)))
                if timeout < 30:
                    rows.append({"size": size, "strategy": strategy, "skipped": "out of the time budget"})
                    save_json(args.out, partial())
                    continue
            result_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"throughput-{os.getpid()}-{size}-{strategy}.json"
            cmd = [sys.executable, __file__, "--one", strategy, "--size", size, "--result", str(result_file),
                   "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--prefetch", str(args.prefetch), "--precision", args.precision, "--device", args.device,
                   "--lora-rank", str(args.lora_rank), "--host-memory", args.host_memory]
            print(f"running {size} {strategy} ...", flush=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                res = json.loads(result_file.read_text()) if result_file.exists() else {"error": proc.stderr[-500:]}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {timeout} s"}
            result_file.unlink(missing_ok=True)
            rows.append({"size": size, "strategy": strategy, **res})
            save_json(args.out, partial())  # a row as soon as it is measured
    machine_info = next((r["machine"] for r in rows if "machine" in r), None)
    print(f"\nmachine: {machine_info}\nseq {args.seq} x batch {args.batch} = {args.seq * args.batch} tokens/step, {args.precision}")
    header = f"{'size':<6}{'strategy':<28}{'params':>15}{'tok/s':>10}{'TFLOPS':>8}{'MFU':>7}{'GPU GiB':>9}{'host GiB':>10}{'GPU wait s':>11}{'host opt s':>11}"
    print(header)
    for r in rows:
        if "step_s" not in r:
            print(f"{r['size']:<6}{r['strategy']:<28}  {r.get('skipped') or r.get('error')}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['size']:<6}{r['strategy']:<28}{r['params']:>15,}{r['tokens_per_s']:>10.0f}{r['model_tflops']:>8.2f}"
              f"{f('mfu', '.2f'):>7}{f('gpu_peak_GiB', '.1f'):>9}{r['host_peak_GiB']:>10.1f}{f('gpu_wait_transfer_s', '.3f'):>11}"
              f"{f('host_optimizer_s', '.3f'):>11}")
    result = partial()
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
