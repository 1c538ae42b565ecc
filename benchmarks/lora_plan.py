"""The memory plan of LoRA on Llama-shaped bf16 bases (8B, 70B), computed without allocating
anything (meta tensors): host bytes, device slots, bytes per micro-batch over the host link, and the
tokens per micro-batch that hide those transfers.

    python benchmarks/lora_plan.py [--rank 16] [--prefetch 1] [--batch-tokens 8192] [--host-memory fast]

``--host-memory auto`` resolves the mode as a GPU run would (``plan_batch_tokens`` = ``--batch-tokens``).
The plans in examples/configs/lora_llama3_*.yaml come from
``python benchmarks/lora_plan.py --prefetch 2 --batch-tokens 16384 --host-memory auto``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

SHAPES = {  # Llama-3 shapes
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plan(
    shape: str | dict[str, int],
    rank: int = 16,
    prefetch: int = 1,
    batch_tokens: int = 8192,
    host_memory: str = "fast",
    vocab_size: int = 128256,
    **plan_kwargs: Any,
) -> Any:
    """The plan of a bf16 Llama base (a name in ``SHAPES`` or LlamaConfig keyword arguments) with LoRA
    on all projections and AdamW on the adapters; ``host_memory="auto"`` resolves as on a GPU."""
    import peft
    import transformers

    from lightning_megatrain.memory import choose_host_memory, plan_memory

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, **(SHAPES[shape] if isinstance(shape, str) else shape))
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    layers = list(base.model.layers)
    mode, reason = choose_host_memory(host_memory, "cuda", torch.bfloat16, batch_tokens)
    return plan_memory(model, layers, torch.bfloat16, torch.device("cpu"), prefetch, [opt], batch_tokens=batch_tokens,
                       host_memory=mode, host_memory_reason=reason if host_memory == "auto" else "", **plan_kwargs)


def largest_fitting(
    host_gib: float = 128, gpu_gib: float = 80, reserve_gib: float = 16, batch_tokens: int = 16384, prefetch: int = 1,
    rank: int = 16,
) -> tuple[int, Any]:
    """The most Llama-3-70B-shaped decoder layers (of 80) whose LoRA plan fits a host of ``host_gib``
    (less ``reserve_gib`` for the process, CUDA context and OS) and a GPU of ``gpu_gib`` (GB, 1e9 bytes,
    as GPUs are sold): the size of the ``lora`` part of benchmarks/throughput.py."""
    def fits(layers: int) -> tuple[bool, Any]:
        p = plan({**SHAPES["70B"], "num_hidden_layers": layers}, rank, prefetch, batch_tokens)
        return p.host_total <= (host_gib - reserve_gib) * 2**30 and p.device_total <= gpu_gib * 1e9, p

    lo, hi = 1, SHAPES["70B"]["num_hidden_layers"]  # fits(lo) assumed; bisect the last that fits
    if fits(hi)[0]:
        return hi, fits(hi)[1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid)
    return lo, fits(lo)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--host-memory", default="fast", choices=["fast", "compact", "lean", "auto"])
    parser.add_argument("--largest", nargs=2, type=float, metavar=("HOST_GIB", "GPU_GB"), default=None,
                        help="instead: the most 70B-shaped layers whose plan fits this host and GPU (16 GiB kept for the process)")
    args = parser.parse_args(argv)
    if args.largest is not None:
        layers, p = largest_fitting(args.largest[0], args.largest[1], batch_tokens=args.batch_tokens, prefetch=args.prefetch,
                                    rank=args.rank)
        print(f"== {layers} Llama-3-70B-shaped layers fit a {args.largest[0]:g} GiB host (16 GiB kept) and a {args.largest[1]:g} GB GPU")
        print(p)
        return
    for shape in SHAPES:
        p = plan(shape, args.rank, args.prefetch, args.batch_tokens, args.host_memory)
        frozen = p.params - p.trainable
        print(f"== Llama {shape}, LoRA r={args.rank} on all projections, {args.batch_tokens} tokens per micro-batch")
        print(p)
        print(f"host bytes per frozen base parameter: {p.host_total / frozen:.3f}\n")


if __name__ == "__main__":
    main()
