"""One fit in a fresh process, for tests/test_plan_truth.py: print the peak RSS it grew by and the plan.

An HF Llama with SmolLM-135M's layers (hidden 576, 30 layers, GQA 9/3 heads, MLP 1536) and a 2048-token
vocabulary (~108M parameters), bf16-mixed AdamW, three steps of 2x64 tokens and a checkpoint saved after
the second: construction, setup, the first optimizer step (where state is made), later steps and a save
are all inside the measured fit. Peak = the kernel's high-water mark (``VmHWM``) minus the resident
memory after the imports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def config(size: str) -> Any:
    import transformers

    shape = {"smol": (576, 1536, 30, 9, 3), "tiny": (64, 128, 2, 4, 2)}[size]
    return transformers.LlamaConfig(
        vocab_size=2048 if size == "smol" else 256, hidden_size=shape[0], intermediate_size=shape[1], num_hidden_layers=shape[2],
        num_attention_heads=shape[3], num_key_value_heads=shape[4], tie_word_embeddings=True,
    )


def main(mode: str, ckpt_dir: str, size: str = "smol", weights: str = "") -> None:
    """``weights``: a ``save_pretrained`` directory of the model; then it is built on the meta device and
    filled from the files at setup (``MegaTrainStrategy(weights=...)``)."""
    import lightning as L
    import torch
    import transformers
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_megatrain

    base = _vm("VmRSS")
    cfg = config(size)

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if not weights:
                self.model = transformers.LlamaForCausalLM(cfg)

        def configure_model(self) -> None:
            if weights and not hasattr(self, "model"):
                with torch.device("meta"):
                    self.model = transformers.LlamaForCausalLM(cfg)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch, use_cache=False).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    model = LM()
    data = torch.utils.data.DataLoader(torch.randint(0, cfg.vocab_size, (6, 64)), batch_size=2)
    trainer = L.Trainer(
        strategy=lightning_megatrain.MegaTrainStrategy(host_memory=mode, weights=weights or None), precision="bf16-mixed", max_steps=3,
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=ckpt_dir,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(model, data)
    plan = trainer.strategy.memory_plan
    saved = sorted(p.name for p in Path(ckpt_dir).iterdir())
    print(json.dumps({"mode": mode, "grew": _vm("VmHWM") - base, "params": plan.params, "plan_host": plan.host_total,
                      "plan_device": plan.device_total, "saved": saved}))


if __name__ == "__main__":
    main(*sys.argv[1:])
