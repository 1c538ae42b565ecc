"""The shipped example must keep working: it is the first thing a user runs.

The end-to-end tests run the script in a subprocess, as a user would, so the CLI parsing, the strategy
registration on import and both strategy forms (registered name and class_path) are exercised.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_llama.py"
CONFIG = REPO / "examples" / "configs" / "cpu_tiny.yaml"
CORPUS = REPO / "examples" / "data" / "tiny_corpus.txt"

# A few steps of a ~20K-parameter model: the cost is dominated by importing torch/lightning/transformers.
TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.intermediate_size=64",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--model.num_kv_heads=1",
    "--data.seq_len=32",
    "--data.batch_size=4",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the checkout's package, not whatever else may be installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CUDA_VISIBLE_DEVICES"] = ""  # these tests pin the CPU; keep a present GPU out of the picture
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,  # a hang must fail the test, not the CI job
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}; output:\n{proc.stdout[-6000:]}"
    return proc


def test_config_file_with_class_path_strategy(tmp_path: Path) -> None:
    proc = _run(
        [
            "fit",
            f"--config={CONFIG}",
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=REPO,
    )
    assert "megatrain memory plan" in proc.stdout
    assert "3 streamed layers" in proc.stdout  # num_layers from the config file
    assert "max_steps=3` reached" in proc.stdout


def test_registered_name_from_another_directory(tmp_path: Path) -> None:
    """String form of the strategy; run outside the repo so the default corpus must resolve next to the script."""
    proc = _run(
        [
            "fit",
            "--trainer.strategy=megatrain",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--model.warmup_steps=2",
            *TINY_MODEL,
        ],
        cwd=tmp_path,
    )
    assert "megatrain memory plan" in proc.stdout
    assert "2 streamed layers" in proc.stdout

    (metrics_file,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics_file.open() as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train) == 4 and len(val) == 2, rows
    assert all(math.isfinite(x) for x in train + val)
    # random init over 256 bytes starts near ln(256); a few steps must not blow it up
    assert train[0] < 1.5 * math.log(256)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pretrain_llama_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_corpus_is_text() -> None:
    raw = CORPUS.read_bytes()
    assert 60_000 <= len(raw) <= 120_000
    text = raw.decode("utf-8")
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.9


def test_datamodule_split_and_windows(example: ModuleType) -> None:
    dm = example.ByteTextDataModule(seq_len=64, batch_size=8, val_fraction=0.1)
    assert dm.path == CORPUS  # None resolves to the shipped corpus, wherever the process runs
    dm.setup("fit")
    n = len(CORPUS.read_bytes())
    train_bytes, val_bytes = len(dm.train_set.data), len(dm.val_set.data)
    assert train_bytes + val_bytes == n and val_bytes == int(n * 0.1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 64) and batch.dtype == torch.long
    assert int(batch.max()) < example.VOCAB_SIZE
    assert len(next(iter(dm.val_dataloader()))) > 0

    no_val = example.ByteTextDataModule(seq_len=64, val_fraction=0.0)
    no_val.setup("fit")
    assert no_val.val_dataloader() == []


def test_warmup_cosine_schedule(example: ModuleType) -> None:
    f = example.warmup_cosine
    assert [f(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 20) == pytest.approx(1.0)
    assert f(20, 4, 20) == pytest.approx(0.1)
    assert f(100, 4, 20) == pytest.approx(0.1)  # past the end: stays at the floor
    assert f(0, 0, 1) == pytest.approx(1.0)  # no warmup
