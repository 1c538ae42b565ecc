"""Training runs of tests/test_checkpoint_dp_resume.py, data parallel on 2 CPU processes (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ckpt_dp_resume_worker.py OUT SINGLE_CKPT

In one launch, each rank (with 2 samples per rank per step, i.e. the same global batch of 4 as a single
device with ``data(batch_size=4)``):

- ``full``: trains 12 steps from scratch, saving checkpoints at steps 6 and 12 under ``OUT/dp``;
- ``resumed``: resumes from ``OUT/dp/step=6.ckpt`` (written by these 2 ranks) and trains to step 12;
- ``from_single``: resumes from SINGLE_CKPT (written by one device at step 6) and trains to step 12;
- ``after_fit``: trains 6 steps, then (fit has ended) saves ``OUT/dp/after_fit.ckpt`` with
  ``trainer.save_checkpoint`` and records each rank's share of the optimizer state and ``strategy.owned``;
- ``resumed_after_fit``: resumes from ``OUT/dp/after_fit.ckpt`` and trains to step 12;
- ``async``: ``full`` again with ``async_checkpoint=True``, saving under ``OUT/dp_async`` (each rank writes
  its shards in the background; a checkpoint is published when every rank's part is written).

and writes ``OUT/<run>-rank<r>.pt``: the losses of its micro-batches and the final parameters.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ckpt_dp_resume_worker.py --failing-part OUT

trains 12 steps with ``async_checkpoint=True`` and saves at steps 4, 8, 12 under ``OUT/ck``; rank 1's
write of the step-8 save fails (a full disk). Each rank writes ``OUT/failing-rank<r>.txt``: what ``fit``
raised and the step it stopped at.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/models.py

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import lightning_megatrain  # noqa: E402,F401  (registers "megatrain")
from lightning_megatrain import MegaTrainStrategy  # noqa: E402
from lightning_megatrain import checkpoint as ck  # noqa: E402
from models import BlockLM, data  # noqa: E402

DEVICES = 2


class Saves(L.Callback):
    """The kind of background save in flight (or last ended) at each step's start."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        save = trainer.strategy._saving
        self.seen.append(None if save is None else (type(save).__name__, save.done))


def fit(name: str, out: Path, ckpt_path: Any = None, checkpoints: Path | None = None, max_steps: int = 12, save_after: Path | None = None,
        **options: Any) -> None:
    L.seed_everything(0)
    model = BlockLM(dropout=0.0)
    saves = Saves()
    callbacks: list[Any] = [saves] + ([ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=6, save_top_k=-1, filename="{step}")] if checkpoints else [])
    trainer = L.Trainer(
        strategy=MegaTrainStrategy(**options), accelerator="cpu", devices=DEVICES, max_steps=max_steps, logger=False,
        enable_checkpointing=bool(checkpoints), callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, data(batch_size=4 // DEVICES), ckpt_path=ckpt_path)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    record: dict[str, Any] = {"losses": model.losses, "params": params, "saves": saves.seen}
    if save_after is not None:
        optimizer = trainer.optimizers[0]
        named = dict(model.named_parameters())
        record["state"] = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in named.items() if p in optimizer.state}
        record["owned"] = {n: trainer.strategy.owned(p) for n, p in named.items()}
        trainer.save_checkpoint(save_after)
    torch.save(record, out / f"{name}-rank{trainer.global_rank}.pt")


def main(out: str, single: str) -> None:
    root = Path(out)
    fit("full", root, checkpoints=root / "dp")
    fit("resumed", root, ckpt_path=root / "dp" / "step=6.ckpt")
    fit("from_single", root, ckpt_path=single)
    fit("after_fit", root, max_steps=6, save_after=root / "dp" / "after_fit.ckpt")
    fit("resumed_after_fit", root, ckpt_path=root / "dp" / "after_fit.ckpt")
    real_write = ck._ShardWriter.write

    def slow_write(writer: Any, t: torch.Tensor) -> None:  # saves take several steps: the next updates must wait
        time.sleep(0.02)
        real_write(writer, t)

    ck._ShardWriter.write = slow_write  # type: ignore[method-assign]
    fit("async", root, checkpoints=root / "dp_async", async_checkpoint=True)
    ck._ShardWriter.write = real_write  # type: ignore[method-assign]


def failing_part(out: Path) -> None:
    real_write = ck._ShardWriter.write

    def write(writer: Any, t: torch.Tensor) -> None:
        time.sleep(0.01)  # a save takes several steps
        if os.environ["RANK"] == "1" and ".step=8.ckpt." in str(writer.path):  # in its temporary directory
            raise OSError(28, "No space left on device (test)")
        real_write(writer, t)

    ck._ShardWriter.write = write  # type: ignore[method-assign]
    L.seed_everything(0)
    trainer = L.Trainer(
        strategy=MegaTrainStrategy(async_checkpoint=True), accelerator="cpu", devices=DEVICES, max_steps=12, logger=False,
        callbacks=[ModelCheckpoint(dirpath=out / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(BlockLM(dropout=0.0), data(batch_size=4 // DEVICES))
        seen = "fit: ran"
    except Exception as err:  # noqa: BLE001 - recorded for the test
        seen = f"fit: {type(err).__name__}: {err}"
    (out / f"failing-rank{trainer.global_rank}.txt").write_text(f"{seen}\nstopped at step {trainer.global_step}")


if __name__ == "__main__":
    if sys.argv[1] == "--failing-part":
        failing_part(Path(sys.argv[2]))
    else:
        main(sys.argv[1], sys.argv[2])
