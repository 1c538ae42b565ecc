"""Setup at memory speed (issue 24 point 3): how long megatrain takes from ``Trainer.fit`` to the first
training batch for an HF Llama built on the meta device with ``weights=`` a ``save_pretrained``
directory, against the floor of reading the same files: ``safe_open`` each file and copy every tensor
into one preallocated fp32 buffer.

    python benchmarks/setup.py --layers 22 --host-memory compact --out benchmarks/results/setup-cpu.json

The model (default ~1.1B parameters, TinyLlama's shape) is written once in bf16 with ``save_pretrained``
to ``--dir`` (reused when present), and the page cache is warmed by reading every file before timing,
so neither side pays for the disk. Before each timed run as much memory as setup writes (plus the
gradients) is touched and freed (``back_memory``; ``--no-back-memory`` skips it): on the CI VM memory the
guest has not used lately costs several times a page fault to touch, whichever side touches it first.
Rows, each the best of ``--repeat`` runs, alternating:

- reference, fresh buffer: ``torch.empty`` of every tensor's fp32 size, then each tensor copied (and
  widened from bf16) into it: the first touch of new memory is paid, as the arenas pay it;
- reference, touched buffer: the same copies into a buffer written once before (the memory-speed floor);
- megatrain: ``Trainer.fit`` with ``MegaTrainStrategy(weights=DIR)`` from the ``setup`` hook to the
  first ``on_train_batch_start`` (the memory plan, the arenas, every tensor read into them, the compute
  copies cast, the optimizer made; the batch itself is skipped).

The figure is the median over runs of megatrain / the reference run just before it (target <= 1.5x). Then the plan's setup estimate
for a 70B Llama (``MemoryPlan.setup_seconds``: the bytes setup writes at the rate measured here).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine, save_json  # noqa: E402


def llama_config(args: argparse.Namespace) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
    )


def write_weights(args: argparse.Namespace, where: Path) -> Path:
    """A ``save_pretrained`` directory of the model in bf16 (random values), written once."""
    import transformers

    if (where / "config.json").is_file() and any(where.glob("*.safetensors")):
        return where
    where.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(args)).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model.save_pretrained(where, max_shard_size="2GB")
    del model
    gc.collect()
    return where


def files_of(where: Path) -> list[Path]:
    return sorted(where.glob("*.safetensors"))


def warm_page_cache(where: Path) -> int:
    """Read every weights file once: both sides then read them from memory, not the disk."""
    total = 0
    for f in files_of(where):
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total


def back_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of new memory and free it, right before a timed run: on a VM whose hypervisor
    takes back free guest memory (this project's CI box), the first touch of memory the guest has not
    used lately costs several times what a bare-metal page fault does; both sides then get memory that
    is new to the process (page faults and zeroing still paid) but backed by the host."""
    if nbytes > 0:
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)


