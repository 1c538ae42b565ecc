"""The benchmark scripts run (tiny sizes, CPU, not timed): they must not rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


def test_long_context_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "lc.json"
    _load("long_context").main(["--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
                                "--vocab", "256", "--min-len", "32", "--max-len", "64", "--chunk-mlp", "2", "--precision", "fp32",
                                "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["offload_activations"] for r in result["runs"]] == [False, True]
    assert all(r["longest"]["length"] == 64 for r in result["runs"]) and "cpu_cores" in result["machine"]


def test_checkpoint_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ck.json"
    _load("checkpoint").main(["--hidden", "32", "--layers", "2", "--steps", "5", "--every", "2", "--seq", "8", "--batch", "2",
                              "--shard-mib", "1", "--dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["training"]] == ["none", "sync", "async"]
    assert result["save_load"]["save_s"] > 0


def test_chunked_loss_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cl.json"
    _load("chunked_loss").main(["--sizes", "64x512", "--hidden", "16", "--chunk", "16", "--repeat", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text())
