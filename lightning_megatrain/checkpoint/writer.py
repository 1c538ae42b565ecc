"""Writing a checkpoint: streamed from host memory layer by layer (one process, maybe in the background) or by every data-parallel rank at once."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import shutil
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .format import (
    _DTYPES,
    _VERSION_PIECES,
    _VERSION_WHOLE,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    META_FILE,
    MODEL_INDEX,
    OPTIMIZER_INDEX,
    PIECES_KEY,
    STATE_FILE,
    CheckpointWriteError,
    _check_cover,
    _Item,
    _nbytes,
    _PathLike,
    _plan,
    _Ref,
    _ShardWriter,
    _split,
)
from .publish import _publish, _tmp_name, links_to, remove_stale, repoint_link

log = logging.getLogger(__name__)


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
    older one) is handed to ``after_publish``; it is dropped if the save fails. Symbolic links made to the
    target before it exists (``ModelCheckpoint(save_last="link")`` links as soon as ``save_checkpoint``
    returns) are held at the previous checkpoint by ``hold_links`` and pointed at this one when it is published.
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
        self._links: list[Path] = []  # links to the target held elsewhere until it is published
        self._link_lock = threading.Lock()  # publish + retarget vs hold_links
        self._links_final = False  # published (or failed): links made from now on are left alone
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

    def hold_links(self, fallback: Path | None) -> None:
        """Links to the target while it does not exist yet: point them at ``fallback`` (a complete
        checkpoint) or, without one, remove them, until this save is published, which points them at it.
        If the save fails they stay at ``fallback``."""
        with self._link_lock:
            if self._links_final or self.target.exists():
                return  # published, or an older checkpoint of that name is there until the atomic swap
            for link in links_to(self.target):
                if fallback is not None and fallback.exists() and os.path.realpath(fallback) != os.path.realpath(self.target):
                    repoint_link(link, fallback)
                else:
                    link.unlink()
                if link not in self._links:
                    self._links.append(link)

    def _retarget_links(self) -> None:
        for link in self._links:
            try:
                repoint_link(link, self.target)
            except OSError as err:  # the checkpoint is safe; the link still names the previous one
                log.warning("checkpoint %s was saved, but pointing %s at it failed: %r", self.target, link, err)

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
            with self._link_lock:
                _publish(tmp, target)
                published = self._links_final = True
                self._retarget_links()  # before any older checkpoint is removed (after_publish)
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
        with self._link_lock:
            self._links_final = True
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


class _RankFailed(Exception):
    """Another rank's failure, as that rank reported it."""


