"""The on-disk format: names, version, dtypes, errors, and writing one safetensors file from host memory."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

FORMAT = "lightning-megatrain/sharded"
VERSION = 2  # the newest version this code reads; single-device saves write 1, data-parallel saves 2
_VERSION_WHOLE = 1  # optimizer tensors stored whole (every reader since the first)
_VERSION_PIECES = 2  # the optimizer index may hold "pieces" (optimizer state written in ranges by the ranks)
MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
STATE_FILE = "lightning_state.pt"
META_FILE = "megatrain.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# a checkpoint that leaves out frozen parameters says which, and where the base weights came from
FROZEN_KEY = "megatrain_frozen"

_PathLike = Union[str, os.PathLike]

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensor names or shapes do not match the model; nothing was loaded."""


class CheckpointCorruptError(ValueError):
    """A checkpoint directory is damaged (a file missing, truncated or unreadable); nothing was loaded."""

    def __init__(self, checkpoint: _PathLike, file: str, problem: str) -> None:
        self.checkpoint, self.file, self.problem = Path(checkpoint), file, problem
        super().__init__(
            f"checkpoint {checkpoint} is damaged: {file}: {problem}. Nothing was loaded; resume from another "
            "checkpoint (e.g. the previous one of ModelCheckpoint's top-k)."
        )


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the checkpoint was not published and
    whatever was at its path before is unchanged. The cause is chained."""

    def __init__(self, path: _PathLike, cause: BaseException) -> None:
        self.path = Path(path)
        super().__init__(
            f"writing checkpoint {path} failed: {cause}. The checkpoint was not published; what was at that "
            "path before (if anything) and older checkpoints are unchanged."
        )


def is_sharded_checkpoint(path: _PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


# ----------------------------------------------------------------------------- safetensors writing
def _raw(t: Tensor) -> tuple[Tensor, memoryview]:
    """The tensor's bytes as a zero-copy memoryview (a copy only for a non-contiguous tensor), and the
    tensor that owns them (keep it alive while the view is used). torch tensors have no buffer
    protocol and numpy is not a dependency, so the view is made over the data pointer with ctypes."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return t, memoryview(b"")
    return t, memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _ShardWriter:
    """Writes one safetensors file: the header first (all offsets are known), then each tensor in turn."""

    def __init__(
        self, path: Path, items: list[tuple[str, Tensor]], metadata: dict[str, str] | None = None, checksum: bool = False
    ) -> None:
        header: dict[str, Any] = {}
        offset = 0
        for name, t in items:
            if t.dtype not in _DTYPES:
                raise TypeError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
            n = _nbytes(t)
            header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self._file = open(path, "wb")
        head = struct.pack("<Q", len(blob)) + blob
        self.crc: int | None = zlib.crc32(head) if checksum else None
        self._file.write(head)
        self.nbytes = offset

    def write(self, t: Tensor) -> None:
        owner, data = _raw(t)  # noqa: F841 - owner keeps the viewed memory alive
        if self.crc is not None:
            self.crc = zlib.crc32(data, self.crc)
        self._file.write(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass
class _Item:
    kind: str  # "model" | "optimizer"
    name: str
    tensor: Tensor
    group: int


def _plan(items: list[_Item], shard_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = []
    size = 0
    for item in items:
        n = _nbytes(item.tensor)
        if not shards or (size + n > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


class _Ref:
    """Stands in the pickled skeleton for a tensor stored in a shard."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name

    def __reduce__(self) -> Any:
        return (dict, ([("__megatrain_ref__", [self.kind, self.name])],))


def _split(checkpoint: Mapping[str, Any], model_groups: Mapping[str, int], optimizer_groups: list[Mapping[int, int]]) -> tuple[dict[str, Any], list[_Item]]:
    """The checkpoint with its model and optimizer tensors replaced by references, and those tensors."""
    items: list[_Item] = []
    skeleton = dict(checkpoint)
    if "state_dict" in checkpoint:
        sd = {}
        for name, t in checkpoint["state_dict"].items():
            if isinstance(t, Tensor):
                items.append(_Item("model", name, t, model_groups.get(name, 0)))
                sd[name] = _Ref("model", name)
            else:
                sd[name] = t
        skeleton["state_dict"] = sd
    if "optimizer_states" in checkpoint:
        opt_states = []
        for i, osd in enumerate(checkpoint["optimizer_states"]):
            groups = optimizer_groups[i] if i < len(optimizer_groups) else {}
            state = {}
            for idx, pstate in osd.get("state", {}).items():
                new = {}
                for key, v in pstate.items():
                    if isinstance(v, Tensor):
                        name = f"optimizer_states.{i}.state.{idx}.{key}"
                        items.append(_Item("optimizer", name, v, groups.get(idx, 0)))
                        new[key] = _Ref("optimizer", name)
                    else:
                        new[key] = v
                state[idx] = new
            opt_states.append({**osd, "state": state})
        skeleton["optimizer_states"] = opt_states
    items.sort(key=lambda it: it.group)  # stable: keeps state_dict / parameter order inside a group
    return skeleton, items


# ----------------------------------------------------------------------------- optimizer state in pieces (data parallel)
PIECES_KEY = "pieces"  # in the optimizer index: logical tensor -> {"shape", "dtype", "parts": [[lo, hi, stored name]]}


def _check_cover(logical: str, numel: int, parts: Sequence[Sequence[Any]]) -> str | None:
    """What is wrong with ``parts`` ([lo, hi, ...] sorted by lo) as a cover of [0, numel), else None."""
    at = 0
    for lo, hi, *_ in parts:
        if hi < lo:
            return f"part [{lo}, {hi}) of {logical!r} is reversed"
        if lo > at:
            return f"no part of {logical!r} holds elements [{at}, {lo}) (of {numel})"
        if lo < at:
            return f"parts of {logical!r} overlap at elements [{lo}, {min(at, hi)})"
        at = hi
    if at != numel:
        return f"the parts of {logical!r} end at element {at}, but it has {numel}" if at < numel else (
            f"the parts of {logical!r} reach element {at}, but it has only {numel}"
        )
    return None
