"""Weights files for ``MegaTrainStrategy(weights=...)``: found, checked and matched to the module's names
before anything is allocated, then read memory-mapped (``safetensors.safe_open``), one tensor at a time,
straight into the host arenas as each unit is made.

What ``weights`` may be: a directory written by ``save_pretrained`` (``model.safetensors``, or shards with
``model.safetensors.index.json``), a single ``.safetensors`` file, or a megatrain sharded checkpoint
directory. Names are matched to the LightningModule's: the Hugging Face names inside ``self.model`` or
``self.net`` (a prefix found automatically, or ``weights_prefix``); PEFT's ``base_model.model.`` and
``.base_layer`` are looked through, so a LoRA model loads its base from the base model's files and keeps
(or initialises) its adapters. A tied parameter is filled from whichever of its names the files hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from .engine.materialize import Fill, Materializer

PathLike = Union[str, Path]
INDEX = "model.safetensors.index.json"  # save_pretrained's shard index (a megatrain checkpoint's too)
SHOWN = 5  # names shown per kind of mismatch in an error
EXACT_IN_FP32 = (torch.float32, torch.bfloat16, torch.float16)  # file dtypes whose values an fp32 master holds exactly


class WeightsError(ValueError):
    """The weights files cannot fill the module: missing, unexpected or wrongly shaped tensors, or a
    damaged file (named)."""


def _files(path: Path) -> list[Path]:
    """The safetensors files ``path`` names (the index's shards, in its order)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"weights {str(path)!r}: no such file or directory")
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise WeightsError(f"weights index {str(index)!r} is not a valid JSON index ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"weights index {str(index)!r} has no valid weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"weights shard {str(f)!r}, listed in {INDEX}, is missing")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("optimizer"))
    if not files:
        raise WeightsError(f"weights directory {str(path)!r} holds no .safetensors file")
    return files


