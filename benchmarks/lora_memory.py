"""Peak host memory of a LoRA fit on a bf16 Llama-shaped base: megatrain against plain Lightning.

    python benchmarks/lora_memory.py --hidden 1024 --layers 16 --out benchmarks/results/lora_memory-cpu.json

Each mode runs in its own subprocess (``--mode plain|megatrain``) and reports the process's peak
resident memory (VmHWM) and its resident memory after imports, before the model is built. Also
prints the memory plan's host bytes per base parameter. CPU only (what is compared is host memory).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def _status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import peft
    import torch
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_megatrain  # noqa: F401

    torch.set_num_threads(max(1, torch.get_num_threads()))
    baseline = _status("VmRSS")
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 256),
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(cfg)
    base = base.to_empty(device="cpu").to(torch.bfloat16)  # weights' values do not matter for memory
    with torch.no_grad():
        for p in base.parameters():
            p.uniform_(-0.02, 0.02)  # touch every page: the memory is what is measured
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    data = DataLoader(TensorDataset(torch.randint(0, args.vocab, (args.steps, args.seq))), batch_size=1)
    plan: dict[str, Any] = {}

    class Plan(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            p = getattr(trainer.strategy, "memory_plan", None)
            if p is not None:
                plan.update(host=p.host, host_total=p.host_total, tokens_to_hide=p.tokens_to_hide_transfers())

    trainer = L.Trainer(
        strategy="megatrain" if args.mode == "megatrain" else "auto", accelerator="cpu", devices=1, precision="bf16-mixed",
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Plan()],
    )
    trainer.fit(Module(), data)
    return {"mode": args.mode, "base_params": n_base, "lora_params": n_lora, "baseline_rss": baseline,
            "peak_rss": _status("VmHWM"), "plan": plan}


def compare(argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    procs = {  # side by side: each process's own peak is what is compared
        mode: subprocess.Popen([sys.executable, __file__, "--mode", mode, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in ("plain", "megatrain")
    }
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{stderr[-4000:]}")
        out[mode] = json.loads(stdout.strip().splitlines()[-1])
    out["ratio"] = out["megatrain"]["peak_rss"] / out["plain"]["peak_rss"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["plain", "megatrain"], default=None, help="one run (used by the comparison)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.mode is not None:
        result = run_one(args)
        print(json.dumps(result))
        return result
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k in ("hidden", "layers", "vocab", "seq", "steps")]
    result = compare(passthrough)
    gib = 2**30
    for mode in ("plain", "megatrain"):
        r = result[mode]
        print(f"{mode:>10}: peak RSS {r['peak_rss'] / gib:.2f} GiB (after imports {r['baseline_rss'] / gib:.2f} GiB), "
              f"base {r['base_params'] / 1e6:.0f}M bf16, LoRA {r['lora_params'] / 1e6:.1f}M")
    plan = result["megatrain"]["plan"]
    n = result["megatrain"]["base_params"]
    print(f"ratio megatrain/plain: {result['ratio']:.3f}; memory plan host total {plan['host_total'] / n:.2f} B per base param")
    print(json.dumps(plan["host"], indent=1))
    if args.out:
        from _machine import machine, save_json

        save_json(args.out, {"machine": machine(), "args": passthrough, **result})
    return result


if __name__ == "__main__":
    main()
