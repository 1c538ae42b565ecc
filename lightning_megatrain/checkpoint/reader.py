"""Reading a checkpoint: every file checked before anything is returned, tensors memory-mapped, and the checks against a model and optimizer."""

from __future__ import annotations

import functools
import json
import pickle
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .format import (
    _FROM_NAME,
    FORMAT,
    META_FILE,
    MODEL_INDEX,
    OPTIMIZER_INDEX,
    PIECES_KEY,
    STATE_FILE,
    VERSION,
    CheckpointCorruptError,
    CheckpointMismatchError,
    _check_cover,
    _PathLike,
)


_MAX_HEADER = 100 * 1024**2


def _read_header(path: Path, checkpoint: Path | None = None) -> tuple[int, dict[str, Any]]:
    """Header length and tensor entries of one safetensors file, checked against the file's size."""
    where = checkpoint if checkpoint is not None else path.parent
    fname = path.name if checkpoint is not None else str(path)

    def bad(problem: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(where, fname, problem)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"truncated: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise bad(f"bad header: header length {n} but the file has {size} bytes (truncated or not safetensors)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise bad("file missing") from None
    except IsADirectoryError:
        raise bad("is a directory, expected a safetensors file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"bad header: not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("bad header: not a JSON object")
    header.pop("__metadata__", None)
    end_max = 0
    for name, info in header.items():
        try:
            dtype = _FROM_NAME[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"bad header entry for tensor {name!r}: {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != numel * itemsize:
            raise bad(f"bad header entry for tensor {name!r}: offsets {begin}..{end} do not hold {dtype} of shape {shape}")
        end_max = max(end_max, end)
    expected = 8 + n + end_max
    if size < expected:
        raise bad(f"truncated: expected {expected} bytes, the file has {size}")
    return n, header


def _crc32_file(path: Path, chunk: int = 64 * 1024**2) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                return crc
            crc = zlib.crc32(data, crc)


def read_safetensors(path: _PathLike, checkpoint: Optional[_PathLike] = None) -> dict[str, Tensor]:
    """Tensors of one safetensors file as memory-mapped (copy-on-write) views: nothing is read until used.
    A damaged file raises :class:`CheckpointCorruptError` (``checkpoint`` names the directory in it)."""
    path = Path(path)
    n, header = _read_header(path, Path(checkpoint) if checkpoint is not None else None)
    if not header:
        return {}
    # private (copy-on-write) mapping: nothing is read until used, and writes never reach the file
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    start = 8 + n
    out = {}
    for name, info in header.items():
        dtype = _FROM_NAME[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = data[start + begin : start + end]
        size = torch.empty((), dtype=dtype).element_size()
        if (start + begin) % size:
            raw = raw.clone()  # unaligned for this dtype: copy this one tensor
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out


def _read_json(directory: Path, name: str) -> Any:
    try:
        with open(directory / name) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointCorruptError(directory, name, "file missing (the save did not finish, or the file was deleted)") from None
    except IsADirectoryError:
        raise CheckpointCorruptError(directory, name, "is a directory, expected a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointCorruptError(directory, name, f"not valid JSON ({err})") from None


def read_index(directory: _PathLike, index: str, verify: bool = True) -> dict[str, Tensor]:
    """Every tensor named in a safetensors index, memory-mapped. The index's entries must all be in their
    shards, and the shards' CRC-32s (if the index records them) must match, else
    :class:`CheckpointCorruptError`."""
    directory = Path(directory)
    data = _read_json(directory, index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointCorruptError(directory, index, "no valid weight_map")
    checksums = (data.get("metadata") or {}).get("crc32", {}) if verify else {}
    out: dict[str, Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        if Path(fname).name != fname:
            raise CheckpointCorruptError(directory, index, f"shard name {fname!r} is not a file name")
        tensors = read_safetensors(directory / fname, checkpoint=directory)
        if fname in checksums:
            got = f"{_crc32_file(directory / fname):08x}"
            if got != checksums[fname]:
                raise CheckpointCorruptError(directory, fname, f"checksum mismatch: CRC-32 {got}, the index records {checksums[fname]}")
        out.update(tensors)
    missing = [name for name, fname in weight_map.items() if name not in out]
    if missing:
        name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointCorruptError(directory, weight_map[name], f"{index} lists tensor {name!r}{more}, which is not in this file")
    return {name: out[name] for name in weight_map}


class Pieces:
    """An optimizer state tensor that data-parallel ranks wrote as flat element ranges: its logical
    ``shape`` and ``dtype`` and the memory-mapped parts ``(lo, hi, tensor)`` that cover ``[0, numel)``.

    Nothing is read until asked: ``slice(lo, hi)`` copies the flat elements [lo, hi) (what one rank
    owns at any world size), ``materialize()`` the whole tensor (a single-device resume, convert)."""

    __slots__ = ("shape", "dtype", "parts")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, parts: Sequence[tuple[int, int, Tensor]]) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.parts = sorted(parts, key=lambda part: part[0])

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def size(self) -> torch.Size:
        return self.shape

    def slice(self, lo: int, hi: int) -> Tensor:
        """The flat elements [lo, hi) in new memory (only the parts that hold them are read)."""
        if not 0 <= lo <= hi <= self.numel():
            raise IndexError(f"element range [{lo}, {hi}) is not within the {self.numel()} elements of this tensor")
        out = torch.empty(hi - lo, dtype=self.dtype)
        for a, b, t in self.parts:
            start, end = max(a, lo), min(b, hi)
            if start < end:
                out[start - lo : end - lo].copy_(t[start - a : end - a])
        return out

    def materialize(self) -> Tensor:
        """The whole tensor in new memory."""
        return self.slice(0, self.numel()).reshape(self.shape)

    def __repr__(self) -> str:
        return f"Pieces(shape={tuple(self.shape)}, dtype={self.dtype}, parts={[(a, b) for a, b, _ in self.parts]})"


def owned_slice(value: Union[Tensor, Pieces], lo: int, hi: int) -> Tensor:
    """The flat elements [lo, hi) of a saved optimizer state tensor, in new memory: from the parts of a
    :class:`Pieces` (a data-parallel save, any world size) or from a whole tensor (a single-device save)."""
    if isinstance(value, Pieces):
        return value.slice(lo, hi)
    if not 0 <= lo <= hi <= value.numel():
        raise IndexError(f"element range [{lo}, {hi}) is not within the {value.numel()} elements of this tensor")
    return value.reshape(-1)[lo:hi].clone()


def materialize(value: Any, clone: bool = False) -> Any:
    """``value`` with every :class:`Pieces` in it replaced by its whole tensor; ``clone``: tensors are
    copied too (out of memory-mapped files, before they are written into one file)."""
    if isinstance(value, Pieces):
        return value.materialize()
    if clone and isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: materialize(v, clone) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, clone) for v in value]
    return value


def _read_pieces(directory: Path, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The optimizer tensors by logical name: those stored in pieces become :class:`Pieces`, checked to
    cover each tensor once with parts of the right dtype and size, else :class:`CheckpointCorruptError`."""
    data = _read_json(directory, OPTIMIZER_INDEX)
    table = data.get(PIECES_KEY) if isinstance(data, dict) else None
    if table is None:
        return tensors
    weight_map = data["weight_map"]
    if not isinstance(table, dict):
        raise CheckpointCorruptError(directory, OPTIMIZER_INDEX, f"{PIECES_KEY!r} is not a JSON object")
    out = dict(tensors)
    for logical, entry in table.items():
        try:
            shape = [int(d) for d in entry["shape"]]
            dtype = _FROM_NAME[entry["dtype"]]
            parts = sorted(([int(lo), int(hi), str(name)] for lo, hi, name in entry["parts"]), key=lambda part: part[0])
        except (KeyError, TypeError, ValueError):
            raise CheckpointCorruptError(directory, OPTIMIZER_INDEX, f"bad {PIECES_KEY} entry for {logical!r}: {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        problem = _check_cover(logical, numel, parts)
        if problem:
            raise CheckpointCorruptError(directory, OPTIMIZER_INDEX, problem)
        held = []
        for lo, hi, name in parts:
            if name not in tensors:
                raise CheckpointCorruptError(directory, OPTIMIZER_INDEX, f"part {name!r} of {logical!r} is not in its weight_map")
            t = tensors[name]
            if t.dim() != 1 or t.numel() != hi - lo or t.dtype != dtype:
                raise CheckpointCorruptError(
                    directory, weight_map[name],
                    f"part {name!r} of {logical!r} is {t.dtype} of shape {tuple(t.shape)}, the index says {dtype} [{lo}, {hi})",
                )
            held.append((lo, hi, t))
            out.pop(name, None)
        out[logical] = Pieces(shape, dtype, held)
    return out


def _resolve(obj: Any, tensors: Mapping[str, Mapping[str, Tensor]], path: Path) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and "__megatrain_ref__" in obj:
            kind, name = obj["__megatrain_ref__"]
            try:
                return tensors[kind][name]
            except KeyError:
                index = MODEL_INDEX if kind == "model" else OPTIMIZER_INDEX
                raise CheckpointCorruptError(path, STATE_FILE, f"refers to tensor {name!r}, which {index} does not list") from None
        return {k: _resolve(v, tensors, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tensors, path) for v in obj]
    return obj


def _load_state(path: Path, weights_only: Optional[bool]) -> Any:
    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointCorruptError(path, STATE_FILE, "file missing (the save did not finish, or the file was deleted)")
    try:
        return torch.load(file, map_location="cpu", weights_only=bool(weights_only))
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise  # a policy refusal (an unsafe global), not damage
        raise CheckpointCorruptError(path, STATE_FILE, f"unreadable ({err})") from err
    except (EOFError, RuntimeError, ValueError) as err:
        raise CheckpointCorruptError(path, STATE_FILE, f"unreadable ({err})") from err


def load_sharded(path: _PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """The Lightning checkpoint dict of a sharded directory, with tensors memory-mapped from the shards
    (optimizer state written by data-parallel ranks as :class:`Pieces`: see :func:`materialize`).

    Every file is checked first (presence, headers, sizes, index entries, checksums if recorded): a
    damaged checkpoint raises :class:`CheckpointCorruptError` before anything is returned."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    meta = _read_json(path, META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointCorruptError(path, META_FILE, f"not a {FORMAT} checkpoint description: {meta!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} is a {FORMAT} checkpoint of version {meta.get('version')}; this lightning-megatrain reads versions <= {VERSION}: upgrade it")
    tensors = {"model": read_index(path, MODEL_INDEX), "optimizer": _read_pieces(path, read_index(path, OPTIMIZER_INDEX))}
    skeleton = _load_state(path, weights_only)
    return _resolve(skeleton, tensors, path)


def load_any(path: _PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """A megatrain directory or a single-file Lightning checkpoint."""
    if Path(path).is_dir():
        return load_sharded(path, weights_only)
    return torch.load(path, map_location="cpu", weights_only=weights_only if weights_only is not None else False)


# ----------------------------------------------------------------------------- checks
def check_state_dict(expected: Mapping[str, Tensor], got: Mapping[str, Any], strict: bool = True, limit: int = 10) -> None:
    """Raise, listing the first mismatches, before anything is copied."""
    problems = []
    for name, t in expected.items():
        if name not in got:
            if strict:
                problems.append(f"missing in checkpoint: {name} {tuple(t.shape)}")
        elif isinstance(got[name], Tensor) and tuple(got[name].shape) != tuple(t.shape):
            problems.append(f"shape of {name}: checkpoint {tuple(got[name].shape)}, model {tuple(t.shape)}")
    if strict:
        problems += [f"not in the model: {name}" for name in got if name not in expected]
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise CheckpointMismatchError(
            f"the checkpoint does not match the model ({len(problems)} mismatches); nothing was loaded. First "
            f"mismatches:\n  {shown}{more}"
        )


@functools.lru_cache(maxsize=None)
def _group_keys(cls: type) -> Optional[frozenset[str]]:
    """The hyperparameters a group of ``cls`` holds by default (None: it cannot be built from defaults)."""
    try:
        return frozenset(cls([torch.zeros(1, requires_grad=True)]).param_groups[0]) - {"params"}  # no state made
    except Exception:  # noqa: BLE001 - a class that needs more arguments is not identified
        return None


def _torch_optimizers() -> list[type]:
    return [c for c in vars(torch.optim).values()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]


def _other_optimizer(optimizer: torch.optim.Optimizer, saved: set[str]) -> Optional[str]:
    """The torch optimizers a checkpoint's groups (hyperparameters ``saved``) were written by, when that is
    positively another one than ``optimizer`` (an older torch's own groups, or extra keys such as a
    scheduler's ``initial_lr``, are not a mismatch)."""
    cls = type(optimizer).__dict__.get("_megatrain_base", type(optimizer))  # megatrain's waiting subclass
    torch_cls = next((c for c in cls.__mro__ if c in _torch_optimizers()), None)
    mine = _group_keys(torch_cls) if torch_cls is not None else None
    if mine is None:
        return None
    known = {c: k for c in _torch_optimizers() if (k := _group_keys(c)) is not None}
    # hyperparameters of some torch optimizer that this one lacks (not a scheduler's initial_lr, not
    # a key an older torch did not write yet)
    foreign = (saved - mine) & set().union(*known.values())
    if not foreign:
        return None
    fits = [(c, k) for c, k in known.items() if k <= saved and foreign <= k]
    if not fits:
        return "another optimizer (its groups hold " + ", ".join(sorted(foreign)) + ")"
    most = max(len(k) for _, k in fits)
    names = sorted(c.__name__ for c, k in fits if len(k) == most)
    return " or ".join(names) if torch_cls.__name__ not in names else None


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], limit: int = 10) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    problems = []
    saved_groups = state.get("param_groups", [])
    other = _other_optimizer(optimizer, set().union(*(set(g) for g in saved_groups)) - {"params"})
    if other is not None:
        name = type(optimizer).__dict__.get("_megatrain_base", type(optimizer)).__name__
        raise CheckpointMismatchError(
            f"the checkpoint's optimizer state is of {other}, but the optimizer is {name}; nothing was loaded. "
            "Resume with the optimizer the checkpoint was trained with, or load only the weights (the "
            "checkpoint's state_dict, e.g. with LightningModule.load_state_dict) and start the optimizer afresh."
        )
    if len(saved_groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, optimizer.param_groups)
    ):
        problems.append(
            f"parameter groups: checkpoint {[len(g['params']) for g in saved_groups]}, "
            f"optimizer {[len(g['params']) for g in optimizer.param_groups]}"
        )
    else:
        for idx, pstate in state.get("state", {}).items():
            if not isinstance(idx, int) or idx >= len(params):
                problems.append(f"state for unknown parameter index {idx}")
                continue
            for key, v in pstate.items():
                if isinstance(v, (Tensor, Pieces)) and v.dim() > 0 and tuple(v.shape) != tuple(params[idx].shape):
                    problems.append(f"{key} of parameter {idx}: checkpoint {tuple(v.shape)}, parameter {tuple(params[idx].shape)}")
    if problems:
        shown = "\n  ".join(problems[:limit])
        raise CheckpointMismatchError(f"the optimizer state does not match the optimizer; nothing was loaded:\n  {shown}")
