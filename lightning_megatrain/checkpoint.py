"""Sharded safetensors checkpoints written straight from host memory, read back memory-mapped.

A checkpoint is a directory::

    model-00001-of-00004.safetensors ...   model weights, tensor names = the LightningModule's state_dict names
    model.safetensors.index.json           {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    optimizer-00001-of-00008.safetensors ... optimizer state, names "optimizer_states.<i>.state.<param>.<key>"
    optimizer.safetensors.index.json
    lightning_state.pt                     everything else Lightning saves (loops, callbacks, schedulers, ...)
    megatrain.json                         format and version

Written by data-parallel training (:func:`save_sharded_distributed`), the same directory is written by
every rank of node 0 at once: each model tensor whole by one rank (the same model files and index as
above), and each rank's optimizer state, which covers only the flat element ranges of the parameters
that rank owns, as 1-D pieces in its own files ``optimizer-r<rank>-<k>.safetensors`` named
``<logical name>@<first element>``. The optimizer index then also has ``"pieces"``: for each logical
tensor its shape, dtype and parts ``[[lo, hi, stored name], ...]`` (a 0-d tensor, Adam's ``step``, is
stored whole under its logical name). Loading gives a :class:`Pieces` for such a tensor, from which any
world size takes its own range (``slice``) or the whole tensor (``materialize``). Such checkpoints are
version 2; single-device saves still write version 1, which every version reads.

Tensors are streamed to disk from the memory they live in (no copy of the model is built), one
shard file at a time, into a temporary directory beside the target that is renamed into place only
when complete: a process killed mid-save leaves the previous checkpoint as it was. Temporary
directories are named ``.<name>.megatrain-{tmp,old,del}-<pid>-<id>-<host>``; every save removes those
of dead processes on this host that it finds in its directory (and puts back a previous checkpoint
that a killed save had moved aside).

Loading checks the structure of every file (and the per-shard CRC-32 when the index has one) before
anything is returned, and raises :class:`CheckpointCorruptError` naming the checkpoint, the file and
what is wrong.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import io
import json
import logging
import os
import pickle
import re
import shutil
import socket
import struct
import sys
import threading
import uuid
import weakref
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .engine.procs import pid_alive

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


log = logging.getLogger(__name__)


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


_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
_AUX = re.compile(r"^\.(?P<name>.+)\.megatrain-(?P<kind>tmp|old|del)-(?P<pid>\d+)-(?P<id>[0-9a-f]{8})(?:-(?P<host>.+))?$")


def _aux_name(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target``: ``tmp`` a save being written, ``old`` the previous checkpoint while
    it is swapped out, ``del`` a checkpoint being removed. Pid and host say whose it is."""
    return target.parent / f".{target.name}.megatrain-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{_HOST}"


def _tmp_name(target: Path) -> Path:
    return _aux_name(target, "tmp")


