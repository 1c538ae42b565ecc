"""Data parallel on GPUs (marked ``gpu``, skipped without CUDA): the engine over NCCL against plain
torch (one rank on one GPU exercises the shard copy, the all-gather and the reduce-scatter on their
streams; several GPUs when the machine has them), and no host-device synchronisation in the layer loop."""

from __future__ import annotations

import pytest
import torch

from test_dp_engine import launch


@pytest.mark.gpu
def test_data_parallel_engine_on_one_gpu_over_nccl() -> None:
    out = launch(1, "fp32", "bf16", "nosync", cuda=True)
    for scenario in ("fp32", "bf16", "nosync"):
        assert f"OK {scenario}" in out, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_data_parallel_engine_on_several_gpus() -> None:
    out = launch(min(torch.cuda.device_count(), 4), "fp32", "value", "frozen", "bf16", "nosync", cuda=True)
    for scenario in ("fp32", "value", "frozen", "bf16", "nosync"):
        assert f"OK {scenario}" in out, out