def first_touch(gib: float, repeat: int) -> dict[str, Any]:
    """Whether a parallel path could help setup here: bf16 -> fp32 into new memory, as torch's ``copy_``
    does it (its own intra-op threads), after touching the pages from one thread per core, and as one
    ``copy_`` per core on its slice. Median seconds of ``repeat`` runs, interleaved."""
    from concurrent.futures import ThreadPoolExecutor

    n = int(gib * 2**30) // 4
    src = torch.randn(n).to(torch.bfloat16)
    k = max(torch.get_num_threads(), 1)
    pool = ThreadPoolExecutor(k)
    step = -(-n // k)

    def plain() -> torch.Tensor:
        x = torch.empty(n)
        x.copy_(src)
        return x

    def touch_then_copy() -> torch.Tensor:
        x = torch.empty(n)
        list(pool.map(lambda i: x[i * step : (i + 1) * step].view(torch.uint8).fill_(0), range(k)))
        x.copy_(src)
        return x

    def copy_per_thread() -> torch.Tensor:
        x = torch.empty(n)
        list(pool.map(lambda i: x[i * step : (i + 1) * step].copy_(src[i * step : (i + 1) * step]), range(k)))
        return x

    runs: dict[str, list[float]] = {f.__name__: [] for f in (plain, touch_then_copy, copy_per_thread)}
    for _ in range(repeat):
        for fn in (plain, touch_then_copy, copy_per_thread):
            back_memory(3 * n * 4)
            start = time.perf_counter()
            out = fn()
            runs[fn.__name__].append(time.perf_counter() - start)
            del out
    pool.shutdown()
    return {"gib": gib, "threads": k, "median_s": {name: statistics.median(v) for name, v in runs.items()}, "runs": runs}


def reference(where: Path, touched: Optional[torch.Tensor] = None) -> tuple[float, int]:
    """Seconds to copy every tensor of the files into one fp32 buffer (fresh unless ``touched``)."""
    from safetensors import safe_open

    start = time.perf_counter()
    handles = [safe_open(str(f), framework="pt") for f in files_of(where)]
    numel = sum(_numel(h.get_slice(k).get_shape()) for h in handles for k in h.keys())
    buf = touched if touched is not None else torch.empty(numel, dtype=torch.float32)
    off = 0
    for h in handles:
        for k in h.keys():
            t = h.get_tensor(k)
            n = t.numel()
            buf[off : off + n].copy_(t.view(-1))
            off += n
    seconds = time.perf_counter() - start
    del buf, handles
    return seconds, numel


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def megatrain_setup(args: argparse.Namespace, where: Path) -> dict[str, Any]:
    """One ``fit``: seconds from the ``setup`` hook to the first training batch, and what setup wrote."""
    import lightning as L
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_megatrain import MegaTrainStrategy

    marks: dict[str, float] = {}
    cfg = llama_config(args)

    class LM(L.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "model"):
                with torch.device("meta"):
                    self.model = transformers.LlamaForCausalLM(cfg)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> int:
            marks.setdefault("first_batch", time.perf_counter())
            return -1  # the step itself is not setup: skip the epoch

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Clock(L.Callback):
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            marks.setdefault("setup", time.perf_counter())

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            marks.setdefault("fit_start", time.perf_counter())  # strategy.setup (the runtime) is done

    strategy = MegaTrainStrategy(weights=str(where), host_memory=args.host_memory, check_memory=not args.no_check)
    data = DataLoader(TensorDataset(torch.randint(0, args.vocab, (2, 16))), batch_size=1)
    trainer = L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Clock()])
    model = LM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    for w in caught:
        if "cudaHostRegister" not in str(w.message) and "dataloader" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    from lightning_megatrain.engine.host import PINS

    params = sum(p.numel() for p in model.parameters())
    out = {
        "setup_to_first_batch_s": marks["first_batch"] - marks["setup"],
        "strategy_setup_s": marks["fit_start"] - marks["setup"],
        "params": params,
        "page_locked_bytes": PINS.requested - PINS.pageable,
        "pageable_bytes": PINS.pageable,
    }
    del model, trainer, strategy
    gc.collect()
    return out


