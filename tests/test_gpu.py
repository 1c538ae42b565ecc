"""GPU checks (marker ``gpu``, skipped without CUDA): exactness against plain GPU training,
bf16-mixed close to plain bf16-mixed, host residency, and no host-device sync in the layer loop."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_megatrain.engine import Runtime, RuntimeConfig
from models import HFLM, BlockLM, assert_same_training, fit_pair

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _strict_fp32() -> Any:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("make", [BlockLM, lambda: HFLM("llama", tied=True)], ids=["blocks", "llama-tied"])
def test_fp32_exact_against_plain_gpu_training(make: Any) -> None:
    plain, mega = fit_pair(make, accelerator="cuda", accumulate_grad_batches=2, gradient_clip_val=0.05)
    assert_same_training(plain, mega, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: BlockLM(dropout=0.0), lambda: HFLM("llama")], ids=["blocks", "llama"])
def test_bf16_mixed_close_to_plain_bf16_mixed(make: Any) -> None:
    plain, mega = fit_pair(make, accelerator="cuda", precision="bf16-mixed", max_steps=4)
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=2e-2, atol=2e-2)
    for p, q in zip(plain.parameters(), mega.parameters()):
        torch.testing.assert_close(q.cpu(), p.cpu(), rtol=0, atol=5e-2)


def test_parameters_and_optimizer_state_stay_on_the_host_pinned() -> None:
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            trainer.strategy.runtime.wait()
            seen["param_devices"] = {p.device.type for p in pl_module.parameters()}
            seen["pinned"] = all(u.arena.pinned for u in trainer.strategy.runtime.units)
            opt = trainer.optimizers[0]
            seen["state_devices"] = {t.device.type for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}

    from models import data, trainer

    L.seed_everything(0)
    trainer("megatrain", accelerator="cuda", max_steps=2, callbacks=[Probe()]).fit(BlockLM(), data())
    assert seen == {"param_devices": {"cpu"}, "pinned": True, "state_devices": {"cpu"}}


class Stack(nn.Module):
    def __init__(self, n: int, d: int = 256) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_layer_loop_does_not_synchronize_with_the_host() -> None:
    """Keep the GPU busy, then run the forward layer loop: if any step of it waited for the GPU,
    the host time would include the busy period."""
    dev = torch.device("cuda")
    model = Stack(n=12)
    rt = Runtime(model, dev, torch.bfloat16, RuntimeConfig(prefetch=2))
    try:
        x = torch.randn(8, 256, device=dev, requires_grad=True)

        def run(grad: bool) -> torch.Tensor:
            with rt.bound(), torch.set_grad_enabled(grad), torch.autocast("cuda", torch.bfloat16):
                return model(x)

        # Warm up outside the timed region: the first launch of each kernel loads its module lazily
        # (CUDA_MODULE_LOADING=LAZY), and loading a module synchronises with the device.
        for grad in (False, True):
            out = run(grad)
            if grad:
                out.float().sum().backward()
                rt.after_backward()
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        for p in model.parameters():
            p.grad = None
        for grad in (False, True):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e9))  # ~1 s of GPU time on current GPUs
            start = time.perf_counter()
            out = run(grad)
            host = time.perf_counter() - start
            still_busy = not torch.cuda.current_stream().query()
            torch.cuda.synchronize()
            assert still_busy, "the GPU finished before the host returned: the loop waited for it"
            assert host < 0.25, f"issuing 12 layers took {host:.3f}s of host time while the GPU was busy"
            if grad:
                out.float().sum().backward()
                rt.after_backward()
                assert all(p.grad is not None for p in model.parameters())
    finally:
        rt.detach()


def test_module_device_and_metric_states_on_the_gpu() -> None:
    """``self.device`` in training_step is the GPU, a torchmetrics metric updated there with device
    tensors keeps its state on the GPU, and the parameters stay on the host."""
    from torchmetrics import MeanMetric

    from models import data, trainer

    class WithMetric(BlockLM):
        def __init__(self) -> None:
            super().__init__(dropout=0.0)
            self.mean_loss = MeanMetric()
            self.seen: list[Any] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = self.loss(batch)
            offsets = torch.arange(batch[0].shape[1], device=self.device)  # user code on self.device
            self.mean_loss.update(loss.detach())
            self.seen.append((self.device.type, offsets.device.type, loss.device.type, self.mean_loss.mean_value.device.type))
            self.losses.append(loss.item())
            return loss

    L.seed_everything(0)
    model = WithMetric()
    trainer("megatrain", accelerator="cuda", max_steps=2).fit(model, data())
    assert model.seen == [("cuda", "cuda", "cuda", "cuda")] * 2
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # after teardown too
    assert model.mean_loss.compute().item() == pytest.approx(sum(model.losses) / 2, rel=1e-5)


def test_a_failed_page_lock_leaves_no_cuda_error_for_the_next_kernel() -> None:
    """Registering a range twice fails (cudaErrorHostMemoryAlreadyRegistered); the error is cleared, so the
    next kernel launch, which checks cudaGetLastError, does not report it."""
    import warnings

    from lightning_megatrain.engine.host import PINS, HostArena

    torch.ones(1, device="cuda").add_(1)  # a context
    first = HostArena([(1 << 20, torch.uint8)], pin=True)
    assert first.pinned
    PINS.begin()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not PINS.register(first.buffers[0].data_ptr(), 1 << 20)
        PINS.end_setup()
    assert len([w for w in caught if "cudaHostRegister" in str(w.message)]) == 1 and PINS.pageable == 1 << 20
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    assert (x * 2).sum().item() == 2 * 1023 * 1024 / 2  # a kernel launch after the failure works
    first.release()
