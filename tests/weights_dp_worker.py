"""One rank of the data parallel ``weights=`` test (tests/test_weights.py): a meta-built Llama filled from
``save_pretrained`` files by megatrain with ``devices=K``, then plain DDP loading them with ``from_pretrained``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_megatrain import MegaTrainStrategy  # noqa: E402
from models import data  # noqa: E402
from test_weights import HFModule  # noqa: E402


def main() -> None:
    hf, out, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    results: dict[str, Any] = {}
    # megatrain first: it starts the process group; DDP then finds it (as tests/dist_worker.py runs them)
    runs = (("megatrain", lambda: HFModule(), lambda: MegaTrainStrategy(weights=hf, fused_optimizer=False)),
            ("ddp", lambda: HFModule(source=hf), lambda: "ddp"))
    for name, make, strategy in runs:
        L.seed_everything(0)
        model = make()
        L.Trainer(
            strategy=strategy(), accelerator="cpu", devices=k, max_steps=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        ).fit(model, data())
        results[name] = {"losses": model.losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
