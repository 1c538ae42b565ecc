"""What is the largest model I can train here? The memory plan for a model that is not built yet.

``python -m lightning_megatrain.plan --model llama-120b --host-gb 1536 --gpu-gb 141`` prints, for each
``host_memory`` mode, the host and GPU bytes the model needs and the largest Llama-shaped model that
fits the given host and GPU. ``--model`` takes a preset name, a Hugging Face model directory or
``config.json`` (any family when ``transformers`` is installed: the model is built on the meta device,
so nothing is allocated), or use ``--params`` for a Llama-shaped model of about that many parameters.
With ``--gpus-per-node N --nodes M`` (data parallel) ``--host-gb`` is one node's host memory and
``--gpu-gb`` one GPU's, and the table shows host bytes per node (shared and private) and GPU bytes per rank.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .engine.layers import find_layers
from .memory import GiB, MemoryPlan, plan_memory

MODES = ("fast", "compact", "lean")


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that set a Llama-style decoder's size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    tied: bool = False

    @property
    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        per_layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        outer = self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden
        return self.layers * per_layer + outer


# Llama 3 shapes, and a 120B one of the same family (the MegaTrain paper's headline size).
PRESETS: dict[str, LlamaShape] = {
    "llama-1b": LlamaShape(2048, 8192, 16, 32, 8, tied=True),
    "llama-3b": LlamaShape(3072, 8192, 28, 24, 8, tied=True),
    "llama-8b": LlamaShape(4096, 14336, 32, 32, 8),
    "llama-70b": LlamaShape(8192, 28672, 80, 64, 8),
    "llama-120b": LlamaShape(12288, 32768, 76, 96, 8),
    "llama-405b": LlamaShape(16384, 53248, 126, 128, 8),
}
# widths searched for the largest model that fits, each up to twice its published depth
_WIDTHS = [replace(s, layers=1) for s in PRESETS.values()]
_MAX_DEPTH = {s.hidden: 2 * s.layers for s in PRESETS.values()}


class _Block(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        head_dim = s.hidden // s.heads
        self.q = nn.Linear(s.hidden, s.hidden, bias=False)
        self.k = nn.Linear(s.hidden, s.kv_heads * head_dim, bias=False)
        self.v = nn.Linear(s.hidden, s.kv_heads * head_dim, bias=False)
        self.o = nn.Linear(s.hidden, s.hidden, bias=False)
        self.gate = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down = nn.Linear(s.intermediate, s.hidden, bias=False)
        self.norm1 = nn.Parameter(torch.ones(s.hidden))
        self.norm2 = nn.Parameter(torch.ones(s.hidden))


class _LlamaSkeleton(nn.Module):
    """Parameters only, on the meta device: what the memory plan reads. The layers are all alike, so
    one block stands for every layer (the plan is built in microseconds even for 1000 layers)."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.block = _Block(s)
        self.norm = nn.Parameter(torch.ones(s.hidden))
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)
        if s.tied:
            self.head.weight = self.embed.weight


def build_meta(model: str | LlamaShape | int) -> tuple[nn.Module, list[nn.Module], int, str]:
    """A parameter skeleton on the meta device, its streamed layers, hidden size and a description."""
    if isinstance(model, int):
        model = llama_of_size(model)
    if isinstance(model, LlamaShape):
        with torch.device("meta"):
            module = _LlamaSkeleton(model)
        return module, [module.block] * model.layers, model.hidden, f"Llama-shaped {_human(model.params)} ({model})"
    if model in PRESETS:
        module, layers, hidden, _ = build_meta(PRESETS[model])
        return module, layers, hidden, f"{model} ({_human(PRESETS[model].params)} parameters)"
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(
            f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a Hugging Face directory or config.json"
        )
    config = json.loads(config_file.read_text())
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is None or "model_type" not in config:
        return build_meta(_llama_from_config(config, config_file))
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(cfg)
    return module, find_layers(module, None), int(getattr(cfg, "hidden_size", 0)) or None, f"{config_file} ({type(module).__name__})"


