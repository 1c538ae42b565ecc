"""What the examples share: fixed-length token windows, the causal LM loss, logging, AdamW (decay on matrices only) and a
linear-warmup cosine schedule stepped every optimizer step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"


class TokenWindows(Dataset):
    """Fixed-length windows over a token stream; labels are the inputs (HF shifts them)."""

    def __init__(self, data: Tensor, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.data) // self.seq_len

    def __getitem__(self, i: int) -> Tensor:
        start = i * self.seq_len
        return self.data[start : start + self.seq_len].long()


class TextWindowsDataModule(pl.LightningDataModule):
    """A UTF-8 text file as tokens (bytes unless ``tokenize`` is overridden), split into a train head and a
    validation tail: a contiguous tail rather than random windows, so no training window overlaps a
    validation one. Subclasses call ``save_hyperparameters()`` for their own arguments."""

    def __init__(self, path: Optional[str], seq_len: int, batch_size: int, val_fraction: float, num_workers: int) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a causal LM needs a next token), got {seq_len}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path = Path(path) if path is not None else DEFAULT_CORPUS
        self.seq_len, self.batch_size, self.val_fraction, self.num_workers = seq_len, batch_size, val_fraction, num_workers
        self.train_set: Optional[TokenWindows] = None
        self.val_set: Optional[TokenWindows] = None

    def tokenize(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return  # fit then validate in one process: read the file once
        data = self.tokenize(self.path.read_text(encoding="utf-8"))
        n_val = int(len(data) * self.val_fraction)
        if n_val and n_val < self.seq_len:
            n_val = self.seq_len  # at least one validation window
        self.train_set = TokenWindows(data[: len(data) - n_val], self.seq_len)
        self.val_set = TokenWindows(data[len(data) - n_val :], self.seq_len)
        if len(self.train_set) < 1:
            raise ValueError(
                f"{self.path} gives {len(data)} tokens: too few for seq_len={self.seq_len} "
                f"with val_fraction={self.val_fraction}"
            )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) >= self.batch_size,  # equal-sized steps when possible
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> Any:
        assert self.val_set is not None
        if len(self.val_set) == 0:
            return []  # val_fraction=0: Lightning skips validation
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear ramp over ``warmup`` steps, then cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(pl.LightningModule):
    """Base of the examples' modules: ``self.model`` is an HF causal LM; ``hparams`` hold ``lr``,
    ``weight_decay`` and ``warmup_steps``."""

    model: Any

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _loss(self, batch: Tensor) -> Tensor:
        # HF shifts labels by one inside the model: position t predicts token t+1.
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.shape[0])
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        # fused/foreach left unset: megatrain picks torch's fused CPU kernel for the host step
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
