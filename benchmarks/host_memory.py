"""Host memory per parameter of each ``host_memory`` mode, and what ``"lean"`` costs in training quality.

    python benchmarks/host_memory.py bytes  --out benchmarks/results/host_bytes.json
    python benchmarks/host_memory.py curves --steps 300 --out benchmarks/results/lean_curves.json \
        --png benchmarks/results/lean_curves.png

``bytes``: each mode fits an HF Llama (~134M parameters by default) for three bf16-mixed AdamW steps with a
checkpoint saved after the second, in a fresh process; host bytes per parameter = (peak RSS of that
process - peak RSS of a process that imports the same libraries and builds nothing) / parameters. Plain
Lightning on the same model is the reference row. The last column holds the peak against the memory
plan (issue 24: <= 1.05): peak - what the same fit of a tiny model costs beyond its plan - the plan's
device part (host memory on the CPU), over the plan's host total.

``curves``: a small byte-level Llama on the examples' corpus, trained by megatrain for ``--steps`` steps
with ``"compact"`` (exact) and with ``"lean"``, each over several seeds. The yardstick for the lean-vs-exact
difference of the final loss is the spread of the exact runs over seeds. ``--png`` plots the curves
(needs matplotlib, not a dependency of the package: ``pip install matplotlib``).

Runs on the GPU when there is one, otherwise on the CPU. Prints tables and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from _machine import machine, save_json  # noqa: E402

MODES = ("fast", "compact", "lean")


# --------------------------------------------------------------------------- bytes per parameter
def _child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process: print a JSON line."""
    import lightning as L
    import torch
    import transformers

    import lightning_megatrain
    from lightning_megatrain.memory import peak_rss_growth  # noqa: F401 - same imports in every child

    def vm(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(key)

    if args.child == "empty":
        print(json.dumps({"mode": "empty", "peak": vm("VmHWM")}))
        return
    tiny = args.child == "tiny"  # the same fit of a 0.1M-parameter model: what any fit costs, whatever the model
    cfg = transformers.LlamaConfig(
        vocab_size=256 if tiny else args.vocab, hidden_size=64 if tiny else args.hidden,
        intermediate_size=128 if tiny else args.intermediate, num_hidden_layers=2 if tiny else args.layers,
        num_attention_heads=4 if tiny else args.heads, num_key_value_heads=4 if tiny else args.heads,
    )

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.LlamaForCausalLM(cfg)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    model = LM()
    params = sum(p.numel() for p in model.parameters())
    data = torch.utils.data.DataLoader(torch.randint(0, cfg.vocab_size, (6, args.seq)), batch_size=2)
    if args.child == "plain":
        strategy: Any = "auto"
    else:
        strategy = lightning_megatrain.MegaTrainStrategy(host_memory="compact" if tiny else args.child, check_memory=False)
    with tempfile.TemporaryDirectory() as ckpt:  # a checkpoint saved after the second of three steps
        trainer = L.Trainer(
            strategy=strategy, precision="bf16-mixed", max_steps=3, logger=False, enable_progress_bar=False,
            enable_model_summary=False, devices=1, default_root_dir=ckpt,
            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt, every_n_train_steps=2, save_top_k=-1)],
        )
        trainer.fit(model, data)
    out = {"mode": args.child, "peak": vm("VmHWM"), "end": vm("VmRSS"), "params": params}
    plan = getattr(trainer.strategy, "memory_plan", None)
    if plan is not None:
        # on the CPU the "device" buffers (layer slots, the non-layer parameters' device copies and their
        # gradients) are host memory too; on a GPU they are not
        out.update(plan_host=plan.host_total, plan_device=plan.device_total)
    print(json.dumps(out))


def _run_child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "bytes", "--child", mode]
    for key in ("hidden", "intermediate", "layers", "heads", "vocab", "seq"):
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_bytes(args: argparse.Namespace) -> dict[str, Any]:
    empty = _run_child(args, "empty")["peak"]
    tiny = _run_child(args, "tiny")
    fixed = tiny["peak"] - empty - tiny["plan_host"] - tiny["plan_device"]  # what any fit costs, whatever the model
    rows = []
    for mode in ("plain", *MODES):
        r = _run_child(args, mode)
        r["bytes_per_param"] = (r["peak"] - empty) / r["params"]
        r["end_bytes_per_param"] = (r["end"] - empty) / r["params"]
        if "plan_host" in r:
            r["peak_vs_plan"] = (r["peak"] - empty - fixed - r["plan_device"]) / r["plan_host"]
        rows.append(r)
    print(f"RSS of a 3-step bf16-mixed AdamW fit with a checkpoint save, minus the peak of an empty process "
          f"({empty / 2**20:.0f} MiB), {rows[0]['params'] / 1e6:.0f}M parameters, per parameter")
    print(f"{'run':<22}{'peak':>8}{'at end':>8}{'plan: host':>12}{'plan: device':>14}{'(peak - fixed - device) / plan host':>37}")
    for r in rows:
        name = "plain Lightning" if r["mode"] == "plain" else f"host_memory={r['mode']}"
        plan = (f"{r['plan_host'] / r['params']:>12.1f}{r['plan_device'] / r['params']:>14.1f}{r['peak_vs_plan']:>37.3f}"
                if "plan_host" in r else f"{'':>12}{'':>14}{'':>37}")
        print(f"{name:<22}{r['bytes_per_param']:>8.1f}{r['end_bytes_per_param']:>8.1f}{plan}")
    print(f"fixed = what the same fit of a {tiny['params'] / 1e3:.0f}k-parameter model grows beyond its plan: "
          f"{fixed / 2**20:.0f} MiB; on the CPU the plan's device part (layer slots, gradient buffers, the "
          "non-layer parameters' copies, one layer's working set) is host memory too; target <= 1.05")
    return {"empty_peak": empty, "fixed": fixed, "rows": rows}


