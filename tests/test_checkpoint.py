"""Lightning's single-file checkpoints: exact resume, resume from plain Lightning, state on the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain.checkpoint import load_any
from models import HFLM, BlockLM, data, trainer


def _nodrop() -> BlockLM:
    # Lightning restores no RNG state and restarts a plain DataLoader at an epoch start: resume at an
    # epoch boundary (6 batches) with no dropout is exact in plain Lightning, so it must be here too.
    return BlockLM(dropout=0.0)


def _fit(strategy: str, tmp: Path, max_steps: int, ckpt_path: Any = None, make: Any = _nodrop) -> tuple[Any, Any]:
    L.seed_everything(0)
    model = make()
    cb = ModelCheckpoint(dirpath=tmp, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    t = trainer(strategy, max_steps=max_steps, enable_checkpointing=True, callbacks=[cb])
    t.fit(model, data(), ckpt_path=ckpt_path)
    return model, t


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    full, _ = _fit("megatrain", tmp_path / "a", max_steps=12)
    ckpt = tmp_path / "a" / "step=6.ckpt"
    assert ckpt.exists()
    resumed, _ = _fit("megatrain", tmp_path / "b", max_steps=12, ckpt_path=ckpt)
    assert len(resumed.losses) == 6
    assert resumed.losses == full.losses[6:]
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_checkpoint_matches_plain_lightning_and_resumes_from_it(tmp_path: Path) -> None:
    plain, _ = _fit("auto", tmp_path / "plain", max_steps=12)
    mega, _ = _fit("megatrain", tmp_path / "mega", max_steps=6)
    a = torch.load(tmp_path / "plain" / "step=6.ckpt", weights_only=False)
    assert (tmp_path / "mega" / "step=6.ckpt").is_dir()  # megatrain writes a sharded directory
    b = load_any(tmp_path / "mega" / "step=6.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=1e-5, atol=1e-6)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert sb[k][name].device.type == "cpu"
            torch.testing.assert_close(sb[k][name], sa[k][name], rtol=1e-5, atol=1e-7)
    # megatrain resumes from the checkpoint plain Lightning wrote
    resumed, _ = _fit("megatrain", tmp_path / "c", max_steps=12, ckpt_path=tmp_path / "plain" / "step=6.ckpt")
    assert len(resumed.losses) == 6
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(plain.losses[6:]), rtol=1e-5, atol=1e-6)
    for p, q in zip(plain.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_bf16_resume_refreshes_the_compute_copy(tmp_path: Path) -> None:
    def run(ckpt: Any, d: str, steps: int) -> Any:
        L.seed_everything(0)
        model = HFLM("llama", dropout=0.0)
        cb = ModelCheckpoint(dirpath=tmp_path / d, every_n_train_steps=6, save_top_k=-1, filename="{step}")
        t = trainer("megatrain", precision="bf16-mixed", max_steps=steps, enable_checkpointing=True, callbacks=[cb])
        t.fit(model, data(), ckpt_path=ckpt)
        return model

    full = run(None, "a", 8)
    resumed = run(tmp_path / "a" / "step=6.ckpt", "b", 8)
    assert len(resumed.losses) == 2
    assert resumed.losses == full.losses[6:]