def _piece_items(
    checkpoint: Mapping[str, Any], owned: Sequence[Sequence[tuple[int, int, Sequence[int]]]], rank: int,
    groups: Sequence[Mapping[int, int]] = (),
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
            group = groups[i].get(idx, 0) if i < len(groups) else 0
            for key, v in pstate.items():
                if not isinstance(v, Tensor):
                    continue
                name = f"optimizer_states.{i}.state.{idx}.{key}"  # the name _split gives it (the skeleton's reference)
                if v.dim() == 0:
                    if lo == 0 and hi > 0:
                        items.append(_Item("optimizer", name, v, group))
                        whole.append(name)
                elif v.dim() == 1 and v.numel() == hi - lo:
                    if v.dtype not in _DTYPES:
                        raise TypeError(f"cannot write tensor {name!r} of dtype {v.dtype} to safetensors")
                    if hi > lo:
                        stored = f"{name}@{lo}"
                        items.append(_Item("optimizer", stored, v, group))
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



# ----------------------------------------------------------------------------- data parallel, in the background
_REPORT = ".megatrain-report-r{rank:05d}.pt"
_DONE = 1 << 31  # a rank's progress value once its writer has ended


class DistributedSave(ShardedSave):
    """One data-parallel save written in the background (``async_checkpoint`` with several devices).

    Made on every rank at once (a collective: rank 0 makes the temporary directory and tells the others).
    Then each rank of node 0 writes its files on a thread of its own, layer by layer, and publishes its
    progress on ``board`` (node-shared counters: ``publish(value)``, ``wait(value)`` until every rank of the
    node is there, ``gone(ranks)`` a sentence naming ranks whose process died, or None); ``wait_group(g)``, the gate of the node's optimizer
    updates, returns once every rank of the node has written its tensors of layer ``g`` (the weights are
    shared: another rank's update must not change what this one is writing). A rank that is done writes a
    report file into the directory; rank 0's thread waits for every report, writes the indexes and
    publishes, so a checkpoint is published only when every rank's part is complete. If any part fails,
    nothing is published, the directory is removed, and rank 0 raises the failures (each rank its own).
    No collective runs in the background: the training thread keeps the process group to itself.
    """

    def __init__(
        self, checkpoint: Mapping[str, Any], path: _PathLike, owned: Sequence[Sequence[tuple[int, int, Sequence[int]]]],
        local_rank: int, local_size: int, node: int, seq: int, board: Any, timeout_s: float,
        shard_bytes: int = DEFAULT_SHARD_BYTES, checksums: bool = False,
        model_groups: Mapping[str, int] | None = None, optimizer_groups: Sequence[Mapping[int, int]] = (),
    ) -> None:
        import torch.distributed as dist

        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.target = Path(path)
        self.rank, self.local_rank, self.local_size, self.node = dist.get_rank(), local_rank, local_size, node
        self.base, self.board, self.timeout_s = seq << 32, board, timeout_s
        self.shard_bytes, self.checksums = shard_bytes, checksums
        self._cond = threading.Condition()
        self._written_group, self._done, self._published, self._aborted = -1, False, False, False
        self._after: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._running, self._ended = threading.Event(), threading.Event()
        self._links, self._link_lock, self._links_final = [], threading.Lock(), False
        # 1. rank 0 makes the temporary directory beside the target and tells every rank (on this thread)
        head: list[Any] = [None]
        if self.rank == 0:
            try:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                remove_stale(self.target.parent)
                tmp = _tmp_name(self.target)
                tmp.mkdir()
                head = [str(tmp)]
            except OSError as err:
                head = [{"error": self._failure(err)}]
        dist.broadcast_object_list(head, src=0)
        if isinstance(head[0], dict):
            raise CheckpointWriteError(self.target, _RankFailed(head[0]["error"]))
        self.tmp = Path(head[0])
        # 2. what this rank writes, decided now (the rest of the checkpoint holds live objects)
        self.streams: list[tuple[_ShardStream, list[_Item]]] = []
        self.model_files: list[list[tuple[str, list[_Item]]]] = []
        skeleton: dict[str, Any] = {}
        self._report: dict[str, Any] = {}
        if node == 0:
            skeleton, items = _split(checkpoint, {}, [])
            groups = model_groups or {}
            model = [_Item(it.kind, it.name, it.tensor, groups.get(it.name, 0)) for it in items if it.kind == "model"]
            writer_of = _assign_model(model, local_size)
            plans = [_plan([it for it, r in zip(model, writer_of) if r == q], shard_bytes) for q in range(local_size)]
            count = sum(len(p) for p in plans)
            numbers = iter(range(1, count + 1))
            self.model_files = [[(f"model-{next(numbers):05d}-of-{count:05d}.safetensors", shard) for shard in p] for p in plans]
            opt_items, pieces, whole = _piece_items(checkpoint, owned, self.rank, optimizer_groups)
            opt_files = [(f"optimizer-r{self.rank:05d}-{k + 1:05d}.safetensors", shard) for k, shard in enumerate(_plan(opt_items, shard_bytes))]
            for files in (self.model_files[local_rank], opt_files):
                self.streams.append((_ShardStream(self.tmp, files, checksums), [it for _, shard in files for it in shard]))
            self._report = {
                "opt_map": {it.name: fname for fname, shard in opt_files for it in shard},
                "opt_bytes": sum(_nbytes(it.tensor) for it in opt_items), "pieces": pieces, "whole": whole,
                "states": [osd["state"] for osd in skeleton.get("optimizer_states", [])],
            }
        buffer = io.BytesIO()
        torch.save(skeleton, buffer)
        self._state_bytes = buffer.getvalue()

    def _failure(self, err: BaseException) -> str:
        return f"rank {self.rank} (local rank {self.local_rank} of node {self.node}): {type(err).__name__}: {err}"

    def wait_group(self, group: int) -> None:
        """Until every rank of the node has written its tensors of ``group`` (or its writer has ended)."""
        if self.node == 0:
            self.board.wait(self.base + group + 1)

    def run(self) -> None:
        published = False
        try:
            if self.node == 0:
                self._write_part()
            if self.rank == 0:
                self._gather_and_publish()
                published = True
        except BaseException as err:
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(err, CheckpointWriteError) or not isinstance(err, Exception):
                raise
            raise CheckpointWriteError(self.target, err) from err
        finally:
            after = self._finish(published)
        for fn in after:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - the new checkpoint is safe; an old one stays behind
                log.warning("checkpoint %s was saved, but removing an older one failed: %r", self.target, err)

    def _write_part(self) -> None:
        """This rank's files, in layer order across its streams, its progress published after each tensor."""
        left: dict[int, int] = {}
        for _, items in self.streams:
            for it in items:
                left[it.group] = left.get(it.group, 0) + 1
        report: dict[str, Any]
        try:
            queues = [list(reversed(items)) for _, items in self.streams]
            while any(queues):
                if self._aborted:
                    raise _Abandoned(f"the process exited while {self.target} was being written")
                k = min((q[-1].group, k) for k, q in enumerate(queues) if q)[1]
                it = queues[k].pop()
                self.streams[k][0].write(it)
                left[it.group] -= 1
                if not left[it.group]:
                    del left[it.group]
                self.set_progress(min(left, default=_DONE - 1))
            for stream, _ in self.streams:
                stream.close()
            report = {**self._report, "model_crc": self.streams[0][0].checksums, "opt_crc": self.streams[1][0].checksums}
        except BaseException as err:
            report = {"error": self._failure(err)}
            raise
        finally:
            self.set_progress(_DONE)  # the node's updates wait no more on this rank
            name = self.tmp / _REPORT.format(rank=self.rank)
            try:
                torch.save(report, name.with_suffix(".part"))
                os.replace(name.with_suffix(".part"), name)
            except OSError:
                pass  # the directory is gone (rank 0 gave the save up): nothing to report to

    def set_progress(self, first_unwritten: int) -> None:
        self.board.publish(self.base + first_unwritten)

    def _gather_and_publish(self) -> None:
        """Rank 0: every rank's report (or failure), then the indexes and the atomic publish."""
        import time

        wanted = {r: self.tmp / _REPORT.format(rank=r) for r in range(self.local_size)}
        reports: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(reports) < len(wanted):
            for r, name in wanted.items():
                if r not in reports and name.exists():
                    reports[r] = torch.load(name, weights_only=False)
            if len(reports) < len(wanted):
                if self._aborted:
                    raise _Abandoned(f"the process exited while {self.target} was being written")
                gone = self.board.gone([r for r in wanted if r not in reports])
                if gone or time.monotonic() > deadline:
                    raise _RankFailed(gone or f"ranks {sorted(set(wanted) - set(reports))} did not finish their part of the checkpoint within {self.timeout_s:.0f} s")
                time.sleep(0.01)
        errors = [rep["error"] for rep in reports.values() if "error" in rep]
        if errors:
            raise _RankFailed("; ".join(errors))
        for name in wanted.values():
            name.unlink()
        skeleton = torch.load(io.BytesIO(self._state_bytes), weights_only=False)
        _finish_distributed(self.tmp, [reports[r] for r in sorted(reports)], skeleton, self.model_files, self.checksums)
        with self._link_lock:
            _publish(self.tmp, self.target)
            self._links_final = True
            self._retarget_links()