class WeightsFiles:
    """Every tensor's name, shape and file; each file opened once, memory-mapped, its header checked."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.where: dict[str, int] = {}  # tensor name -> index into self.handles
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.files = _files(self.path)
        self.handles: list[Any] = []
        for i, f in enumerate(self.files):
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in names}
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any damage
                raise WeightsError(f"weights file {str(f)!r} is damaged or truncated: {err}") from None
            self.handles.append(handle)
            for n in names:
                self.where.setdefault(n, i)
                self.shapes.setdefault(n, shapes[n])

    def read_into(self, name: str, out: torch.Tensor, cast: Optional[torch.Tensor] = None) -> bool:
        """Copy one tensor into ``out``, converting its dtype (bf16 -> fp32 is exact); with ``cast`` (the
        parameter's streamed copy in the compute dtype) write that too from the same read, where rounding
        the file's value equals rounding the fp32 master (its dtype widens to fp32 exactly). True: ``cast``
        was written."""
        i = self.where[name]
        try:
            tensor = self.handles[i].get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise WeightsError(f"weights file {str(self.files[i])!r}: cannot read {name!r}: {err}") from None
        tensor = tensor.reshape(out.shape)
        out.copy_(tensor)
        if cast is None or tensor.dtype not in EXACT_IN_FP32:
            return False
        cast.copy_(tensor)  # from the file's (mapped) bytes: a bf16 file into a bf16 copy is a plain copy
        return True

    def filler(self, name: str) -> Fill:
        return _Filler(self, name)

    def close(self) -> None:
        self.handles = []


class _Filler:
    """Fills one parameter from the files: ``fill(out)``, or ``fill.into(out, cast)`` (the master and its
    streamed copy from one read: setup writes each unit once instead of casting the masters after)."""

    def __init__(self, files: WeightsFiles, name: str) -> None:
        self.files, self.name = files, name

    def __call__(self, out: torch.Tensor) -> None:
        self.files.read_into(self.name, out)

    def into(self, out: torch.Tensor, cast: torch.Tensor) -> bool:
        return self.files.read_into(self.name, out, cast)


def _canonical(name: str) -> str:
    """The name a tensor has in its base model's files: PEFT's wrapper levels looked through."""
    name = f".{name}.".replace(".base_model.model.", ".").replace(".base_layer.", ".")
    return name.strip(".")


def _adapters(module: nn.Module) -> set[int]:
    """Parameters of PEFT adapters (not in a base model's files)."""
    out: set[int] = set()
    for m in module.modules():
        for attr in getattr(m, "adapter_layer_names", ()) or ():
            holder = m._modules.get(attr)
            if isinstance(holder, nn.Module):
                out.update(id(p) for p in holder.parameters())
    return out


def _choose_prefix(names: Iterable[str], keys: set[str]) -> str:
    """The prefix (``""``, ``"model."``, ``"net."`` ...) under which most module names are file names."""
    names = list(names)
    counts: dict[str, int] = {"": sum(n in keys for n in names)}
    tails = sorted(keys)[:64]  # enough to find the prefix; every candidate is then counted on all names
    for n in names:
        for k in tails:
            if n.endswith("." + k):
                counts.setdefault(n[: len(n) - len(k)], 0)
    for prefix in list(counts):
        if prefix:
            counts[prefix] = sum(n.startswith(prefix) and n[len(prefix) :] in keys for n in names)
    return max(counts, key=lambda p: (counts[p], -len(p)))


def _listed(kind: str, items: list[str]) -> str:
    more = f" ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{len(items)} {kind}: {', '.join(items[:SHOWN])}{more}"


def weights_materializer(module: nn.Module, path: PathLike, prefix: Optional[str] = None) -> tuple[Materializer, WeightsFiles]:
    """Match the files at ``path`` to ``module``'s parameters and buffers; refuse, before anything is
    allocated, what does not match (one error listing every kind). The files stay open until closed."""
    files = WeightsFiles(path)
    keys = set(files.shapes)
    params: dict[int, tuple[nn.Parameter, list[str]]] = {}
    buffers: dict[tuple[int, str], tuple[torch.Tensor, str]] = {}
    for mod_name, m in module.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                params.setdefault(id(p), (p, []))[1].append(_canonical(f"{mod_name}.{name}".lstrip(".")))
        for name, b in m._buffers.items():
            if b is not None:
                buffers[(id(m), name)] = (b, _canonical(f"{mod_name}.{name}".lstrip(".")))
    if prefix is None:
        prefix = _choose_prefix([n for _, names in params.values() for n in names], keys)
    elif prefix and not prefix.endswith("."):
        prefix += "."

    def key(name: str) -> Optional[str]:
        return name[len(prefix) :] if name.startswith(prefix) and name[len(prefix) :] in keys else None

    adapters = _adapters(module)
    sources: dict[int, Fill] = {}
    used: set[str] = set()
    missing, shapes = [], []
    for pid, (p, names) in params.items():
        found = [k for k in map(key, names) if k is not None]
        used.update(found)
        if not found:
            if pid not in adapters:
                name = names[0]
                missing.append(f"{name[len(prefix):]} (module {name})" if prefix and name.startswith(prefix) else name)
            continue
        if files.shapes[found[0]] != tuple(p.shape):
            shapes.append(f"{found[0]} (file {list(files.shapes[found[0]])}, module {list(p.shape)})")
            continue
        sources[pid] = files.filler(found[0])
    buffer_sources: dict[tuple[int, str], Fill] = {}
    for bkey, (b, name) in buffers.items():
        k = key(name)
        if k is None:
            continue  # not saved (non-persistent, e.g. rotary inv_freq): initialised by its module if meta
        used.add(k)
        if files.shapes[k] != tuple(b.shape):
            shapes.append(f"{k} (file {list(files.shapes[k])}, module {list(b.shape)})")
            continue
        buffer_sources[bkey] = files.filler(k)
    unexpected = sorted(keys - used)
    if missing or unexpected or shapes:
        parts = [_listed(kind, items) for kind, items in (
            ("missing from the files", missing), ("in the files but not in the module", unexpected),
            ("with another shape", shapes),
        ) if items]
        raise WeightsError(
            f"weights {str(files.path)!r} do not match {type(module).__name__} (module names matched with prefix "
            f"{prefix!r}): {'; '.join(parts)}. Pass weights_prefix= if the module holds the model under another name."
        )
    return Materializer(module, sources, buffer_sources), files
