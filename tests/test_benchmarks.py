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


def test_limits_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "limits.json"
    _load("limits").main(["--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
                          "--vocab", "256", "--seq", "16", "--batch", "2", "--copy-mib", "8", "--matmul", "128",
                          "--adam-params", "100000", "--steps", "2", "--precision", "fp32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["lower_bound_s"] > 0 and result["megatrain_step_s"] > 0
    assert set(result["bounds"]) == {"compute_s", "pcie_s", "host_optimizer_s"}


def test_throughput_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = _load("throughput")
    # the parent runs each strategy in a subprocess and tabulates; DeepSpeed/FSDP are skipped on the CPU
    out = tmp_path / "tp.json"
    result = bench.main(["--sizes", "tiny", "--strategies", "megatrain", "fsdp_offload", "--seq", "16", "--batch", "2",
                         "--steps", "2", "--warmup", "1", "--precision", "32-true", "--device", "cpu", "--out", str(out)])
    rows = {r["strategy"]: r for r in result["rows"]}
    assert rows["megatrain"]["tokens_per_s"] > 0 and "host_optimizer_s" in rows["megatrain"]
    assert "needs a CUDA device" in rows["fsdp_offload"]["skipped"]
    # one run in this process: plain Lightning
    plain = bench.main(["--one", "plain", "--size", "tiny", "--result", str(tmp_path / "plain.json"), "--seq", "16",
                        "--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "32-true", "--device", "cpu"])
    assert plain["tokens_per_s"] > 0 and plain["params"] == rows["megatrain"]["params"]
