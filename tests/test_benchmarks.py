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
    assert [r["offload_activations"] for r in result["runs"]] == [True, False]  # the more valuable run first
    assert all(r["longest"]["length"] == 64 for r in result["runs"]) and "cpu_cores" in result["machine"]
    assert [t["length"] for t in result["trials"]] == [32, 64, 32, 64]  # every trial written as it ends


def test_long_context_search_starts_near_the_answer_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    lc = _load("long_context")
    out = tmp_path / "lc.json"
    args = ["--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
            "--precision", "fp32", "--chunk-mlp", "2", "--out", str(out)]
    # a length whose offloaded inputs exceed host memory is refused by the estimate, not tried
    huge = 1 << 40
    assert not lc.estimate(lc.argparse.Namespace(layers=2, hidden=32, chunk_mlp=2, vocab=256), huge, True, lc.torch.device("cpu"))["fits"]
    result = lc.main(args + ["--min-len", "16", "--start-len", "48", "--max-len", str(huge), "--growth", "1.5", "--offload", "on",
                             "--trial-cap", "1e-9"])
    trials = result["trials"]
    assert trials[0]["length"] == 48 and trials[0]["result"] == "ok"  # starts where told, not at --min-len
    assert trials[1]["result"].startswith("not run") and result["runs"][0]["stopped"]  # the time cap stops the search
    assert json.loads(out.read_text())["trials"] == trials


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


def test_profile_summary_of_a_synthetic_trace() -> None:
    prof = _load("profile_step")
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 30, "dur": 30},  # overlaps the first: busy 0..60
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 50, "dur": 20},  # 10 of 20 under compute
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 80, "dur": 20},  # none under compute
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 500},  # not a complete event
    ]
    s = prof.summarize({"traceEvents": events})
    assert s["wall_s"] == pytest.approx(100e-6)
    assert s["gpu_busy_fraction"] == pytest.approx(0.6)
    assert s["h2d_busy_fraction"] == pytest.approx(0.2) and s["d2h_busy_fraction"] == pytest.approx(0.2)
    assert s["h2d_overlapped_with_compute_fraction"] == pytest.approx(0.5)
    assert s["d2h_overlapped_with_compute_fraction"] == 0.0 and s["h2d_d2h_concurrent_s"] == 0.0


@pytest.mark.parametrize("clip", [[], ["--clip", "1.0"]], ids=["early", "clip"])
def test_profile_smoke(tmp_path: Path, clip: list[str]) -> None:
    pytest.importorskip("transformers")
    result = _load("profile_step").main(["--hidden", "32", "--layers", "2", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
                                    "--vocab", "256", "--seq", "16", "--batch", "2", "--warmup", "1", "--steps", "2",
                                    "--precision", "fp32", "--device", "cpu", "--out-dir", str(tmp_path), *clip])
    assert (tmp_path / "profile_trace.json.gz").stat().st_size > 0 and not (tmp_path / "profile_trace.json").exists()
    s = json.loads((tmp_path / "profile.json").read_text())["summary"]
    assert s == result["summary"] and s["wall_s"] > 0 and s["step_s"] > 0
    assert s["gpu_busy_fraction"] == 0.0  # no kernels on the CPU
    assert {"compute_waited_on_copies_s_per_step", "forward_waited_on_host_optimizer_s_per_step"} <= set(s)
    assert 0 <= s["forward_waited_on_host_optimizer_fraction"] <= 1
    # without clipping each of the 2 layers steps during backward (the non-layer units after it); with it, none
    assert s["host_updates_during_backward_per_step"] == (0 if clip else 2), s


def test_host_pipeline_smoke(tmp_path: Path) -> None:
    out = tmp_path / "hp.json"
    result = _load("host_pipeline").main(["--params", "20000", "--layers", "2", "--repeat", "1", "--out", str(out)])
    rows = [r["row"] for r in json.loads(out.read_text())["rows"]]
    assert rows[0].startswith("copy") and any(r.startswith("optimizer: bare torch fused AdamW") for r in rows)
    assert [r for r in rows if r.startswith("host update per step")][-1].startswith("host update per step, lean")
    assert any(r.startswith("accumulate, later micro-batches") for r in rows)
    assert all(r["params_per_s"] > 0 and r["GBps"] > 0 for r in result["rows"])
    assert set(result["targets"]) == {
        "optimizer_vs_bare_params_per_s", "accumulate_vs_copy_GBps", "scratch_speedup",
        "update_per_step_vs_bare_fast", "update_per_step_vs_bare_compact", "update_per_step_vs_bare_lean",
    }
    assert all(result["targets"][f"update_per_step_vs_bare_{m}"] > 0 for m in ("fast", "compact", "lean"))


def test_throughput_lora_smoke(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    bench = _load("throughput")
    common = ["--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "bf16-mixed", "--device", "cpu",
              "--lora-rank", "4"]
    out = tmp_path / "lora.json"
    result = bench.main(["--sizes", "tiny", "--strategies", "lora_megatrain", *common, "--out", str(out)])
    (mega,) = result["rows"]
    assert json.loads(out.read_text())["rows"] == [mega]
    # plain PEFT (strategy="auto", gradient checkpointing) in this process
    plain = bench.main(["--one", "lora_peft", "--size", "tiny", "--result", str(tmp_path / "peft.json"), *common])
    size = bench.SIZES["tiny"]
    h, i, kv = size["hidden"], size["intermediate"], size["hidden"] // size["heads"] * size["kv_heads"]
    adapters = size["layers"] * 4 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))  # r=4 on q,k,v,o,gate,up,down
    for row in (mega, plain):
        assert row["tokens_per_s"] > 0 and row["trainable"] == adapters and row["params"] == mega["params"], row
        # model FLOPs: 4 per frozen parameter (forward, input gradients), 6 per adapter parameter, per token
        flops = row["model_tflops"] * 1e12 * row["step_s"] / row["tokens_per_step"]
        assert flops == pytest.approx(4 * (row["params"] - adapters) + 6 * adapters)
    assert "host_optimizer_s" in mega and mega["pageable_host_bytes"] == 0


def test_setup_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "setup.json"
    args = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "128",
            "--repeat", "1", "--dir", str(tmp_path / "hf"), "--out", str(out)]
    result = _load("setup").main(args + ["--host-memory", "compact"])
    saved = json.loads(out.read_text())
    assert saved["ratio_vs_fresh"] == result["ratio_vs_fresh"] > 0 and "cpu_cores" in saved["machine"]
    assert saved["warm_page_cache"] and saved["file_bytes"] > 0 and len(saved["runs"]) == 1
    assert saved["runs"][0]["pageable_bytes"] == 0 and saved["runs"][0]["page_locked_bytes"] == 0  # no GPU here
    assert saved["setup_bytes"] == 4 * saved["params"]  # compact: the fp32 masters, nothing else
    p = saved["plan_70b"]
    assert p["setup_bytes"] > 70e9 * 4 and p["setup_s_estimate"] > 0 and p["page_locked_bytes"] > 0
    # the directory is reused: the second run does not write the files again
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "hf").glob("*.safetensors")}
    again = _load("setup").main(args + ["--first-touch-gib", "0.001"])
    assert set(again["first_touch"]["median_s"]) == {"plain", "touch_then_copy", "copy_per_thread"}
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "hf").glob("*.safetensors")} == before