def plan_70b(rate: Optional[float]) -> dict[str, Any]:
    """The plan's setup estimate for Llama 70B (``fast``, bf16-mixed, AdamW), at ``rate`` or the plan's default."""
    from lightning_megatrain.memory import GiB
    from lightning_megatrain.plan import plan_for

    plan = plan_for("llama-70b", "fast", 2048 * GiB, 80 * GiB, 16384)
    out = {"model": "llama-70b", "host_memory": "fast", "setup_bytes": plan.setup_bytes, "page_locked_bytes": plan.pinned_bytes,
           "setup_s_estimate": plan.setup_seconds()}
    if rate:
        out["setup_s_at_measured_rate"] = plan.setup_seconds(rate)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--host-memory", default="fast", choices=["fast", "compact", "lean"])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the save_pretrained directory is written (reused); default /tmp")
    parser.add_argument("--no-check", action="store_true", help="check_memory=False (a model the plan says is tight)")
    parser.add_argument("--no-back-memory", action="store_true", help="do not touch and free memory before each timed run")
    parser.add_argument("--first-touch-gib", type=float, default=0.0,
                        help="also time a parallel first touch / copy of this many GiB of fp32 (see first_touch)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = f"h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-v{args.vocab}"
    where = write_weights(args, Path(args.dir) if args.dir else Path("/tmp") / f"megatrain-setup-{shape}")
    file_bytes = warm_page_cache(where)
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "weights_dir": str(where), "file_bytes": file_bytes,
                              "warm_page_cache": True, "runs": []}
    ref_fresh, ref_touched, mega = [], [], []
    plan = _plan_of(args)  # what setup writes: every fp32 master (or frozen bytes), and "fast"'s compute copies
    backed = 0 if args.no_back_memory else plan.setup_bytes + 4 * plan.trainable  # the arenas' touched bytes and more
    for _ in range(args.repeat):
        back_memory(backed)
        s, numel = reference(where)
        ref_fresh.append(s)
        back_memory(backed)
        mega.append(megatrain_setup(args, where))
        result["runs"].append({"reference_fresh_s": s, **mega[-1]})
        result["backed_bytes_before_each_run"] = backed
        save_json(args.out, result)
    touched = torch.empty(numel, dtype=torch.float32).fill_(0)
    for _ in range(args.repeat):
        ref_touched.append(reference(where, touched)[0])
    del touched
    best = min(mega, key=lambda r: r["setup_to_first_batch_s"])
    fresh, warm = min(ref_fresh), min(ref_touched)
    # the figure: the median over runs of megatrain / the reference run just before it (the machine's
    # state drifts between runs; the best of each side alone can pair a lucky run with an unlucky one)
    paired = sorted(m["setup_to_first_batch_s"] / r for m, r in zip(mega, ref_fresh))
    ratio = statistics.median(paired)
    mega_s = statistics.median(m["setup_to_first_batch_s"] for m in mega)
    result.update(params=best["params"], reference_fresh_s=fresh, reference_touched_s=warm,
                  reference_fresh_median_s=statistics.median(ref_fresh), megatrain_setup_median_s=mega_s,
                  megatrain_setup_s=best["setup_to_first_batch_s"], megatrain_strategy_setup_s=best["strategy_setup_s"],
                  paired_ratios=paired, ratio_vs_fresh=ratio, ratio_vs_touched=best["setup_to_first_batch_s"] / warm)
    rate = plan.setup_bytes / mega_s
    result.update(setup_bytes=plan.setup_bytes, measured_setup_bytes_per_s=rate)
    result["plan_70b"] = plan_70b(rate)
    if args.first_touch_gib > 0:
        result["first_touch"] = first_touch(args.first_touch_gib, args.repeat)
    save_json(args.out, result)
    print(f"model: {best['params']:,} parameters, {file_bytes / 2**30:.2f} GiB of bf16 files in {where} (page cache warm)")
    print(f"host_memory={args.host_memory!r}, precision={args.precision}, {args.repeat} runs each")
    print(f"{'':<52}{'median s':>10}{'best s':>8}")
    print(f"{'reference: safe_open + copy into a fresh fp32 buffer':<52}{statistics.median(ref_fresh):>10.2f}{fresh:>8.2f}")
    print(f"{'reference: same, into a touched fp32 buffer':<52}{statistics.median(ref_touched):>10.2f}{warm:>8.2f}")
    print(f"{'megatrain: setup hook -> first training batch':<52}{mega_s:>10.2f}{best['setup_to_first_batch_s']:>8.2f}")
    print(f"ratio megatrain / reference (fresh), median of the paired runs: {ratio:.2f}x (target <= 1.5x); "
          f"runs: {', '.join(f'{x:.2f}' for x in paired)}")
    p = result["plan_70b"]
    print(f"plan's setup estimate for llama-70b (fast): writes {p['setup_bytes'] / 2**30:.0f} GiB, ~{p['setup_s_estimate']:.0f} s; "
          f"at the rate measured here ({rate / 1e9:.2f} GB/s) {p['setup_s_at_measured_rate']:.0f} s; "
          f"page-locks {p['page_locked_bytes'] / 2**30:.0f} GiB on a GPU (not in the estimate)")
    if "first_touch" in result:
        t = result["first_touch"]
        print(f"bf16 -> fp32 into {t['gib']:g} GiB of new memory, {t['threads']} threads, median s: "
              + ", ".join(f"{name} {s:.3f}" for name, s in t["median_s"].items()))
    return result


def _plan_of(args: argparse.Namespace) -> Any:
    """The memory plan of the benchmarked model (what setup writes)."""
    import transformers

    from lightning_megatrain.engine.layers import find_layers
    from lightning_megatrain.memory import plan_memory

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(args))
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    return plan_memory(model, find_layers(model), dtype, torch.device("cpu"), host_memory=args.host_memory)


if __name__ == "__main__":
    main()
