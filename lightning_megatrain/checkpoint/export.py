"""Interop: one Lightning ``.ckpt`` file, Hugging Face safetensors weights in and out, and the ``megatrain-checkpoint`` command."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .format import DEFAULT_SHARD_BYTES, MODEL_INDEX, _Item, _nbytes, _PathLike, _plan, _ShardWriter
from .reader import check_state_dict, load_sharded, materialize, read_index, read_safetensors


# ----------------------------------------------------------------------------- interop
def to_lightning_checkpoint(path: _PathLike, out: _PathLike) -> Path:
    """Convert a megatrain checkpoint directory into one Lightning ``.ckpt`` file (needs the RAM of the whole state)."""
    checkpoint = load_sharded(path)
    checkpoint = materialize(checkpoint, clone=True)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    return out


def _outermost(module: nn.Module, match: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """Submodules (with their names) that ``match`` and are not inside another match."""
    found = [(name, m) for name, m in module.named_modules() if match(m)]
    return [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]


def _hf_submodule(module: nn.Module) -> tuple[str, nn.Module]:
    found = _outermost(module, lambda m: hasattr(m, "config") and hasattr(m, "save_pretrained"))
    if len(found) != 1:
        raise ValueError(
            f"expected one Hugging Face model inside {type(module).__name__}, found {[n for n, _ in found] or 'none'}; "
            "pass prefix= to name it"
        )
    return found[0]


def export_hf(
    source: Union[nn.Module, _PathLike],
    out_dir: _PathLike,
    prefix: Optional[str] = None,
    config: Any = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the model weights alone in Hugging Face layout (safetensors shards + index), so that
    ``transformers`` loads them with ``from_pretrained``.

    ``source`` is a LightningModule wrapping an HF model (prefix and config found automatically) or a
    megatrain checkpoint directory (give ``prefix``, e.g. ``"model."``, and ``config`` to write config.json).
    """
    if isinstance(source, nn.Module):
        name, hf = _hf_submodule(source) if prefix is None else (prefix.rstrip("."), None)
        prefix = f"{name}." if name else ""
        state = source.state_dict()
        if config is None and hf is not None:
            config = hf.config
    else:
        state = read_index(source, MODEL_INDEX)
        prefix = prefix or ""
    weights: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:
            continue  # a tied weight (lm_head = embed_tokens): HF writes it once and ties on load
        seen.add(key)
        weights[k[len(prefix) :]] = v
    if not weights:
        raise ValueError(f"no tensor name starts with prefix {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [_Item("model", k, v, 0) for k, v in weights.items()]
    shards = _plan(items, shard_bytes)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for fname, shard in zip(names, shards):
        writer = _ShardWriter(out / fname, [(it.name, it.tensor) for it in shard], {"format": "pt"})
        for it in shard:
            writer.write(it.tensor)
        writer.close()
    if len(shards) > 1:
        with open(out / "model.safetensors.index.json", "w") as f:
            total = sum(_nbytes(t) for t in weights.values())
            json.dump({"metadata": {"total_size": total}, "weight_map": {it.name: n for n, s in zip(names, shards) for it in s}}, f, indent=1)
    if config is not None:
        config.save_pretrained(out) if hasattr(config, "save_pretrained") else shutil.copy(config, out / "config.json")
    return out


def weights_source(module: Optional[nn.Module]) -> Optional[str]:
    """Where ``module``'s base weights came from: the directory given to :func:`load_hf_weights`, or
    an HF model's ``config._name_or_path``; None if unknown."""
    if module is None:
        return None
    source = getattr(module, "_megatrain_weights_source", None)
    if source:
        return str(source)
    for m in module.modules():
        name = getattr(getattr(m, "config", None), "_name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return None


def load_hf_weights(module: nn.Module, hf_dir: _PathLike, prefix: Optional[str] = None, strict: bool = True) -> None:
    """Copy weights from an HF safetensors directory into ``module``'s parameters in host memory
    (memory-mapped, one tensor at a time; nothing goes to the GPU).

    Call it in ``configure_model`` or after ``setup``: with megatrain the parameters are views into the
    host arenas, so the weights land there directly.
    """
    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors.index.json").is_file():
        tensors = read_index(hf_dir, "model.safetensors.index.json")
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors files in {hf_dir}")
        tensors = {}
        for f in files:
            tensors.update(read_safetensors(f))
    if prefix is None:
        prefix = _hf_submodule(module)[0] if not hasattr(module, "save_pretrained") else ""
        prefix = f"{prefix}." if prefix else ""
    own = module.state_dict(keep_vars=True)
    wanted = {k[len(prefix) :]: v for k, v in own.items() if k.startswith(prefix)}
    # HF drops tied copies (lm_head.weight tied to embed_tokens.weight) from its files
    tied = {k for k, v in wanted.items() if k not in tensors and any(v is w for n, w in wanted.items() if n in tensors)}
    check_state_dict({k: v for k, v in wanted.items() if k not in tied}, tensors, strict=strict)
    with torch.no_grad():
        for name, target in wanted.items():
            if name in tensors:
                target.copy_(tensors[name])
    module._megatrain_weights_source = str(hf_dir.resolve())  # recorded in checkpoints that leave the base out


def main(argv: Iterable[str] | None = None) -> int:
    """``megatrain-checkpoint convert DIR OUT.ckpt`` | ``megatrain-checkpoint export-hf DIR OUT --prefix model. [--config DIR]``."""
    parser = argparse.ArgumentParser(prog="megatrain-checkpoint", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="megatrain checkpoint directory -> one Lightning .ckpt file")
    conv.add_argument("src")
    conv.add_argument("dst")
    exp = sub.add_parser("export-hf", help="model weights -> Hugging Face safetensors layout")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--prefix", default="", help="state_dict prefix of the HF model, e.g. 'model.'")
    exp.add_argument("--config", default=None, help="an HF config.json (or a directory holding one) to copy")
    exp.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "convert":
        print(to_lightning_checkpoint(args.src, args.dst))
    else:
        config = args.config
        if config is not None and Path(config).is_dir():
            config = Path(config) / "config.json"
        print(export_hf(args.src, args.dst, prefix=args.prefix, config=config, shard_bytes=args.shard_bytes))
    return 0
