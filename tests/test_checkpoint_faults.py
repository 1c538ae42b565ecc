"""Checkpoints under faults: kill -9 and Ctrl-C at random moments (sync and async), full disks, stale
temporary directories, damaged files."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain import CheckpointCorruptError, CheckpointWriteError, MegaTrainStrategy
from lightning_megatrain import checkpoint as ck
from models import BlockLM, data, trainer

HERE = Path(__file__).parent


# ----------------------------------------------------------------------------- kill -9 / Ctrl-C
class ForkServer:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(HERE.parent), "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ckpt_fork_server.py")], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.children: set[int] = set()

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the fork server died (exit code {self.proc.poll()})"
        return answer

    def run(self, out: Path, mode: str, keep: str, sleep_ms: float = 2.0) -> int:
        pid = int(self._ask(f"run {out} {mode} {keep} {sleep_ms}"))
        self.children.add(pid)
        return pid

    def reap(self, pid: int) -> str:
        self.children.discard(pid)
        return self._ask(f"reap {pid}")

    def close(self) -> None:
        for pid in list(self.children):
            os.kill(pid, signal.SIGKILL)
            self.reap(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    s = ForkServer()
    yield s
    s.close()


def _visible(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def _hidden(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []


def _loads(path: Path) -> bool:
    """A complete checkpoint: every file checks out and every tensor can be read."""
    try:
        state = ck.load_sharded(path)
    except (CheckpointCorruptError, FileNotFoundError):
        return False
    tensors = list(state["state_dict"].values()) + [
        v for s in state["optimizer_states"][0]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)
    ]
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)
    return state["global_step"] >= 1


def _wait_for(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("keep", ["top_k", "last"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_repeated_kill_9_always_leaves_a_complete_checkpoint(server: ForkServer, tmp_path: Path, mode: str, keep: str) -> None:
    """``ModelCheckpoint(save_top_k=1)`` rotates names (deletes the previous one), ``save_last=True``
    overwrites one name; kill -9 at random moments, restart in the same directory, kill again."""
    out = tmp_path / "ckpts"
    rng = random.Random(f"{mode}-{keep}")
    mid_save = 0
    kills = 6
    for i in range(kills):
        pid = server.run(out, mode, keep)
        if i == 0:  # "once one checkpoint was complete"
            _wait_for(lambda: any(_loads(p) for p in _visible(out)))
        # once this process has begun to save (and so to clean up), at a random moment
        _wait_for(lambda: any(f"-{pid}-" in p.name for p in _hidden(out)))
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        assert server.reap(pid) == f"signal {signal.SIGKILL}"
        visible = _visible(out)
        # every checkpoint in sight is complete (none half-written, none half-deleted), and there is one
        assert visible and all(_loads(p) for p in visible), [p.name for p in visible]
        # what is hidden belongs to the process just killed: each save cleaned up after the earlier ones
        # (with top_k the names differ every step: not only same-name temporaries are removed)
        owners = {ck._AUX.match(p.name)["pid"] for p in _hidden(out)}  # type: ignore[index]
        assert owners <= {str(pid)}, [p.name for p in _hidden(out)]
        mid_save += bool(owners)
    assert mid_save >= 1, "no kill landed inside a save: the test did not test anything"


def test_ctrl_c_during_an_async_save_completes_it(server: ForkServer, tmp_path: Path) -> None:
    out = tmp_path / "ckpts"
    # with two saves per step the training thread mostly waits in the second save for the first one:
    # the interrupt cuts that wait short, and the write must still be completed, not abandoned
    pid = server.run(out, "async", "both", sleep_ms=5.0)
    _wait_for(lambda: any(_loads(p) for p in _visible(out)))
    # interrupt while a save is being written
    _wait_for(lambda: any(p.name.startswith(".step=") and ".megatrain-tmp-" in p.name for p in _hidden(out)))
    in_flight = next(p for p in _hidden(out) if p.name.startswith(".step=") and ".megatrain-tmp-" in p.name).name.split(".megatrain-")[0][1:]
    os.kill(pid, signal.SIGINT)
    assert server.reap(pid) == "exit 1"  # Lightning's graceful shutdown
    assert _hidden(out) == [], "a half-written checkpoint was left behind"
    visible = _visible(out)
    assert visible and all(_loads(p) for p in visible)
    # the save that was being written was completed (or superseded by a later one before the interrupt)
    assert in_flight in {p.name for p in visible} or int(in_flight[5:-5]) < max(ck.load_sharded(p)["global_step"] for p in visible)


# ----------------------------------------------------------------------------- write errors
def _enospc_after(monkeypatch: pytest.MonkeyPatch, ok_saves: int) -> None:
    """Writes fail with ENOSPC from save number ``ok_saves + 1`` on."""
    real = ck._ShardWriter.__init__
    files = {"n": 0}

    def init(self: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        real(self, path, *args, **kwargs)
        if path.name.startswith("model-00001-"):
            files["n"] += 1
        if files["n"] > ok_saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck._ShardWriter, "__init__", init)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _enospc_after(monkeypatch, ok_saves=1)
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, filename="{step}")
    t = trainer(MegaTrainStrategy(), max_steps=6, enable_checkpointing=True, callbacks=[cb])
    with pytest.raises(CheckpointWriteError) as info:
        t.fit(BlockLM(dropout=0.0), data())
    assert str(tmp_path / "step=4.ckpt") in str(info.value) and "No space left on device" in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert _visible(tmp_path) == [tmp_path / "step=2.ckpt"] and _loads(tmp_path / "step=2.ckpt")
    assert _hidden(tmp_path) == []


def test_a_failed_async_write_is_raised_at_the_next_training_step_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _enospc_after(monkeypatch, ok_saves=1)
    L.seed_everything(0)
    seen: list[int] = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            seen.append(trainer.global_step)
            save = trainer.strategy._saving
            if save is not None:
                save.join()  # let the background write end, so that this step is the one that reports it

    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, filename="{step}")
    model = BlockLM(dropout=0.0)
    t = trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=8, enable_checkpointing=True, callbacks=[Steps(), cb])
    with pytest.raises(CheckpointWriteError) as info:
        t.fit(model, data())
    assert str(tmp_path / "step=4.ckpt") in str(info.value) and "No space left on device" in str(info.value)
    assert seen[-1] == 4 and len(model.losses) == 4  # raised in the step after the failed save, before its forward
    # the deletion of step=2 that ModelCheckpoint asked for waited for step=4, which never came
    assert _visible(tmp_path) == [tmp_path / "step=2.ckpt"] and _loads(tmp_path / "step=2.ckpt")
    assert _hidden(tmp_path) == []


def test_async_deletes_older_checkpoints_only_after_the_new_one_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_publish, real_remove = ck._publish, ck.remove_checkpoint

    def publish(tmp: Path, target: Path) -> None:
        time.sleep(0.05)
        real_publish(tmp, target)
        order.append(f"publish {target.name}")

    def remove(path: Any) -> None:
        assert Path(path).is_dir()
        order.append(f"remove {Path(path).name}")
        real_remove(path)

    monkeypatch.setattr(ck.writer, "_publish", publish)
    monkeypatch.setattr("lightning_megatrain.checkpoint.strategy_io.remove_checkpoint_dir", remove)
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, filename="{step}")
    t = trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=6, enable_checkpointing=True, callbacks=[cb])
    t.fit(BlockLM(dropout=0.0), data())
    assert order == ["publish step=2.ckpt", "publish step=4.ckpt", "remove step=2.ckpt", "publish step=6.ckpt", "remove step=4.ckpt"]
    assert _visible(tmp_path) == [tmp_path / "step=6.ckpt"] and _hidden(tmp_path) == []


def test_write_errors_of_a_direct_save_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "one.ckpt"
    ck.save_sharded({"state_dict": {"w": torch.zeros(4)}, "global_step": 1}, target)

    def full(self: Any, t: torch.Tensor) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck._ShardWriter, "write", full)
    with pytest.raises(CheckpointWriteError, match=rf"{target}.*No space left on device"):
        ck.save_sharded({"state_dict": {"w": torch.ones(4)}, "global_step": 2}, target)
    assert ck.load_sharded(target)["global_step"] == 1 and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- stale temporaries
def test_any_save_removes_stale_temporaries_of_dead_processes_and_puts_back_a_moved_checkpoint(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    host = ck._HOST

    def make(name: str, complete: bool = False) -> Path:
        p = tmp_path / name
        p.mkdir()
        (p / "partial.safetensors").write_bytes(b"x" * 100)
        return p

    ck.save_sharded({"state_dict": {"w": torch.full((3,), 7.0)}, "global_step": 7}, tmp_path / ".moved")
    os.rename(tmp_path / ".moved", tmp_path / f".last.ckpt.megatrain-old-{dead}-0123abcd-{host}")  # killed mid-swap
    stale = [
        make(f".step=3.ckpt.megatrain-tmp-{dead}-0123abcd-{host}"),  # another name than the next save's
        make(f".step=1.ckpt.megatrain-del-{dead}-0123abcd-{host}"),  # a removal cut short
        make(f".x.ckpt.megatrain-tmp-{dead}-89abcdef"),  # the format of earlier versions (no host)
    ]
    kept = [
        make(f".y.ckpt.megatrain-tmp-{os.getpid()}-0123abcd-{host}"),  # this process
        make(f".y.ckpt.megatrain-tmp-1-0123abcd-{host}"),  # a live process
        make(f".y.ckpt.megatrain-tmp-{dead}-0123abcd-otherhost"),  # another host (shared filesystem)
        make(".not-ours"),
    ]
    ck.save_sharded({"state_dict": {"w": torch.zeros(3)}, "global_step": 9}, tmp_path / "step=9.ckpt")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert ck.load_sharded(tmp_path / "last.ckpt")["global_step"] == 7  # put back where it was
    assert _visible(tmp_path) == [tmp_path / "last.ckpt", tmp_path / "step=9.ckpt"]


def test_publish_without_exchange_undoes_a_failed_second_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.ckpt"
    ck.save_sharded({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, target)
    monkeypatch.setattr(ck.publish, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(b) == target and ".megatrain-tmp-" in Path(a).name:
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(ck.publish.os, "rename", rename)
    with pytest.raises(CheckpointWriteError, match="I/O error"):
        ck.save_sharded({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, target)
    monkeypatch.setattr(ck.publish.os, "rename", real_rename)
    assert ck.load_sharded(target)["global_step"] == 1 and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=1, filename="ck")
    t = trainer(MegaTrainStrategy(checkpoint_shard_bytes=4096), max_steps=2, enable_checkpointing=True, callbacks=[cb])
    t.fit(BlockLM(dropout=0.0), data())
    return root / "ck.ckpt"


def _copy(good: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(good, tmp_path / "ck.ckpt"))


def _shard(d: Path, kind: str = "model", i: int = 1) -> Path:
    return sorted(d.glob(f"{kind}-*.safetensors"))[i - 1]


def _truncate(d: Path) -> str:
    f = max(d.glob("model-*.safetensors"), key=lambda p: p.stat().st_size)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 10)
    return rf"{f.name}: truncated: expected {size} bytes, the file has {size - 10}"


def _bad_length(d: Path) -> str:
    f = _shard(d, "optimizer", 2)
    with open(f, "r+b") as fh:
        fh.write((2**40).to_bytes(8, "little"))
    return rf"{f.name}: bad header: header length {2**40}"


def _bad_json(d: Path) -> str:
    f = _shard(d)
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"#garbage")
    return rf"{f.name}: bad header: not valid JSON"


def _index_entry_without_tensor(d: Path) -> str:
    index = json.loads((d / ck.MODEL_INDEX).read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["blocks.9.fc.weight"] = shard
    (d / ck.MODEL_INDEX).write_text(json.dumps(index))
    return rf"{shard}: {ck.MODEL_INDEX} lists tensor 'blocks.9.fc.weight'.*not in this file"


def _missing_meta(d: Path) -> str:
    (d / ck.META_FILE).unlink()
    return r"megatrain.json: file missing"


def _bad_meta(d: Path) -> str:
    (d / ck.META_FILE).write_text('{"format": ')
    return r"megatrain.json: not valid JSON"


def _missing_shard(d: Path) -> str:
    f = _shard(d, "optimizer")
    f.unlink()
    return rf"{f.name}: file missing"


def _missing_index(d: Path) -> str:
    (d / ck.OPTIMIZER_INDEX).unlink()
    return rf"{ck.OPTIMIZER_INDEX}: file missing"


def _truncated_state(d: Path) -> str:
    f = d / ck.STATE_FILE
    f.write_bytes(f.read_bytes()[:50])
    return rf"{ck.STATE_FILE}: unreadable"


DAMAGES = [_truncate, _bad_length, _bad_json, _index_entry_without_tensor, _missing_meta, _bad_meta, _missing_shard, _missing_index, _truncated_state]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__.strip("_") for d in DAMAGES])
def test_a_damaged_checkpoint_is_named_before_anything_changes(good: Path, tmp_path: Path, damage: Any) -> None:
    d = _copy(good, tmp_path)
    expected = damage(d)
    with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {d} is damaged: {expected}") as info:
        MegaTrainStrategy().load_checkpoint(d)
    assert info.value.checkpoint == d


def test_resuming_from_a_damaged_checkpoint_leaves_the_model_unchanged(good: Path, tmp_path: Path) -> None:
    d = _copy(good, tmp_path)
    _truncate(d)
    L.seed_everything(1)
    model = BlockLM(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        trainer(MegaTrainStrategy(), max_steps=4).fit(model, data(), ckpt_path=d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.losses == []


def test_checksums_catch_a_flipped_byte(tmp_path: Path) -> None:
    state = {"state_dict": {"w": torch.arange(64.0), "v": torch.ones(8)}, "global_step": 3}
    plain, summed = tmp_path / "plain", tmp_path / "summed"
    ck.save_sharded(state, plain)
    ck.save_sharded(state, summed, checksums=True)
    index = json.loads((summed / ck.MODEL_INDEX).read_text())
    assert set(index["metadata"]["crc32"]) == set(index["weight_map"].values())
    assert ck.load_sharded(summed)["global_step"] == 3
    for d in (plain, summed):
        f = _shard(d)
        raw = bytearray(f.read_bytes())
        raw[-3] ^= 0x40  # inside the data: sizes and headers stay valid
        f.write_bytes(bytes(raw))
    loaded = ck.load_sharded(plain)["state_dict"]  # undetected without checksums
    assert not all(torch.equal(loaded[k], v) for k, v in state["state_dict"].items())
    with pytest.raises(CheckpointCorruptError, match=rf"{_shard(summed).name}: checksum mismatch"):
        ck.load_sharded(summed)


def test_strategy_writes_checksums_when_asked(tmp_path: Path) -> None:
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, filename="ck")
    t = trainer(MegaTrainStrategy(checkpoint_checksums=True), max_steps=2, enable_checkpointing=True, callbacks=[cb])
    t.fit(BlockLM(dropout=0.0), data())
    for index in (ck.MODEL_INDEX, ck.OPTIMIZER_INDEX):
        assert json.loads((tmp_path / "ck.ckpt" / index).read_text())["metadata"]["crc32"]
    assert _loads(tmp_path / "ck.ckpt")
