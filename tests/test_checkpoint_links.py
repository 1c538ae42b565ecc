"""``ModelCheckpoint(save_last="link")`` with async saves: ``last.ckpt`` only ever points at a complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain import checkpoint as ck
from models import BlockLM, data, trainer

HERE = Path(__file__).parent


def test_a_kill_during_an_async_save_resumes_from_last_at_the_published_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "ckpt_link_worker.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = tmp_path / "last.ckpt"
    # killed with step=4 in flight: the link still names step=2, published and complete
    assert "link -> step=2.ckpt" in proc.stdout, proc.stdout
    assert last.is_symlink() and os.readlink(last) == "step=2.ckpt" and ck.is_sharded_checkpoint(last)

    starts: list[int] = []

    class Start(L.Callback):
        def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
            starts.append(trainer.global_step)

    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=1, save_last="link", filename="{step}")
    t = trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=6, enable_checkpointing=True, callbacks=[cb, Start()])
    t.fit(BlockLM(dropout=0.0), data(), ckpt_path="last")
    assert starts == [2] and t.global_step == 6
    assert os.readlink(last) == "step=6.ckpt" and ck.is_sharded_checkpoint(last)


def test_the_link_never_dangles_and_names_the_newest_checkpoint_once_published(tmp_path: Path) -> None:
    seen: list[tuple[int, bool, str]] = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            last = tmp_path / "last.ckpt"
            if last.is_symlink():
                seen.append((trainer.global_step, last.exists(), os.readlink(last)))

    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1, save_last="link", filename="{step}")
    t = trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=8, enable_checkpointing=True, callbacks=[cb, Look()])
    t.fit(BlockLM(dropout=0.0), data())
    # at step 1 there is no complete checkpoint yet, so no link; after that it names one that exists
    assert [step for step, _, _ in seen][-6:] == [2, 3, 4, 5, 6, 7] and all(ok for _, ok, _ in seen), seen
    assert os.readlink(tmp_path / "last.ckpt") == "step=8.ckpt" and ck.is_sharded_checkpoint(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=8.ckpt"]
