"""The memory plan of LoRA on Llama-shaped bf16 bases (8B, 70B), computed without allocating
anything (meta tensors): host bytes, device slots, bytes per micro-batch over the host link, and the
tokens per micro-batch that hide those transfers.

    python benchmarks/lora_plan.py [--rank 16] [--prefetch 1]
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


def plan(shape: str, rank: int = 16, prefetch: int = 1, batch_tokens: int = 8192) -> Any:
    import peft
    import transformers

    from lightning_megatrain.memory import plan_memory

    cfg = transformers.LlamaConfig(vocab_size=128256, **SHAPES[shape])
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    layers = list(base.model.layers)
    return plan_memory(model, layers, torch.bfloat16, torch.device("cpu"), prefetch, [opt], batch_tokens=batch_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    for shape in SHAPES:
        p = plan(shape, args.rank, args.prefetch, args.batch_tokens)
        frozen = p.params - p.trainable
        print(f"== Llama {shape}, LoRA r={args.rank} on all projections, {args.batch_tokens} tokens per micro-batch")
        print(p)
        print(f"host bytes per frozen base parameter: {p.host_total / frozen:.3f}\n")


if __name__ == "__main__":
    main()