def _llama_from_config(config: dict[str, Any], where: Path) -> LlamaShape:
    try:
        return LlamaShape(
            hidden=config["hidden_size"], intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"], kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"{where}: not a Llama-shaped config (missing {err}); install transformers to plan any family") from err


def llama_of_size(params: int) -> LlamaShape:
    """A Llama-shaped model of about ``params`` parameters: the preset nearest in size, at the depth that matches."""
    base = min(PRESETS.values(), key=lambda s: abs(math.log(s.params / params)))
    per_layer = replace(base, layers=2).params - replace(base, layers=1).params
    outer = base.params - base.layers * per_layer
    return replace(base, layers=max(1, round((params - outer) / per_layer)))


def plan_for(
    model: str | LlamaShape | int, mode: str, host_bytes: int, gpu_bytes: int, tokens: int, prefetch: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16, ranks_per_node: int = 1, nodes: int = 1,
) -> MemoryPlan:
    """The memory plan of ``model`` under ``mode`` on a machine with ``host_bytes`` and ``gpu_bytes``
    (per node and per GPU when ``ranks_per_node`` GPUs on each of ``nodes`` nodes train data parallel)."""
    module, layers, hidden, _ = build_meta(model)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    plan = plan_memory(
        module, layers, compute_dtype, torch.device("cpu"), prefetch=prefetch, optimizers=[optimizer],
        batch_tokens=tokens, hidden_size=hidden, host_memory=mode, host_available=host_bytes, device_free=gpu_bytes,
        ranks_per_node=ranks_per_node, nodes=nodes,
    )
    plan.host_in_use = 0  # nothing is loaded yet: all of it must fit
    plan.shm_free = None  # another machine's /dev/shm: the table shows what it must hold instead
    return plan


def largest_llama(
    mode: str, host_bytes: int, gpu_bytes: int, tokens: int, prefetch: int = 1, ranks_per_node: int = 1, nodes: int = 1
) -> LlamaShape | None:
    """The largest Llama-shaped model whose plan fits: over the preset widths, at any depth up to
    twice the published one (host bytes grow with parameters whatever the shape; width sets the GPU's
    share through the layer slots, depth through the saved inputs)."""
    best: LlamaShape | None = None
    dp = {"ranks_per_node": ranks_per_node, "nodes": nodes}
    for width in _WIDTHS:
        if not plan_for(width, mode, host_bytes, gpu_bytes, tokens, prefetch, **dp).fits():
            continue
        lo, hi = 1, _MAX_DEPTH[width.hidden] + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if plan_for(replace(width, layers=mid), mode, host_bytes, gpu_bytes, tokens, prefetch, **dp).fits():
                lo = mid
            else:
                hi = mid
        shape = replace(width, layers=lo)
        if best is None or shape.params > best.params:
            best = shape
    return best


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def report(
    model: str | LlamaShape | int, host_gb: float, gpu_gb: float, tokens: int, prefetch: int = 1,
    gpus_per_node: int = 1, nodes: int = 1,
) -> str:
    """The table the command line prints (per node and per rank with more than one GPU)."""
    host_bytes, gpu_bytes = int(host_gb * GiB), int(gpu_gb * GiB)
    _, _, _, what = build_meta(model)
    if gpus_per_node * nodes == 1:
        rows = [
            f"model: {what}",
            f"machine: {host_gb:g} GiB host, {gpu_gb:g} GiB GPU; bf16-mixed, AdamW, {tokens} tokens per micro-batch, prefetch {prefetch}",
            f"{'host_memory':<12}{'host GiB':>10}{'B/param':>9}{'GPU GiB':>10}{'fits':>6}   largest Llama-shaped model that fits",
        ]
        for mode in MODES:
            plan = plan_for(model, mode, host_bytes, gpu_bytes, tokens, prefetch)
            best = largest_llama(mode, host_bytes, gpu_bytes, tokens, prefetch)
            largest = "none" if best is None else f"{_human(best.params)} (hidden {best.hidden}, {best.layers} layers)"
            rows.append(
                f"{mode:<12}{plan.host_total / GiB:>10.1f}{plan.host_bytes_per_param:>9.1f}{plan.device_total / GiB:>10.1f}"
                f"{'yes' if plan.fits() else 'NO':>6}   {largest}"
            )
        rows.append("fast: bf16 host copy streamed; compact: fp32 masters streamed (same numbers); lean: compact + bf16 optimizer state")
        return "\n".join(rows)
    n = gpus_per_node
    rows = [
        f"model: {what}",
        f"machines: {nodes} node(s) x {n} GPU(s) per node; each node {host_gb:g} GiB host, each GPU {gpu_gb:g} GiB; bf16-mixed, AdamW, "
        f"{tokens} tokens per micro-batch and rank, prefetch {prefetch}",
        f"data parallel: the {n} ranks of a node share one copy of the host state and each owns 1/{n} of every layer"
        + ("; nodes are replicas (each holds its own copy)" if nodes > 1 else ""),
        f"{'':<12}{'host GiB per node':>18}{'host GiB':>11}{'B/param':>10}{'GPU GiB':>10}",
        f"{'host_memory':<12}{'total':>9}{'shared':>9}{'per rank':>11}{'per node':>10}{'per rank':>10}{'fits':>6}   "
        "largest Llama-shaped model that fits",
    ]
    for mode in MODES:
        plan = plan_for(model, mode, host_bytes, gpu_bytes, tokens, prefetch, ranks_per_node=n, nodes=nodes)
        best = largest_llama(mode, host_bytes, gpu_bytes, tokens, prefetch, ranks_per_node=n, nodes=nodes)
        largest = "none" if best is None else f"{_human(best.params)} (hidden {best.hidden}, {best.layers} layers)"
        rows.append(
            f"{mode:<12}{plan.host_total / GiB:>9.1f}{plan.shm_needed / GiB:>9.1f}{plan.host_private_per_rank / GiB:>11.1f}"
            f"{plan.host_bytes_per_param:>10.1f}{plan.device_total / GiB:>10.1f}{'yes' if plan.fits() else 'NO':>6}   {largest}"
        )
    rows.append(
        f"total = shared + {n} x per rank. shared: one copy per node (fp32 masters, fp32 gradients, streamed image) in "
        "/dev/shm, which must have room for it; per rank: its 1/N of the optimizer state and its gradient staging"
    )
    rows.append("fast: bf16 host copy streamed; compact: fp32 masters streamed (same numbers); lean: compact + bf16 optimizer state")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_megatrain.plan", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}), an HF model directory or a config.json")
    what.add_argument("--params", type=float, help="a Llama-shaped model of about this many parameters, e.g. 120e9")
    parser.add_argument("--host-gb", type=float, required=True, help="host memory for training state, GiB")
    parser.add_argument("--gpu-gb", type=float, required=True, help="GPU memory, GiB")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (batch x sequence length)")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node, data parallel; --host-gb is then per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes, data parallel (each holds a copy of the state)")
    args = parser.parse_args(argv)
    model: str | int = args.model if args.model is not None else int(args.params)
    if isinstance(model, int) and model <= 0 or args.host_gb <= 0 or args.gpu_gb <= 0 or args.tokens <= 0:
        parser.error("--params, --host-gb, --gpu-gb and --tokens must be positive")
    if args.gpus_per_node < 1 or args.nodes < 1:
        parser.error(f"--gpus-per-node and --nodes must be at least 1, got {args.gpus_per_node} and {args.nodes}")
    try:
        print(report(model, args.host_gb, args.gpu_gb, args.tokens, args.prefetch, args.gpus_per_node, args.nodes))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
