"""Putting a finished checkpoint in place atomically, and removing checkpoints and dead saves' leftovers."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

from ..engine.procs import pid_alive
from .format import _PathLike

log = logging.getLogger(__name__)


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


def links_to(target: Path) -> list[Path]:
    """The symbolic links in ``target``'s directory that resolve to ``target`` (which may not exist yet)."""
    want = os.path.realpath(target)
    out = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        if entry.is_symlink() and not _AUX.match(entry.name) and os.path.realpath(entry.path) == want:
            out.append(Path(entry.path))
    return out


def repoint_link(link: Path, dest: Path) -> None:
    """Make ``link`` a symbolic link to ``dest`` (relative, as ``ModelCheckpoint`` makes them), replacing
    what was there atomically: the link exists at every moment, naming the old or the new checkpoint."""
    tmp = _aux_name(link, "tmp")
    os.symlink(os.path.relpath(dest, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink()
        raise
    _fsync_dir(link.parent)


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