# --------------------------------------------------------------------------- loss curves
def _fit_curve(mode: str, seed: int, args: argparse.Namespace) -> list[float]:
    import lightning as L
    import torch
    import transformers

    import lightning_megatrain
    from causal_lm import TextWindowsDataModule

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = transformers.LlamaConfig(
                vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
            )
            self.model = transformers.LlamaForCausalLM(cfg)
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))

    L.seed_everything(seed, verbose=False)
    model = LM()
    dm = TextWindowsDataModule(None, seq_len=args.seq, batch_size=args.batch, val_fraction=0.0, num_workers=0)
    trainer = L.Trainer(
        strategy=lightning_megatrain.MegaTrainStrategy(host_memory=mode), precision="bf16-mixed",
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, devices=1,
    )
    trainer.fit(model, dm)
    return model.losses


def measure_curves(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_megatrain").setLevel(logging.ERROR)
    curves: dict[str, dict[int, list[float]]] = {"compact": {}, "lean": {}}
    for seed in range(args.seeds):
        for mode in curves:
            curves[mode][seed] = _fit_curve(mode, seed, args)
    tail = max(1, args.steps // 10)

    def final(c: list[float]) -> float:
        return statistics.fmean(c[-tail:])

    exact_finals = [final(c) for c in curves["compact"].values()]
    lean_finals = [final(c) for c in curves["lean"].values()]
    diffs = [lf - ef for lf, ef in zip(lean_finals, exact_finals)]
    spread = max(exact_finals) - min(exact_finals)
    print(f"final loss (mean of the last {tail} steps of {args.steps}), per seed")
    print(f"{'seed':<6}{'exact':>10}{'lean':>10}{'lean-exact':>12}")
    for s, (e, lf) in enumerate(zip(exact_finals, lean_finals)):
        print(f"{s:<6}{e:>10.4f}{lf:>10.4f}{lf - e:>12.4f}")
    print(f"spread of exact runs over seeds: {spread:.4f}; largest |lean-exact|: {max(abs(d) for d in diffs):.4f}")
    return {
        "curves": curves, "tail": tail, "exact_finals": exact_finals, "lean_finals": lean_finals,
        "lean_minus_exact": diffs, "exact_seed_spread": spread,
    }


def plot(result: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    colors = {"compact": "tab:blue", "lean": "tab:orange"}
    labels = {"compact": "exact (compact)", "lean": "lean (bf16 optimizer state)"}
    window = 10
    for mode, runs in result["curves"].items():
        for i, (seed, c) in enumerate(runs.items()):
            smooth = [statistics.fmean(c[max(0, k - window + 1) : k + 1]) for k in range(len(c))]
            ax.plot(smooth, color=colors[mode], alpha=0.8, lw=1, ls="-" if mode == "compact" else "--",
                    label=labels[mode] if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_title("megatrain host_memory: exact vs lean, one curve per seed")
    ax.legend()
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["bytes", "curves"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out")
    p.add_argument("--png")
    args = p.parse_args()
    big = args.part == "bytes"
    # bytes: ~134M parameters (the 136M-class Llama); curves: a small model that learns in minutes
    defaults = dict(hidden=768 if big else 128, intermediate=2048 if big else 344, layers=12 if big else 4,
                    heads=12 if big else 4, seq=64 if big else 128)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.child:
        _child(args)
        return
    config = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "seq", "batch", "steps", "seeds", "lr")}
    if args.part == "curves":
        config["vocab"] = 256  # byte-level: the corpus's bytes are the tokens
    if args.part == "bytes":
        result = measure_bytes(args)
    else:
        result = measure_curves(args)
        if args.png:
            plot(result, args.png)
    save_json(args.out, {"benchmark": f"host_memory {args.part}", "config": config, "machine": machine(), **result})


if __name__ == "__main__":
    main()