def remove_stale(directory: _PathLike) -> list[Path]:
    """Clean up after processes on this host that died in a save or removal in ``directory``.

    Temporary (``tmp``) and half-removed (``del``) directories of dead processes are deleted; a previous
    checkpoint that a killed save had moved aside (``old``) is put back if nothing took its place, else
    deleted. Directories of live processes, of this process and of other hosts are left alone. Returns
    the paths deleted or restored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = []
    for entry in directory.iterdir():
        m = _AUX.match(entry.name)
        if m is None or (m["host"] not in (None, _HOST)):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        stale.append((m["kind"], entry, directory / m["name"]))
    done = []
    for kind, entry, target in sorted(stale, key=lambda x: x[0] != "old"):  # put back before deleting the rest
        if kind == "old" and not (target.exists() or target.is_symlink()):
            try:
                os.rename(entry, target)
                log.warning("put back checkpoint %s, moved aside by a save that did not finish", target)
                done.append(entry)
                continue
            except OSError:
                pass
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except OSError:
                pass
        done.append(entry)
    if done:
        _fsync_dir(directory)
    return done


def remove_checkpoint(path: _PathLike) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: a directory is first renamed to a
    hidden name (which a later save removes if this process dies meanwhile), then deleted."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        doomed = _aux_name(path, "del")
        os.rename(path, doomed)
        _fsync_dir(path.parent)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
    """Move the finished temporary directory to ``target``, replacing what was there atomically
    (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, undone on failure, and put right by
    the next save's :func:`remove_stale` if the process dies between them)."""
    _fsync_dir(tmp)
    if target.exists() or target.is_symlink():
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
        else:
            old = _aux_name(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync_dir(target.parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


class _Abandoned(Exception):
    """The process is exiting while a background save was still writing: it is given up."""


_IN_FLIGHT: "weakref.WeakSet[ShardedSave]" = weakref.WeakSet()


@atexit.register
def _abandon_unfinished() -> None:
    # Background writers are not daemon threads, so the interpreter waits for them at exit; this runs
    # only when that wait was cut short (a second Ctrl-C): give the saves up cleanly, leaving the
    # previous checkpoint and no temporary directory.
    for save in list(_IN_FLIGHT):
        save.abort()
    for save in list(_IN_FLIGHT):
        save._ended.wait(timeout=30)


class ShardedSave:
    """One save in progress. ``run`` writes everything; ``wait_group(g)`` returns once every tensor of
    group ``g`` (one streamed layer's weights and optimizer state) is on disk, so the optimizer may
    update that layer while the rest is still being written.

    In the background (``start``) the writer is not a daemon thread: a process that exits while a save
    is in flight finishes it first. Work that must wait until the checkpoint is published (deleting an
    older one) is handed to ``after_publish``; it is dropped if the save fails.
    """

    def __init__(
        self,
        checkpoint: Mapping[str, Any],
        path: _PathLike,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        model_groups: Mapping[str, int] | None = None,
        optimizer_groups: list[Mapping[int, int]] | None = None,
        checksums: bool = False,
    ) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.target = Path(path)
        self.skeleton, self.items = _split(checkpoint, model_groups or {}, optimizer_groups or [])
        # the rest of the checkpoint (loops, callbacks) is serialised now, on the calling thread: it holds
        # live objects (ModelCheckpoint's best_k_models) that change while a background write goes on
        buffer = io.BytesIO()
        torch.save(self.skeleton, buffer)
        self._state_bytes = buffer.getvalue()
        self.shard_bytes = shard_bytes
        self.checksums = checksums
        self._cond = threading.Condition()
        self._written_group = -1
        self._done = False
        self._published = False
        self._aborted = False
        self._after: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()  # the writer thread has begun
        self._ended = threading.Event()  # ... and is done, published or failed

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
        thread = threading.Thread(target=self._run_catching, name="megatrain-checkpoint", daemon=False)
        _IN_FLIGHT.add(self)
        self._thread = thread
        try:
            thread.start()
        except BaseException:
            # A Ctrl-C can arrive inside start(), usually while it waits for the new thread to report
            # that it runs: then the thread runs and join() waits for it. If it was never launched,
            # nothing is to be waited for.
            if not self._running.wait(timeout=1.0):
                self._thread = None
                self._finish(published=False)
                self._ended.set()
                _IN_FLIGHT.discard(self)
            raise
        return self

    def _run_catching(self) -> None:
        self._running.set()
        try:
            self.run()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait()
            self._error = err
        finally:
            _IN_FLIGHT.discard(self)
            self._ended.set()

    @property
    def done(self) -> bool:
        """The write has finished, published or failed (its failure is raised by ``wait``)."""
        with self._cond:
            return self._done

    def after_publish(self, fn: Any) -> None:
        """Run ``fn()`` once the checkpoint is published (now, if it is); never if the save fails."""
        with self._cond:
            if not self._published:
                if not self._done:
                    self._after.append(fn)
                return
        fn()

    def abort(self) -> None:
        """Give the save up at the next tensor (its temporary directory is removed)."""
        with self._cond:
            self._aborted = True

    def join(self) -> None:
        """Wait for the background write to end (a ``KeyboardInterrupt`` may cut the wait short; the write
        goes on and a later ``join`` waits again)."""
        if self._thread is not None:
            # not Thread.join: on Python 3.11 a join cut short by KeyboardInterrupt can mark the thread as
            # stopped while it still runs (bpo-45274), and every later join would return at once
            self._ended.wait()
            self._thread.join()

    def wait(self) -> None:
        """Join the background save and raise its failure (:class:`CheckpointWriteError`) once."""
        self.join()
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointWriteError):
                raise err
            raise CheckpointWriteError(self.target, err) from err

    # -- the write itself
    def run(self) -> None:
        target = self.target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(target.parent)
            tmp = _tmp_name(target)
            tmp.mkdir()
        except OSError as err:
            self._finish(published=False)
            raise CheckpointWriteError(target, err) from err
        published = False
        try:
            self._write(tmp)
            _publish(tmp, target)
            published = True
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception):
                raise CheckpointWriteError(target, err) from err
            raise
        finally:
            after = self._finish(published)
        for fn in after:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - the new checkpoint is safe; an old one stays behind
                log.warning("checkpoint %s was saved, but removing an older one failed: %r", target, err)

    def _finish(self, published: bool) -> list[Any]:
        with self._cond:
            self._done = True
            self._published = published
            after, self._after = (self._after if published else []), []
            self._cond.notify_all()
        return after

    def _write(self, tmp: Path) -> None:
        streams = {}
        indexes = []
        for kind, prefix, index in (("model", "model", MODEL_INDEX), ("optimizer", "optimizer", OPTIMIZER_INDEX)):
            shards = _plan([it for it in self.items if it.kind == kind], self.shard_bytes)
            names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            weight_map = {it.name: fname for fname, shard in zip(names, shards) for it in shard}
            total = sum(_nbytes(it.tensor) for it in self.items if it.kind == kind)
            streams[kind] = _ShardStream(tmp, list(zip(names, shards)), self.checksums)
            indexes.append((index, {"total_size": total, "format": FORMAT}, weight_map, streams[kind]))
        # interleave model and optimizer tensors group by group (layer by layer)
        by_group: dict[int, list[_Item]] = {}
        for it in self.items:
            by_group.setdefault(it.group, []).append(it)
        for group in sorted(by_group):
            for it in by_group[group]:
                if self._aborted:
                    raise _Abandoned(f"the process exited while {self.target} was being written")
                streams[it.kind].write(it)
            self._mark(group)
        for s in streams.values():
            s.close()
        # the indexes last: they carry the shards' checksums
        for index, metadata, weight_map, stream in indexes:
            if stream.checksums:
                metadata["crc32"] = stream.checksums
            with open(tmp / index, "w") as f:
                json.dump({"metadata": metadata, "weight_map": weight_map}, f, indent=1)
        (tmp / STATE_FILE).write_bytes(self._state_bytes)
        with open(tmp / META_FILE, "w") as f:
            json.dump({"format": FORMAT, "version": _VERSION_WHOLE}, f)
        for name in (MODEL_INDEX, OPTIMIZER_INDEX, STATE_FILE, META_FILE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())


class _ShardStream:
    """Writes a sequence of shard files in order; a shard's file is open only while it is written."""

    def __init__(self, directory: Path, shards: list[tuple[str, list[_Item]]], checksum: bool = False) -> None:
        self._dir = directory
        self._shards = shards
        self._checksum = checksum
        self.checksums: dict[str, str] = {}  # shard file -> CRC-32 of the whole file, hex
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
        self._close_writer()
        self._pos += 1
        name, items = self._shards[self._pos]
        self._writer = _ShardWriter(self._dir / name, [(it.name, it.tensor) for it in items], {"format": "pt"}, self._checksum)
        self._left = len(items)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self._writer.crc is not None:
                self.checksums[self._writer.path.name] = f"{self._writer.crc:08x}"
            self._writer = None

    def close(self) -> None:
        self._close_writer()


def save_sharded(
    checkpoint: Mapping[str, Any], path: _PathLike, shard_bytes: int = DEFAULT_SHARD_BYTES, checksums: bool = False, **groups: Any
) -> None:
    """Write ``checkpoint`` (a Lightning checkpoint dict) as a sharded directory at ``path``.

    ``checksums=True`` records a CRC-32 of each shard file in the index, verified on load."""
    ShardedSave(checkpoint, path, shard_bytes, checksums=checksums, **groups).run()


# ----------------------------------------------------------------------------- data parallel: every rank writes
PIECES_KEY = "pieces"  # in the optimizer index: logical tensor -> {"shape", "dtype", "parts": [[lo, hi, stored name]]}


def _assign_model(items: list[_Item], size: int) -> list[int]:
    """Which rank of the node writes each model tensor (whole): contiguous runs of the state_dict, balanced
    by bytes. Computed from the tensors' order and sizes alone, so every rank agrees without talking."""
    total = sum(_nbytes(it.tensor) for it in items)
    out, before = [], 0
    for it in items:
        n = _nbytes(it.tensor)
        out.append(min(size - 1, (2 * before + n) * size // (2 * total)) if total else 0)
        before += n
    return out


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


class _RankFailed(Exception):
    """Another rank's failure, as that rank reported it."""


def _piece_items(
    checkpoint: Mapping[str, Any], owned: Sequence[Sequence[tuple[int, int, Sequence[int]]]], rank: int
) -> tuple[list[_Item], dict[str, list[Any]], list[str]]:
    """This rank's optimizer tensors to write: 1-D pieces named ``<logical>@<lo>`` and the 0-d tensors of
    the parameters whose first element it owns; the pieces' index entries; the names stored whole."""
    items: list[_Item] = []
    pieces: dict[str, list[Any]] = {}
    whole: list[str] = []
    for i, osd in enumerate(checkpoint.get("optimizer_states", [])):
        for idx, pstate in osd.get("state", {}).items():
            try:
                lo, hi, shape = owned[i][idx]
            except (IndexError, KeyError, TypeError):
                raise ValueError(f"no owned range given for parameter {idx} of optimizer {i}") from None
            numel = 1
            for d in shape:
                numel *= int(d)
            if not 0 <= lo <= hi <= numel:
                raise ValueError(f"owned range [{lo}, {hi}) of parameter {idx} of optimizer {i} is not within its {numel} elements")
            for key, v in pstate.items():
                if not isinstance(v, Tensor):
                    continue
                name = f"optimizer_states.{i}.state.{idx}.{key}"  # the name _split gives it (the skeleton's reference)
                if v.dim() == 0:
                    if lo == 0 and hi > 0:
                        items.append(_Item("optimizer", name, v, 0))
                        whole.append(name)
                elif v.dim() == 1 and v.numel() == hi - lo:
                    if v.dtype not in _DTYPES:
                        raise TypeError(f"cannot write tensor {name!r} of dtype {v.dtype} to safetensors")
                    if hi > lo:
                        stored = f"{name}@{lo}"
                        items.append(_Item("optimizer", stored, v, 0))
                        pieces[name] = [[int(d) for d in shape], _DTYPES[v.dtype], lo, hi, stored]
                else:
                    raise ValueError(
                        f"optimizer state {name!r} on rank {rank} has shape {tuple(v.shape)}; in data parallel a rank's "
                        f"state holds its elements [{lo}, {hi}) of the flattened parameter (1-D) or 0-d tensors"
                    )
    return items, pieces, whole


def save_sharded_distributed(
    checkpoint: Mapping[str, Any],
    path: _PathLike,
    owned: Sequence[Sequence[tuple[int, int, Sequence[int]]]],
    local_rank: int,
    local_size: int,
    node: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    checksums: bool = False,
) -> None:
    """Write one sharded checkpoint directory from every rank of a data-parallel job at once.

    Every rank of the world calls it (it is a collective on the default process group). ``checkpoint``
    is this rank's Lightning checkpoint dict whose ``optimizer_states`` hold only this rank's part: per
    parameter, 1-D tensors of the elements [lo, hi) of the flattened state it owns and 0-d tensors whole;
    ``owned[i][p]`` is ``(lo, hi, shape)`` of parameter ``p`` (in param_groups order) of optimizer ``i``.
    Model tensors are full on every rank (node-shared memory): each is written whole by one rank of node 0.

    Rank 0 makes the temporary directory; every rank of node 0 writes its files into it; rank 0 gathers
    what each wrote (or its error), writes the indexes, ``lightning_state.pt`` and ``megatrain.json`` and
    publishes the directory atomically. Ranks of other nodes (replicas) write nothing. If any rank fails,
    nothing is published, the temporary directory is removed, and every rank raises the same
    :class:`CheckpointWriteError` naming the rank and its error.
    """
    import torch.distributed as dist

    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    target = Path(path)
    rank = dist.get_rank()
    if rank == 0 and (node != 0 or local_rank != 0):
        raise ValueError(f"rank 0 must be local rank 0 of node 0, got local rank {local_rank} of node {node}")
    own_error: BaseException | None = None

    def failure(err: BaseException) -> str:
        return f"rank {rank} (local rank {local_rank} of node {node}): {type(err).__name__}: {err}"

    # 1. rank 0 makes the temporary directory, beside the target, and tells every rank where it is
    head: list[Any] = [None]
    if rank == 0:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(target.parent)
            tmp = _tmp_name(target)
            tmp.mkdir()
            head = [str(tmp)]
        except OSError as err:
            own_error = err
            head = [{"error": failure(err)}]
    dist.broadcast_object_list(head, src=0)
    if isinstance(head[0], dict):
        raise CheckpointWriteError(target, _RankFailed(head[0]["error"])) from own_error
    tmp = Path(head[0])

    # 2. every rank of node 0 writes its model tensors and its optimizer pieces
    report: dict[str, Any] | None = None
    skeleton: dict[str, Any] = {}
    model_files: list[list[tuple[str, list[_Item]]]] = []
    if node == 0:
        streams: list[_ShardStream] = []
        try:
            skeleton, items = _split(checkpoint, {}, [])
            model = [it for it in items if it.kind == "model"]
            writer_of = _assign_model(model, local_size)
            plans = [_plan([it for it, r in zip(model, writer_of) if r == q], shard_bytes) for q in range(local_size)]
            count = sum(len(p) for p in plans)
            numbers = iter(range(1, count + 1))
            model_files = [[(f"model-{next(numbers):05d}-of-{count:05d}.safetensors", shard) for shard in p] for p in plans]
            opt_items, pieces, whole = _piece_items(checkpoint, owned, rank)
            opt_shards = _plan(opt_items, shard_bytes)
            opt_files = [(f"optimizer-r{rank:05d}-{k + 1:05d}.safetensors", shard) for k, shard in enumerate(opt_shards)]
            streams = [_ShardStream(tmp, model_files[local_rank], checksums), _ShardStream(tmp, opt_files, checksums)]
            for stream, files in zip(streams, (model_files[local_rank], opt_files)):
                for _, shard in files:
                    for it in shard:
                        stream.write(it)
                stream.close()
            report = {
                "model_crc": streams[0].checksums,
                "opt_map": {it.name: fname for fname, shard in opt_files for it in shard},
                "opt_crc": streams[1].checksums,
                "opt_bytes": sum(_nbytes(it.tensor) for it in opt_items),
                "pieces": pieces,
                "whole": whole,
                "states": [osd["state"] for osd in skeleton.get("optimizer_states", [])],
            }
        except Exception as err:  # noqa: BLE001 - reported to rank 0, raised on every rank
            own_error = err
            report = {"error": failure(err)}
            for stream in streams:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass

    # 3. rank 0 collects the reports, writes the indexes and the rest, and publishes
    reports: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(report, reports, dst=0)
    outcome: list[Any] = [None]
    if rank == 0:
        assert reports is not None
        errors = [r["error"] for r in reports if isinstance(r, dict) and "error" in r]
        try:
            if errors:
                raise _RankFailed("; ".join(errors))
            _finish_distributed(tmp, [r for r in reports if r is not None], skeleton, model_files, checksums)
            _publish(tmp, target)
        except Exception as err:  # noqa: BLE001 - raised on every rank
            shutil.rmtree(tmp, ignore_errors=True)
            if own_error is None:
                own_error = err
            outcome = [str(err) if isinstance(err, _RankFailed) else failure(err)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        # the same message on every rank; the local cause (if this rank failed) is chained
        raise CheckpointWriteError(target, _RankFailed(outcome[0])) from own_error


def _finish_distributed(
    tmp: Path, reports: list[dict[str, Any]], skeleton: dict[str, Any], model_files: list[list[tuple[str, list[_Item]]]], checksums: bool
) -> None:
    """Rank 0's part of :func:`save_sharded_distributed` once every writer is done: the indexes (with every
    rank's checksums and optimizer pieces, checked to cover each tensor once), the skeleton and the version."""
    model_map = {it.name: fname for files in model_files for fname, shard in files for it in shard}
    model_meta: dict[str, Any] = {"total_size": sum(_nbytes(it.tensor) for files in model_files for _, s in files for it in s), "format": FORMAT}
    opt_map: dict[str, str] = {}
    opt_meta: dict[str, Any] = {"total_size": sum(r["opt_bytes"] for r in reports), "format": FORMAT}
    if checksums:
        model_meta["crc32"] = {k: v for r in reports for k, v in r["model_crc"].items()}
        opt_meta["crc32"] = {k: v for r in reports for k, v in r["opt_crc"].items()}
    pieces: dict[str, dict[str, Any]] = {}
    whole: set[str] = set()
    states: list[dict[Any, dict[str, Any]]] = [{} for _ in skeleton.get("optimizer_states", [])]
    for r in reports:
        for name, fname in r["opt_map"].items():
            if name in opt_map:
                raise ValueError(f"optimizer tensor {name!r} was written by two ranks")
            opt_map[name] = fname
        whole.update(r["whole"])
        for logical, (shape, dtype, lo, hi, stored) in r["pieces"].items():
            entry = pieces.setdefault(logical, {"shape": shape, "dtype": dtype, "parts": []})
            if entry["shape"] != shape or entry["dtype"] != dtype:
                raise ValueError(f"ranks disagree on {logical!r}: shape {entry['shape']} {entry['dtype']} and {shape} {dtype}")
            entry["parts"].append([lo, hi, stored])
        for merged, state in zip(states, r["states"]):
            for idx, pstate in state.items():
                merged.setdefault(idx, {}).update(pstate)
    for logical, entry in pieces.items():
        entry["parts"].sort(key=lambda part: part[0])
        numel = 1
        for d in entry["shape"]:
            numel *= d
        problem = _check_cover(logical, numel, entry["parts"])
        if problem:
            raise ValueError(f"the ranks' optimizer state does not cover each element once: {problem}")
    for i, merged in enumerate(states):
        for idx, pstate in merged.items():
            for key, v in pstate.items():
                ref = v.name if isinstance(v, _Ref) else v["__megatrain_ref__"][1] if isinstance(v, dict) and "__megatrain_ref__" in v else None
                if ref is not None:
                    name = ref
                    if name not in pieces and name not in whole:
                        raise ValueError(f"no rank wrote optimizer tensor {name!r} (a 0-d state is written by the rank owning element 0)")
    skeleton = dict(skeleton)
    if "optimizer_states" in skeleton:
        skeleton["optimizer_states"] = [
            {**osd, "state": dict(sorted(merged.items()))} for osd, merged in zip(skeleton["optimizer_states"], states)
        ]
    with open(tmp / MODEL_INDEX, "w") as f:
        json.dump({"metadata": model_meta, "weight_map": model_map}, f, indent=1)
    with open(tmp / OPTIMIZER_INDEX, "w") as f:
        json.dump({"metadata": opt_meta, "weight_map": opt_map, PIECES_KEY: pieces}, f, indent=1)
    torch.save(skeleton, tmp / STATE_FILE)
    with open(tmp / META_FILE, "w") as f:
        json.dump({"format": FORMAT, "version": _VERSION_PIECES, "writers": len(reports)}, f)
    for name in (MODEL_INDEX, OPTIMIZER_INDEX, STATE_FILE, META_FILE):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- reading
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


def materialize(value: Any) -> Any:
    """``value`` with every :class:`Pieces` in it replaced by its whole tensor."""
    if isinstance(value, Pieces):
        return value.materialize()
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
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
                if isinstance(v, (Tensor, Pieces)) and v.dim() > 0 and tuple(v.shape) != tuple(params[idx].shape):
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
    if isinstance(obj, Pieces):
        return obj.materialize()
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    return obj


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


if __name__ == "__main__":
    raise SystemExit(main())
