"""The host side of the pipeline: gradient accumulation without full-size temporaries, the number of
gradient channels, and the host worker's intra-op thread cap."""

from __future__ import annotations

import threading

import pytest
import torch

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine import Runtime, RuntimeConfig
from lightning_megatrain.engine.host import _CHUNK, add_widened
from lightning_megatrain.engine.stepper import Worker, per_thread_intra_op
from models import BlockLM, assert_same_training, fit_pair
from test_engine import Stack

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [7, _CHUNK, 3 * _CHUNK + 5])
def test_add_widened_is_exactly_add(n: int) -> None:
    torch.manual_seed(0)
    dst = torch.randn(n)
    src = torch.randn(n).bfloat16()
    expected = dst.clone().add_(src)
    add_widened(dst, src)
    assert torch.equal(dst, expected)


def test_add_widened_allocates_no_full_size_temporary() -> None:
    n = 4 * _CHUNK + 3
    dst, src = torch.zeros(n), torch.ones(n, dtype=torch.bfloat16)
    add_widened(dst, src)  # the per-thread scratch is made once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        add_widened(dst, src)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < n * 4 // 2  # dst.add_(src) would widen all of src at once
    assert torch.equal(dst, torch.full((n,), 2.0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        dst.add_(src)
    assert max(e.cpu_memory_usage for e in prof.events()) >= n * 4  # what the scratch avoids


@pytest.mark.parametrize("channels", [1, 3])
def test_grad_channels_option_is_exact(channels: int) -> None:
    plain, mega = fit_pair(BlockLM, strategy=MegaTrainStrategy(grad_channels=channels), max_steps=2, accumulate_grad_batches=2)
    assert_same_training(plain, mega)


def test_grad_channels_sets_the_pool_size() -> None:
    rt = Runtime(Stack(n=3), CPU, torch.float32, RuntimeConfig(grad_channels=4))
    try:
        assert rt.channels._free.qsize() == 4 and len(rt.link.arena.buffers) == 4
    finally:
        rt.detach()
    with pytest.raises(ValueError, match="grad_channels must be"):
        MegaTrainStrategy(grad_channels=0)
    with pytest.raises(ValueError, match="host_threads must be"):
        MegaTrainStrategy(host_threads=0)


@pytest.mark.skipif(not per_thread_intra_op(), reason="the intra-op cap needs torch's OpenMP backend")
def test_host_threads_caps_only_the_worker() -> None:
    default = torch.get_num_threads()
    worker = Worker(threads=1)
    try:
        seen: list[int] = []
        worker.submit(lambda: seen.append(torch.get_num_threads()))
        worker.wait()
        assert seen == [1] and worker.threads == 1
        assert torch.get_num_threads() == default  # the training thread keeps its cores
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [default]  # and so do threads started afterwards
    finally:
        worker.close()


def test_runtime_worker_defaults_to_all_cores_but_one() -> None:
    from lightning_megatrain.engine.stepper import default_host_threads

    rt = Runtime(Stack(n=2), CPU, torch.float32, RuntimeConfig())
    try:
        if per_thread_intra_op():
            assert rt.worker.threads == default_host_threads()
    finally:
        rt.detach()
