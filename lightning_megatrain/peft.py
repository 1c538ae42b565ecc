"""Exporting the result of adapter (PEFT LoRA) fine-tuning.

- :func:`export_adapters`: the adapters alone, in PEFT's own format (``adapter_model.safetensors`` +
  ``adapter_config.json``), loadable with ``PeftModel.from_pretrained(base, out_dir)``.
- :func:`export_merged`: the base with the adapters merged in, in Hugging Face layout (safetensors
  shards + index + config.json), computed and written one tensor at a time: the merged model never
  exists in memory, so a 70B export needs about one weight matrix of extra memory.

The package does not depend on peft: these functions use the PEFT model object they are given
(its ``peft_config``, ``save_pretrained`` and the LoRA layers' ``get_delta_weight``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .checkpoint import DEFAULT_SHARD_BYTES, _Item, _nbytes, _outermost, _plan, _ShardWriter

_PathLike = Union[str, "Path"]


def find_peft_model(module: nn.Module) -> tuple[str, nn.Module]:
    """The (outermost) PEFT model inside ``module`` and its state-dict prefix."""
    found = _outermost(module, lambda m: hasattr(m, "peft_config") and hasattr(m, "get_base_model"))
    if len(found) != 1:
        raise ValueError(
            f"expected one PEFT model (from peft.get_peft_model) inside {type(module).__name__}, found "
            f"{[n or '<root>' for n, _ in found] or 'none'}"
        )
    name, model = found[0]
    return (f"{name}." if name else ""), model


def export_adapters(module: nn.Module, out_dir: _PathLike, adapter_name: str = "default") -> Path:
    """Write the trained adapters of the PEFT model inside ``module`` in PEFT's format.

    Reads the host parameters (megatrain waits for a pending optimizer step first)."""
    prefix, peft_model = find_peft_model(module)
    state = module.state_dict()  # the LightningModule's state_dict waits for the pending host step
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out = Path(out_dir)
    peft_model.save_pretrained(out, state_dict=sub, selected_adapters=[adapter_name], safe_serialization=True)
    return out


def _merged_tensor(owner: nn.Module, weight: Tensor, adapter_name: str) -> Tensor:
    merged = owner.get_delta_weight(adapter_name).float()  # B @ A * scale: a new tensor, added into in place
    merged.add_(weight.detach())
    return merged.to(weight.dtype)


def export_merged(
    module: nn.Module,
    out_dir: _PathLike,
    adapter_name: str = "default",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    config: Optional[Any] = None,
) -> Path:
    """Write the base model with adapter ``adapter_name`` merged in, in Hugging Face layout.

    Each merged weight (``W + scale * B @ A``, computed in fp32 and stored in ``W``'s dtype, as PEFT's
    ``merge_and_unload`` does) is computed just before it is written and dropped after: extra memory is
    about one weight matrix. Adapter tensors are left out; names are the base model's own."""
    state = module.state_dict()  # waits for a pending host step
    prefix, peft_model = find_peft_model(module)
    base = peft_model.get_base_model()
    base_prefix = prefix + next(n for n, m in peft_model.named_modules() if m is base) + "."
    owners = dict(base.named_modules())
    items: list[_Item] = []
    makers: dict[str, Any] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, t in state.items():
        if not key.startswith(base_prefix):
            continue
        name = key[len(base_prefix) :]
        if ".lora_" in name or "lora_embedding" in name or ".lora_magnitude" in name:
            continue
        shared = (t.data_ptr(), tuple(t.shape))
        if t.numel() and shared in seen:
            continue  # a tied weight: HF writes it once and ties on load
        seen.add(shared)
        out_name = name.replace(".base_layer.", ".")
        owner_name, _, leaf = name.rpartition(".base_layer.")
        owner = owners.get(owner_name) if owner_name else None
        if owner is not None and leaf == "weight" and adapter_name in getattr(owner, "lora_A", {}):
            if getattr(owner, "use_dora", {}).get(adapter_name):
                raise NotImplementedError("export_merged does not merge DoRA adapters; use PEFT's merge_and_unload")
            if adapter_name in getattr(owner, "merged_adapters", []):
                raise ValueError(f"adapter {adapter_name!r} is already merged into {owner_name}")
            makers[out_name] = (owner, t)
        items.append(_Item("model", out_name, torch.empty(t.shape, dtype=t.dtype, device="meta") if out_name in makers else t, 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _plan(items, shard_bytes)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with torch.no_grad():
        for fname, shard in zip(names, shards):
            writer = _ShardWriter(out / fname, [(it.name, it.tensor) for it in shard], {"format": "pt"})
            for it in shard:
                if it.name in makers:
                    owner, weight = makers[it.name]
                    writer.write(_merged_tensor(owner, weight, adapter_name))  # freed after the write
                else:
                    writer.write(it.tensor)
            writer.close()
    if len(shards) > 1:
        with open(out / "model.safetensors.index.json", "w") as f:
            total = sum(_nbytes(it.tensor) for it in items)
            weight_map = {it.name: n for n, s in zip(names, shards) for it in s}
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = config if config is not None else getattr(base, "config", None)
    if config is not None:
        config.save_pretrained(out)
    return out
