"""GPU claims (tests marked ``gpu``, skipped without CUDA): device memory stays within the streamed
residency bound and flat across steps; CUDA event ordering holds under a delayed compute stream;
backward and the activation-offload path issue no host-device synchronisation.

The bound is computed from the model's parameter sizes and an independently measured working set
by :func:`residency_bound`, which is also unit-tested on the CPU here (unmarked test)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine import Runtime, RuntimeConfig
from models import Block, Recorder, assert_same_training, data, fit_pair, trainer
from test_gpu import Stack

MiB = 1024**2


# ----------------------------------------------------------------------------- the bound (CPU-testable)
@dataclass
class ResidencyBound:
    """What megatrain may hold on the device at once, in bytes, by component."""

    weight_slots: int  # prefetch + 1 layers' weights in the compute dtype
    grad_buffers: int  # prefetch + 1 layers' packed gradients in the compute dtype
    non_layer: int  # fp32 copy of the non-layer parameters, their .grad, and the packed send buffer
    saved_inputs: int  # every layer's saved input (given: it depends on the hidden states' dtype)
    working_set: int  # one layer's forward + backward (given: measured)

    @property
    def total(self) -> int:
        return self.weight_slots + self.grad_buffers + self.non_layer + self.saved_inputs + self.working_set


def residency_bound(
    model: nn.Module, layers: list[nn.Module], compute_dtype: torch.dtype, prefetch: int, saved_inputs: int, working_set: int,
    grad_channels: int = 2,
) -> ResidencyBound:
    """The device-memory bound of the README's residency claim, from parameter sizes alone."""
    csize = torch.empty((), dtype=compute_dtype).element_size()

    def unique(params: Any) -> list[nn.Parameter]:
        return list({id(p): p for p in params}.values())

    def image(ps: list[nn.Parameter]) -> int:
        # one slot holds a layer's image: matrices in the compute dtype, vectors in fp32, 64-byte aligned
        return sum(-(-p.numel() * (csize if p.dim() >= 2 else 4) // 64) * 64 for p in ps)

    layer_image = max(image(unique(layer.parameters())) for layer in layers)
    layer_trainable = max(sum(p.numel() for p in unique(layer.parameters()) if p.requires_grad) for layer in layers)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outer = [p for p in unique(model.parameters()) if id(p) not in inside]
    outer_numel = sum(p.numel() for p in outer)
    outer_trainable = sum(p.numel() for p in outer if p.requires_grad)
    slots = prefetch + 1
    return ResidencyBound(
        weight_slots=slots * layer_image,
        grad_buffers=grad_channels * layer_trainable * csize,  # the strategy's grad_channels (default 2)
        non_layer=4 * outer_numel + 2 * 4 * outer_trainable,
        saved_inputs=saved_inputs,
        working_set=working_set,
    )


def test_residency_bound_matches_the_engines_device_buffers() -> None:
    """CPU check of the bound's arithmetic, and that its slot and gradient-buffer terms are exactly
    what the engine allocates on the device (the CPU runs the same bookkeeping)."""
    model = GPUStack(n=3, d=8, vocab=16)
    layers = list(model.layers)
    model.layers[1][0].weight.requires_grad_(False)  # layers differ in trainable size: the max counts
    per_layer = 8 * 32 + 32 + 32 * 8 + 8
    outer = 16 * 8 + 8 * 16 + 16
    b = residency_bound(model, layers, torch.bfloat16, prefetch=2, saved_inputs=100, working_set=10)
    image = 8 * 32 * 2 + 32 * 4 + 32 * 8 * 2 + 64  # the 8-float bias takes a 64-byte line
    assert b.weight_slots == 3 * image and b.grad_buffers == 2 * per_layer * 2
    assert b.non_layer == 4 * outer + 8 * outer
    assert b.total == b.weight_slots + b.grad_buffers + b.non_layer + 110
    rt = Runtime(model, torch.device("cpu"), torch.bfloat16, RuntimeConfig(prefetch=2, host_memory="fast"))
    try:
        slot_bytes = sum(s.buf.numel() * s.buf.element_size() for s in rt.slots.slots)
        assert slot_bytes == b.weight_slots
        channels = list(rt.channels._free.queue)
        assert sum(c.dev.numel() * c.dev.element_size() for c in channels) == b.grad_buffers
    finally:
        rt.detach()


# ----------------------------------------------------------------------------- models
class GPUStack(Recorder):
    """Embedding, ``n`` wide residual MLP layers, head: the layers hold nearly all the parameters."""

    def __init__(self, n: int = 24, d: int = 1024, vocab: int = 128) -> None:
        super().__init__()
        self.sched = False
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)  # fp32 hidden states: each layer's saved input is fp32
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)

    def loss(self, batch: Any) -> torch.Tensor:
        idx = batch[0]
        return nn.functional.cross_entropy(self.logits(idx)[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())


def _layer_working_set(layer: nn.Module, tokens: int, d: int, dtype: torch.dtype) -> int:
    """Peak device bytes of one layer's forward + backward run plainly (weights in ``dtype``, fp32
    input, autocast), above the weights and the input: measured, not modelled."""
    dev = torch.device("cuda")
    layer = copy.deepcopy(layer).to(dev, dtype)
    x = torch.randn(1, tokens, d, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype):
        out = layer(x)
    out.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del layer, x, out
    torch.cuda.empty_cache()
    return peak


class _DeviceMemory(L.Callback):
    def __init__(self) -> None:
        self.peaks: list[int] = []
        self.ends: list[int] = []

    def on_train_batch_start(self, *args: Any) -> None:
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, *args: Any) -> None:
        self.peaks.append(torch.cuda.max_memory_allocated())
        self.ends.append(torch.cuda.memory_allocated())


