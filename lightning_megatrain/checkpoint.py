"""Sharded safetensors checkpoints written straight from host memory, read back memory-mapped.

A checkpoint is a directory::

    model-00001-of-00004.safetensors ...   model weights, tensor names = the LightningModule's state_dict names
    model.safetensors.index.json           {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    optimizer-00001-of-00008.safetensors ... optimizer state, names "optimizer_states.<i>.state.<param>.<key>"
    optimizer.safetensors.index.json
    lightning_state.pt                     everything else Lightning saves (loops, callbacks, schedulers, ...)
    megatrain.json                         format and version

Tensors are streamed to disk from the memory they live in (no copy of the model is built), one
shard file at a time, into a temporary directory beside the target that is renamed into place only
when complete: a process killed mid-save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import struct
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

FORMAT = "lightning-megatrain/sharded"
VERSION = 1
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


def is_sharded_checkpoint(path: _PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


# ----------------------------------------------------------------------------- safetensors writing
def _raw(t: Tensor) -> np.ndarray:
    """The tensor's bytes as a zero-copy numpy view (a copy only for a non-contiguous tensor)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _ShardWriter:
    """Writes one safetensors file: the header first (all offsets are known), then each tensor in turn."""

    def __init__(self, path: Path, items: list[tuple[str, Tensor]], metadata: dict[str, str] | None = None) -> None:
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
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self.nbytes = offset

    def write(self, t: Tensor) -> None:
        self._file.write(memoryview(_raw(t)))  # type: ignore[arg-type]

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


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.megatrain-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_tmp(target: Path) -> None:
    """Temporary directories left by a process that died mid-save."""
    prefix = f".{target.name}.megatrain-tmp-"
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished temporary directory to ``target``, replacing what was there atomically."""
    _fsync_dir(tmp)
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
        else:
            old = target.parent / f".{target.name}.megatrain-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


class ShardedSave:
    """One save in progress. ``run`` writes everything; ``wait_group(g)`` returns once every tensor of
    group ``g`` (one streamed layer's weights and optimizer state) is on disk, so the optimizer may
    update that layer while the rest is still being written."""

    def __init__(
        self,
        checkpoint: Mapping[str, Any],
        path: _PathLike,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        model_groups: Mapping[str, int] | None = None,
        optimizer_groups: list[Mapping[int, int]] | None = None,
    ) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.target = Path(path)
        self.skeleton, self.items = _split(checkpoint, model_groups or {}, optimizer_groups or [])
        self.shard_bytes = shard_bytes
        self._cond = threading.Condition()
        self._written_group = -1
        self._done = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- synchronisation for the asynchronous mode
    def wait_group(self, group: int) -> None:
        with self._cond:
            while not self._done and self._written_group < group:
                self._cond.wait()

    def _mark(self, group: int) -> None:
        with self._cond:
            self._written_group = max(self._written_group, group)
            self._cond.notify_all()

    def start(self) -> ShardedSave:
        self._thread = threading.Thread(target=self._run_catching, name="megatrain-checkpoint", daemon=True)
        self._thread.start()
        return self

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait()
            self._error = err

    def wait(self) -> None:
        """Join the background save and re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing checkpoint {self.target} failed: {err!r}") from err

    # -- the write itself
    def run(self) -> None:
        target = self.target
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(target)
        tmp = _tmp_name(target)
        tmp.mkdir()
        try:
            self._write(tmp)
            _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _write(self, tmp: Path) -> None:
        streams = {}
        for kind, prefix, index in (("model", "model", MODEL_INDEX), ("optimizer", "optimizer", OPTIMIZER_INDEX)):
            shards = _plan([it for it in self.items if it.kind == kind], self.shard_bytes)
            names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            weight_map = {it.name: fname for fname, shard in zip(names, shards) for it in shard}
            total = sum(_nbytes(it.tensor) for it in self.items if it.kind == kind)
            with open(tmp / index, "w") as f:
                json.dump({"metadata": {"total_size": total, "format": FORMAT}, "weight_map": weight_map}, f, indent=1)
            streams[kind] = _ShardStream(tmp, list(zip(names, shards)))
        # interleave model and optimizer tensors group by group (layer by layer)
        by_group: dict[int, list[_Item]] = {}
        for it in self.items:
            by_group.setdefault(it.group, []).append(it)
        for group in sorted(by_group):
            for it in by_group[group]:
                streams[it.kind].write(it)
            self._mark(group)
        for s in streams.values():
            s.close()
        torch.save(self.skeleton, tmp / STATE_FILE)
        with open(tmp / META_FILE, "w") as f:
            json.dump({"format": FORMAT, "version": VERSION}, f)
        for name in (STATE_FILE, META_FILE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())


class _ShardStream:
    """Writes a sequence of shard files in order; a shard's file is open only while it is written."""

    def __init__(self, directory: Path, shards: list[tuple[str, list[_Item]]]) -> None:
        self._dir = directory
        self._shards = shards
        self._pos = -1
        self._left = 0
        self._writer: _ShardWriter | None = None

    def write(self, item: _Item) -> None:
        while self._left == 0:
            self._next()
        assert self._writer is not None
        self._writer.write(item.tensor)
        self._left -= 1

    def _next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._pos += 1
        name, items = self._shards[self._pos]
        self._writer = _ShardWriter(self._dir / name, [(it.name, it.tensor) for it in items], {"format": "pt"})
        self._left = len(items)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def save_sharded(checkpoint: Mapping[str, Any], path: _PathLike, shard_bytes: int = DEFAULT_SHARD_BYTES, **groups: Any) -> None:
    """Write ``checkpoint`` (a Lightning checkpoint dict) as a sharded directory at ``path``."""
    ShardedSave(checkpoint, path, shard_bytes, **groups).run()


# ----------------------------------------------------------------------------- reading
def read_safetensors(path: _PathLike) -> dict[str, Tensor]:
    """Tensors of one safetensors file as memory-mapped (copy-on-write) views: nothing is read until used."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
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


def read_index(directory: _PathLike, index: str) -> dict[str, Tensor]:
    directory = Path(directory)
    with open(directory / index) as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    out: dict[str, Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        out.update(read_safetensors(directory / fname))
    return {name: out[name] for name in weight_map}


def _resolve(obj: Any, tensors: Mapping[str, Mapping[str, Tensor]]) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and "__megatrain_ref__" in obj:
            kind, name = obj["__megatrain_ref__"]
            return tensors[kind][name]
        return {k: _resolve(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tensors) for v in obj]
    return obj


def load_sharded(path: _PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """The Lightning checkpoint dict of a sharded directory, with tensors memory-mapped from the shards."""
    path = Path(path)
    with open(path / META_FILE) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint of version <= {VERSION}: {meta}")
    tensors = {"model": read_index(path, MODEL_INDEX), "optimizer": read_index(path, OPTIMIZER_INDEX)}
    skeleton = torch.load(path / STATE_FILE, map_location="cpu", weights_only=bool(weights_only))
    return _resolve(skeleton, tensors)


def load_any(path: _PathLike, weights_only: Optional[bool] = None) -> dict[str, Any]:
    """A megatrain directory or a single-file Lightning checkpoint."""
    if is_sharded_checkpoint(path):
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


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], limit: int = 10) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    problems = []
    saved_groups = state.get("param_groups", [])
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
                if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(params[idx].shape):
                    problems.append(f"{key} of parameter {idx}: checkpoint {tuple(v.shape)}, parameter {tuple(params[idx].shape)}")
    if problems:
        shown = "\n  ".join(problems[:limit])
        raise CheckpointMismatchError(f"the optimizer state does not match the optimizer; nothing was loaded:\n  {shown}")


# ----------------------------------------------------------------------------- interop
def to_lightning_checkpoint(path: _PathLike, out: _PathLike) -> Path:
    """Convert a megatrain checkpoint directory into one Lightning ``.ckpt`` file (needs the RAM of the whole state)."""
    checkpoint = load_sharded(path)
    checkpoint = _materialize(checkpoint)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    return out


def _materialize(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    return obj


def _hf_submodule(module: nn.Module) -> tuple[str, nn.Module]:
    found = [(name, m) for name, m in module.named_modules() if hasattr(m, "config") and hasattr(m, "save_pretrained")]
    found = [(n, m) for n, m in found if not any(n != o and n.startswith(o + ".") for o, _ in found)]
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


if __name__ == "__main__":
    raise SystemExit(main())
