"""Telemetry values against independent measurements: bytes moved from the model's sizes, tokens/s
from wall-clock times taken outside the callback. (test_telemetry.py checks the keys and the logger.)"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain import MegaTrainMonitor, MegaTrainStrategy
from models import HFLM, BlockLM, data, trainer

TOKENS = 4 * 12  # a batch of models.data(): 4 sequences of 12 tokens


class Keep(L.Callback):
    """Copies what the monitor computed at each step (it runs after the monitor)."""

    def __init__(self, monitor: MegaTrainMonitor) -> None:
        self.monitor = monitor
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps.append(dict(self.monitor.last))


def _numel(params: Any, trainable: bool = False) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values() if p.requires_grad or not trainable)


@pytest.mark.parametrize(
    "make, layers_of, precision, prefetch, host_memory",
    [
        (lambda: BlockLM(n=5, dropout=0.0), lambda m: m.blocks, "32-true", 1, "auto"),
        (lambda: HFLM("llama", layers=4, dropout=0.0), lambda m: m.model.model.layers, "bf16-mixed", 2, "fast"),
        (lambda: HFLM("llama", layers=4, dropout=0.0), lambda m: m.model.model.layers, "bf16-mixed", 2, "compact"),
    ],
    ids=["blocks-fp32", "llama-bf16-fast", "llama-bf16-compact"],
)
def test_bytes_moved_per_step_equal_the_models_streamed_bytes(
    make: Any, layers_of: Any, precision: str, prefetch: int, host_memory: str
) -> None:
    """Each step's H2D bytes (GB/s x step time, as logged) are the model's streamed bytes: every layer
    in the compute dtype once in forward and again in backward except the ``prefetch + 1`` still
    resident (fp32 masters with host_memory="compact"), plus the non-layer parameters in fp32 once; D2H bytes are one gradient per trainable
    parameter (layers in the compute dtype, the rest fp32). Guards against transfer counters that
    miss or double-count copies, and against backward streaming a resident layer again (seen red)."""
    L.seed_everything(0)
    model = make()
    monitor = MegaTrainMonitor()
    keep = Keep(monitor)
    trainer(MegaTrainStrategy(prefetch=prefetch, host_memory=host_memory), max_steps=4, precision=precision, callbacks=[monitor, keep]).fit(model, data())
    layers = list(layers_of(model))
    n = len(layers)
    per_layer = _numel(layers[0].parameters())
    assert all(_numel(layer.parameters()) == per_layer for layer in layers)
    # one copy moves a layer's image: matrices in the streamed dtype, vectors in fp32, each 64-byte aligned
    sdtype = 2 if precision == "bf16-mixed" and host_memory == "fast" else 4
    image = sum(-(-p.numel() * (sdtype if p.dim() >= 2 else 4) // 64) * 64 for p in layers[0].parameters())
    layer_total = _numel(p for layer in layers for p in layer.parameters())
    outer = _numel(model.parameters()) - layer_total
    csize = 2 if precision == "bf16-mixed" and host_memory == "fast" else 4
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    outer_image = sum(-(-p.numel() * 4 // 64) * 64 for p in {id(p): p for p in model.parameters()}.values() if id(p) not in layer_ids)
    h2d = image * (n + n - min(prefetch + 1, n)) + outer_image  # the non-layer parameters in fp32
    d2h = csize * layer_total + 4 * outer  # everything is trainable here
    assert len(keep.steps) == 4
    for m in keep.steps:
        assert m["perf/h2d_GBps"] * 1e9 * m["perf/step_s"] == pytest.approx(h2d, rel=1e-9)
        assert m["perf/d2h_GBps"] * 1e9 * m["perf/step_s"] == pytest.approx(d2h, rel=1e-9)


class Paced(BlockLM):
    """Each training step takes at least ``step_s``; its start times are recorded here, not by the monitor."""

    def __init__(self, step_s: float) -> None:
        super().__init__(n=3, dropout=0.0)
        self.step_s = step_s
        self.starts: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.starts.append(time.perf_counter())
        time.sleep(self.step_s)
        return super().training_step(batch, batch_idx)


def test_tokens_per_second_against_wall_time_outside_the_callback() -> None:
    """tokens/s x step time is exactly the batch's tokens; tokens/s is within a factor 2 of the
    tokens over the interval between two training-step starts (a clock outside the callback), and
    never above what the step's known minimum duration allows. Guards against miscounted tokens
    and against a step timer that is not restarted each step (both seen red)."""
    step_s = 0.1  # the floor of each step, well above the loop overhead on a loaded machine
    L.seed_everything(0)
    model = Paced(step_s)
    monitor = MegaTrainMonitor()
    keep = Keep(monitor)
    trainer("megatrain", max_steps=6, callbacks=[monitor, keep]).fit(model, data())
    assert len(keep.steps) == 6 == len(model.starts)
    for k, m in enumerate(keep.steps):
        assert m["perf/tokens_per_s"] * m["perf/step_s"] == pytest.approx(TOKENS, rel=1e-9)
        assert m["perf/tokens_per_s"] <= TOKENS / step_s
        if 0 < k < len(keep.steps) - 1:
            wall = model.starts[k + 1] - model.starts[k]
            ratio = m["perf/tokens_per_s"] / (TOKENS / wall)
            assert 0.5 < ratio < 2.0, (k, ratio)