@pytest.mark.gpu
def test_device_memory_within_the_residency_bound_and_flat() -> None:
    """Peak device memory per step stays within (prefetch + 1) layers' weights + gradient buffers +
    non-layer parameters + saved inputs + one measured layer working set (+10% and 16 MiB for the
    allocator and the head's activations), far below the model, and the same every step.
    Guards against layers left resident, saved inputs or slots not freed, and growth step to step."""
    torch.manual_seed(0)
    n, d, vocab, prefetch = 32, 1024, 128, 2  # 269M parameters: 537 MB in bf16
    batch, seq = 4, 128  # models.data(): sequences of `seq` tokens
    model = GPUStack(n=n, d=d, vocab=vocab)
    _layer_working_set(model.layers[0], batch * seq, d, torch.bfloat16)  # creates cuBLAS workspaces first
    working = _layer_working_set(model.layers[0], batch * seq, d, torch.bfloat16)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # cuBLAS workspace and anything earlier tests left
    saved = n * batch * seq * d * 4  # fp32 hidden states
    bound = residency_bound(model, list(model.layers), torch.bfloat16, prefetch, saved, working)
    model_bf16 = 2 * sum(p.numel() for p in model.parameters())
    assert bound.total < 0.6 * model_bf16, "test setup: the bound must be well below the model itself"
    probe = _DeviceMemory()
    L.seed_everything(0)
    loader = data(n=6 * batch, t=seq, batch_size=batch)
    trainer(MegaTrainStrategy(prefetch=prefetch), accelerator="cuda", precision="bf16-mixed", max_steps=6,
            callbacks=[probe]).fit(model, loader)
    peaks = [p - baseline for p in probe.peaks]
    limit = 1.1 * bound.total + 16 * MiB
    assert max(peaks) <= limit, f"peak {max(peaks) / MiB:.1f} MiB > bound {limit / MiB:.1f} MiB ({bound})"
    assert max(peaks) < 0.6 * model_bf16
    steady = peaks[1:]  # the first step allocates the outer gradients and caches for the first time
    assert max(steady) - min(steady) <= 0.02 * max(steady) + 2 * MiB, [p / MiB for p in peaks]
    ends = probe.ends[1:]
    assert max(ends) - min(ends) <= 1 * MiB, [e / MiB for e in probe.ends]


