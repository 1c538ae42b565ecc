"""The memory plan is a promise: a real fit's peak RSS stays within 5% of it in every host_memory mode.

Each fit runs in a fresh process (tests/plan_truth_worker.py), so the high-water mark is the fit's own:
construction, setup, the first optimizer step (where the optimizer state is made), a checkpoint save.
What a Lightning fit costs whatever the model (threads, libraries loaded on first use, the trainer:
~50 MiB) is measured by the same fit of a 90k-parameter model and taken off. On the CPU the plan's
device part (layer slots, gradient buffers, the non-layer parameters' copies, one layer's working set)
is host memory too, so what is held against the host total is peak - fixed cost - device.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("plan_truth_worker.py")
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
    reason="peak RSS is read from /proc/self/status; the heap figures are glibc malloc's",
)


def _fit(mode: str, size: str, tmp: Path, weights: str = "") -> dict[str, Any]:
    # the same process on every machine: CPU, two intra-op threads, glibc's malloc as configured by default
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(WORKER), mode, str(tmp), size, weights], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["saved"], "the fit saved no checkpoint, so the save was not measured"
    return r


@pytest.fixture(scope="module")
def fixed_cost(tmp_path_factory: pytest.TempPathFactory) -> int:
    r = _fit("compact", "tiny", tmp_path_factory.mktemp("tiny"))
    assert r["params"] < 1e6
    return r["grew"] - r["plan_device"] - r["plan_host"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The model saved in bf16 with ``save_pretrained``, for the fits that load it with ``weights=``."""
    import torch
    import transformers

    from plan_truth_worker import config

    out = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config("smol")).to(torch.bfloat16).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("mode, load", [("fast", False), ("compact", False), ("lean", False), ("fast", True), ("lean", True)],
                         ids=["fast", "compact", "lean", "fast-meta-weights", "lean-meta-weights"])
def test_peak_rss_of_a_fit_is_within_the_plan(mode: str, load: bool, tmp_path: Path, fixed_cost: int, request: pytest.FixtureRequest) -> None:
    """``load``: built on the meta device and filled from a bf16 ``save_pretrained`` directory at setup."""
    r = _fit(mode, "smol", tmp_path / "ckpt", request.getfixturevalue("pretrained") if load else "")
    assert r["params"] > 100e6
    assert 0 < fixed_cost < 0.15 * r["plan_host"], f"a tiny fit grew by {fixed_cost / 2**20:.0f} MiB"
    ratio = (r["grew"] - fixed_cost - r["plan_device"]) / r["plan_host"]
    # neither exceeded nor padded: a plan far above what a fit uses misleads as well
    assert 0.95 <= ratio <= 1.05, f"{mode}: peak RSS - fixed cost - plan device = {ratio:.3f} x the plan's host total ({r})"
