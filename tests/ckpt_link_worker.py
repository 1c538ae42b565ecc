"""Worker of tests/test_checkpoint_links.py: trains with ``ModelCheckpoint(save_last="link")`` and an async
save every 2 steps, holds the publish of ``step=4.ckpt``, and kills itself (SIGKILL) while that save is in flight.

    python ckpt_link_worker.py <out_dir>
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_megatrain import MegaTrainStrategy  # noqa: E402
from lightning_megatrain.checkpoint import writer  # noqa: E402
from models import BlockLM, data, trainer  # noqa: E402

HOLD = threading.Event()  # never set: the save of step=4 stays in flight until the process dies
real_publish = writer._publish


def publish(tmp: Path, target: Path) -> None:
    if target.name == "step=4.ckpt":
        HOLD.wait()
    real_publish(tmp, target)


class KillInFlight(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        save = trainer.strategy._saving
        if trainer.global_step == 4 and save is not None and not save.done:
            print(f"link -> {os.readlink(Path(sys.argv[1]) / 'last.ckpt')}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    writer._publish = publish
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=2, save_top_k=1, save_last="link", filename="{step}")
    t = trainer(MegaTrainStrategy(async_checkpoint=True), max_steps=8, enable_checkpointing=True, callbacks=[cb, KillInFlight()])
    t.fit(BlockLM(dropout=0.0), data())
    sys.exit(3)  # not reached: killed at step 4