# ----------------------------------------------------------------------------- event ordering under stress
class SleepyBlock(Block):
    """Delays the compute stream before each run of the layer (forward and recompute), so copies
    on the H2D/D2H streams run far ahead unless events hold them back."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.is_cuda:
            torch.cuda._sleep(int(5e6))  # a few ms of GPU time
        return super().forward(x, *args, **kwargs)


class SleepyLM(Recorder):
    def __init__(self, d: int = 64, n: int = 6) -> None:
        super().__init__()
        from models import VOCAB

        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([SleepyBlock(d, 0.0) for _ in range(n)])  # no dropout: ordering alone
        self.head = nn.Linear(d, VOCAB)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, batch: Any) -> torch.Tensor:
        idx = batch[0]
        return nn.functional.cross_entropy(self.logits(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


@pytest.fixture
def _strict_fp32() -> Any:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True], ids=["saved-on-gpu", "offload"])
def test_event_ordering_holds_with_a_delayed_compute_stream(_strict_fp32: Any, offload: bool) -> None:
    """With the compute stream held back inside every layer, a weight copy into a slot still in use,
    a gradient copy before its packing, or an offloaded input read back before its copy-out would
    change the numbers: training stays exact against plain GPU training. Guards against a missing
    ``wait_event`` (slot ``free``/``ready``, gradient ``packed``, offload ``done``/``ready``)."""
    strategy = MegaTrainStrategy(prefetch=1, offload_activations=offload)
    plain, mega = fit_pair(SleepyLM, strategy=strategy, accelerator="cuda", accumulate_grad_batches=2, max_steps=3)
    assert_same_training(plain, mega, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- no host-device sync
def run_behind_busy_gpu(fn: Any) -> tuple[float, bool]:
    """Run ``fn`` while the GPU is busy (~1 s of queued work) under ``set_sync_debug_mode("error")`` (any
    synchronising op raises): the host seconds it took, and whether the GPU was still busy at its end."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time on current GPUs
    torch.cuda.set_sync_debug_mode("error")
    try:
        start = time.perf_counter()
        fn()
        host = time.perf_counter() - start
        busy = not torch.cuda.current_stream().query()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return host, busy


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True], ids=["saved-on-gpu", "offload"])
def test_forward_backward_and_offload_issue_no_host_device_sync(offload: bool) -> None:
    """After a warm-up step, a forward and backward (with saved inputs offloaded to host memory and
    fetched back, or not) run under ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising
    op raises) while the GPU is kept busy, return to the host long before the GPU is done, and
    give the gradients. Guards against ``.item()``/``.cpu()``/blocking copies/``synchronize()``
    (sync debug mode) and ``Event.synchronize()`` on the training thread (the busy GPU) in
    backward and in the offload path. There are no more layers than gradient buffers, so backward
    never waits for the host worker to hand one back (that wait is by design)."""
    dev = torch.device("cuda")
    prefetch = 2
    model = Stack(n=prefetch + 1)
    # as many gradient channels as layers: backward never waits for the host to return one
    config = RuntimeConfig(prefetch=prefetch, offload_activations=offload, grad_channels=prefetch + 1)
    rt = Runtime(model, dev, torch.bfloat16, config)
    try:
        x = torch.randn(8, 256, device=dev, requires_grad=True)

        def forward_backward() -> None:
            with rt.bound(), torch.autocast("cuda", torch.bfloat16):
                out = model(x)
            out.float().sum().backward()

        forward_backward()  # warm-up: host buffers, cuBLAS handles, allocator blocks
        rt.after_backward()
        for p in model.parameters():
            p.grad = None
        x.grad = None
        host, still_busy = run_behind_busy_gpu(forward_backward)
        assert still_busy, "the GPU finished before the host returned: forward/backward waited for it"
        assert host < 0.25, f"forward + backward took {host:.3f}s of host time while the GPU was busy"
        rt.after_backward()
        assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    finally:
        rt.detach()
