"""Checkpoint claims whose breakage the older tests did not see: asynchronous saves overlap training,
``checkpoint_format="single_file"``, the ``export-hf`` command line, optimizer-state mismatches
refused before anything changes, and the ``renameat2`` exchange really used to overwrite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain import checkpoint as ck
from models import HFLM, BlockLM, data, trainer

HERE = Path(__file__).parent


# ----------------------------------------------------------------------------- async checkpoint
class SlowSteps(BlockLM):
    """Each training step takes at least ``step_s`` (stands for the GPU work a save can hide behind);
    records, at the first layer's forward of each step, whether the checkpoint was complete then."""

    def __init__(self, target: Path, step_s: float) -> None:
        super().__init__(n=4, dropout=0.0)
        self.target = target
        self.step_s = step_s
        self.saved_at_forward: dict[int, bool] = {}
        self.blocks[0].register_forward_hook(self._probe)

    def _probe(self, *args: Any) -> None:
        # a sharded save is published by renaming a finished directory into place: existence = complete
        self.saved_at_forward.setdefault(self.trainer.global_step, self.target.exists())

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        time.sleep(self.step_s)
        return super().training_step(batch, batch_idx)


class SaveAt(L.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit_saving(tmp: Path, async_checkpoint: bool, steps: int, step_s: float) -> tuple[SlowSteps, float]:
    target = tmp / "step=2.ckpt"
    L.seed_everything(0)
    model = SlowSteps(target, step_s)
    t = trainer(MegaTrainStrategy(async_checkpoint=async_checkpoint), max_steps=steps, callbacks=[SaveAt(2, target)])
    start = time.perf_counter()
    t.fit(model, data())
    return model, time.perf_counter() - start


def test_async_checkpoint_writes_while_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a slow disk (every fsync takes 0.15 s, ~1 s per save), the forward of the step after an
    asynchronous save runs before the checkpoint is complete, the run's wall time is below the
    synchronous run's by a good part of the save, and the checkpoint holds exactly the same step as
    the synchronous one. Guards against the save being made synchronous (seen red: the checkpoint
    exists at the next forward and the wall times are equal)."""
    real_fsync = os.fsync
    calls = [0]

    def slow_fsync(fd: int) -> None:
        calls[0] += 1
        time.sleep(0.15)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    steps, step_s = 12, 0.1  # 10 steps (>= 1 s) after the save, to hide it behind
    _fit_saving(tmp_path / "warm-up", False, 1, 0.0)  # first-fit costs out of both timings (no save)
    sync_model, sync_s = _fit_saving(tmp_path / "sync", False, steps, step_s)
    save_s = 0.15 * calls[0]
    async_model, async_s = _fit_saving(tmp_path / "async", True, steps, step_s)
    assert sync_model.saved_at_forward[3] is True
    assert async_model.saved_at_forward[3] is False, "the step after the save waited for the whole save"
    assert async_model.saved_at_forward[steps - 1] is True  # and it did complete during training
    assert async_s < sync_s - save_s / 2, f"async {async_s:.2f}s, sync {sync_s:.2f}s, one save {save_s:.2f}s"
    assert async_model.losses == sync_model.losses
    a, b = ck.load_sharded(tmp_path / "sync" / "step=2.ckpt"), ck.load_sharded(tmp_path / "async" / "step=2.ckpt")
    assert a["global_step"] == b["global_step"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- single_file format
def _fit_every(tmp: Path, strategy: Any, max_steps: int, ckpt_path: Any = None) -> BlockLM:
    L.seed_everything(0)
    model = BlockLM(dropout=0.0)  # resume at an epoch boundary (6 batches), no dropout: exact
    cb = ModelCheckpoint(dirpath=tmp, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    trainer(strategy, max_steps=max_steps, enable_checkpointing=True, callbacks=[cb]).fit(model, data(), ckpt_path=ckpt_path)
    return model


def test_single_file_checkpoint_format(tmp_path: Path) -> None:
    """``checkpoint_format="single_file"`` writes Lightning's usual one-file checkpoint (weights and
    host optimizer state of that step), which megatrain resumes from exactly and plain Lightning
    loads. Guards against the option being ignored (seen red: a directory is written)."""
    full = _fit_every(tmp_path / "full", MegaTrainStrategy(checkpoint_format="single_file"), 12)
    mid = _fit_every(tmp_path / "a", MegaTrainStrategy(checkpoint_format="single_file"), 6)
    path = tmp_path / "a" / "step=6.ckpt"
    assert path.is_file()
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 6
    for k, v in mid.state_dict().items():
        assert torch.equal(saved["state_dict"][k], v), k
    state = saved["optimizer_states"][0]["state"]
    assert len(state) == len(list(mid.parameters())) and all(s["exp_avg"].device.type == "cpu" for s in state.values())
    resumed = _fit_every(tmp_path / "b", MegaTrainStrategy(checkpoint_format="single_file"), 12, ckpt_path=path)
    assert resumed.losses == full.losses[6:]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(q, p)
    plain = _fit_every(tmp_path / "c", "auto", 7, ckpt_path=path)
    assert len(plain.losses) == 1


# ----------------------------------------------------------------------------- export-hf command line
def _cli() -> list[str]:
    exe = shutil.which("megatrain-checkpoint", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "lightning_megatrain.checkpoint"]


def test_export_hf_command_line(tmp_path: Path) -> None:
    """``megatrain-checkpoint export-hf DIR OUT --prefix model. --config CFG`` on a megatrain checkpoint
    writes what ``transformers`` loads with ``from_pretrained``, with the trained weights exactly.
    Guards against the command ignoring ``--prefix`` (seen red) or ``--config`` (seen red)."""
    transformers = pytest.importorskip("transformers")
    L.seed_everything(0)
    model = HFLM("llama", dropout=0.0)
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, filename="{step}")
    trainer("megatrain", max_steps=2, enable_checkpointing=True, callbacks=[cb]).fit(model, data())
    model.model.config.save_pretrained(tmp_path / "cfg")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = _cli() + ["export-hf", str(tmp_path / "ck" / "step=2.ckpt"), str(tmp_path / "hf"),
                    "--prefix", "model.", "--config", str(tmp_path / "cfg"), "--shard-bytes", str(32 * 1024)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    expected = model.model.state_dict()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())  # several shards
    assert sorted(index["weight_map"]) == sorted(expected)  # HF's own names (transformers would also
    # load "model."-prefixed names, so from_pretrained alone does not check the prefix was stripped)
    assert (tmp_path / "hf" / "config.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.state_dict().keys() == expected.keys()
    for name, p in hf.state_dict().items():
        assert torch.equal(p, expected[name]), name


# ----------------------------------------------------------------------------- optimizer-state mismatch
class Reordered(BlockLM):
    """The same parameters as BlockLM, handed to the optimizer in reverse order: every saved state
    tensor then belongs to a parameter of another shape."""

    def configure_optimizers(self) -> Any:
        self.opt = torch.optim.AdamW(list(self.parameters())[::-1], lr=1e-2)
        return self.opt


class TwoGroups(BlockLM):
    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        self.opt = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}], lr=1e-2)
        return self.opt


@pytest.mark.parametrize("make", [Reordered, TwoGroups], ids=["shapes", "groups"])
def test_optimizer_state_mismatch_is_refused_before_anything_changes(tmp_path: Path, make: Any) -> None:
    """Resuming with an optimizer whose state does not fit the checkpoint's raises
    ``CheckpointMismatchError`` naming the problem, and leaves the model's weights and the optimizer
    as they were. Guards against the check being dropped (seen red: torch's own error, or none, after
    the weights were overwritten) and against it running only after Lightning has loaded the
    weights (seen red before this test's fix: "nothing was loaded" while the model had changed)."""
    _fit_every(tmp_path, "megatrain", 6)
    L.seed_everything(1)
    model = make(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointMismatchError, match="optimizer state does not match the optimizer; nothing was loaded") as err:
        trainer("megatrain", max_steps=7).fit(model, data(), ckpt_path=tmp_path / "step=6.ckpt")
    assert ("parameter groups" in str(err.value)) == (make is TwoGroups)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the load was refused"
    assert not model.opt.state  # the optimizer was built, and got no state


# ----------------------------------------------------------------------------- renameat2 exchange
def _exchange_supported(tmp: Path) -> bool:
    """Probe the filesystem with renameat2 called here (not through the code under test)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    a, b = tmp / "probe-a", tmp / "probe-b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    try:
        at_fdcwd, rename_exchange = -100, 2
        ok = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
        return ok and (b / "x").exists()
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


def test_overwriting_a_checkpoint_takes_the_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem supports ``renameat2(RENAME_EXCHANGE)``, overwriting a checkpoint directory
    swaps it in with that one call (no moment without a checkpoint at the path), and the result is
    the new checkpoint alone. Guards against the exchange never being taken, e.g. a wrong flag
    (seen red with RENAME_NOREPLACE) or the two-rename fallback always used (seen red)."""
    if not sys.platform.startswith("linux") or not _exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    taken: list[bool] = []
    real = ck._exchange

    def spy(a: Path, b: Path) -> bool:
        taken.append(real(a, b))
        return taken[-1]

    monkeypatch.setattr(ck.publish, "_exchange", spy)
    target = tmp_path / "last.ckpt"
    ck.save_sharded({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, target)
    assert taken == []  # nothing to swap with on the first save
    ck.save_sharded({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, target)
    assert taken == [True]
    loaded = ck.load_sharded(target)
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_async_checkpoint_holds_the_callback_state_of_its_own_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An async save's loop and callback state is taken when the save starts: ModelCheckpoint changes
    its live ``best_k_models`` for the next save while this one is still being written. Guards against
    pickling that state on the writer thread at the end of the write (seen: step=4's checkpoint listed
    step=5 among its best models)."""

    class Improving(BlockLM):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            self.log("score", -float(self.global_step))  # strictly improving
            return loss

    real = ck._ShardWriter.write

    def slow(self: Any, t: Any) -> None:
        time.sleep(0.01)
        real(self, t)

    monkeypatch.setattr(ck._ShardWriter, "write", slow)
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="min", save_top_k=2, every_n_train_steps=1, filename="{step}")
    trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=5, enable_checkpointing=True, callbacks=[cb]).fit(
        Improving(dropout=0.0), data()
    )
    for path in sorted(tmp_path.glob("step=*.ckpt")):
        saved = ck.load_sharded(path)
        state = next(v for k, v in saved["callbacks"].items() if "ModelCheckpoint" in k)
        step = saved["global_step"]
        assert all(int(Path(k).name[5:-5]) <= step for k in state["best_k_models"]), (path.name, state["best_k_models"])


class WithSGD(BlockLM):
    def configure_optimizers(self) -> Any:
        self.opt = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        return self.opt


@pytest.mark.parametrize("fmt", ["sharded", "single_file"])
def test_resume_into_another_optimizer_is_refused_before_anything_changes(tmp_path: Path, fmt: str) -> None:
    """A checkpoint of AdamW resumed into SGD with momentum (the same parameters and groups) raises
    ``CheckpointMismatchError`` naming both optimizers, before the weights or the optimizer change.
    Seen red before the fix: no error at all here (the weights and the AdamW state loaded into SGD);
    reported elsewhere: a KeyError 'momentum' in the host worker after the weights had loaded."""
    _fit_every(tmp_path, MegaTrainStrategy(checkpoint_format=fmt), 6)
    path = tmp_path / "step=6.ckpt"
    assert path.is_dir() == (fmt == "sharded")
    L.seed_everything(1)
    model = WithSGD(dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointMismatchError, match=r"optimizer state is of Adam or AdamW, but the optimizer is SGD") as err:
        trainer(MegaTrainStrategy(checkpoint_format=fmt), max_steps=7).fit(model, data(), ckpt_path=path)
    assert "nothing was loaded" in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the load was refused"
    assert not model.opt.state
