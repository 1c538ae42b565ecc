"""The data parallel engine on 2 and 3 CPU processes (gloo) against plain torch on the whole batch:
gradients every rank sees, global-norm and by-value clipping, final parameters, the 1/N share of the
optimizer state, frozen parameters, bf16 streaming."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc: int, *scenarios: str, timeout: float = 240, cuda: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    if cuda:
        env["MEGATRAIN_TEST_CUDA"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "dp_engine_worker.py"), *scenarios]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    return out.stdout


@pytest.mark.parametrize("nproc", [2, 3])
def test_data_parallel_engine_matches_plain_training(nproc: int) -> None:
    out = launch(nproc, "fp32", "value", "frozen", "bf16", "nodes", "aux", "lora", "lean")
    for scenario in ("fp32", "value", "frozen", "bf16", "nodes", "aux", "lora", "lean"):
        assert f"OK {scenario}" in out, out
