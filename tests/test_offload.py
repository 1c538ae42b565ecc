"""Activation offload: saved layer inputs kept in host memory between forward and backward, exact."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine import Runtime, RuntimeConfig
from models import HFLM, BlockLM, assert_same_training, data, fit_pair, trainer


@pytest.mark.parametrize("make", [BlockLM, lambda: HFLM("llama", tied=True)], ids=["blocks-dropout", "llama"])
def test_offload_is_exact_against_plain_lightning(make: Any) -> None:
    plain, mega = fit_pair(make, strategy=MegaTrainStrategy(offload_activations=True), accumulate_grad_batches=2, max_steps=3)
    assert_same_training(plain, mega)


def test_offload_matches_offload_off_and_keeps_no_hidden_state_for_backward() -> None:
    from test_engine import Stack, _loss

    torch.manual_seed(0)
    ref = Stack(n=4)
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 32, (3, 7))
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    results = []
    for m, offload in ((ref, False), (model, True)):
        rt = Runtime(m, torch.device("cpu"), torch.float32, RuntimeConfig(offload_activations=offload))
        try:
            for step in range(2):
                torch.manual_seed(step)
                saved.clear()
                with rt.bound(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = _loss(m, idx)
                loss.backward()
                rt.after_backward()
                stats = rt.stats()
            results.append((loss.item(), [p.grad.clone() for p in m.parameters()], list(saved), stats))
        finally:
            rt.detach()
    (l0, g0, saved_off, s_off), (l1, g1, saved_on, s_on) = results
    assert l0 == l1
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    hidden = torch.Size([3, 7, 8])
    assert saved_off.count(hidden) >= 4  # each layer's input saved on the device
    assert saved_on.count(hidden) < saved_off.count(hidden) - 3  # ... and not with offload on
    assert s_off.offload_bytes == 0 and s_on.offload_bytes == 4 * 3 * 7 * 8 * 4  # 4 layers x hidden states x fp32


def test_offload_with_telemetry_between_steps() -> None:
    # reading the counters between steps must not touch the offload buffers
    from lightning_megatrain import MegaTrainMonitor

    L.seed_everything(0)
    plain = BlockLM(dropout=0.0)
    trainer("auto", max_steps=4).fit(plain, data())
    L.seed_everything(0)
    mega = BlockLM(dropout=0.0)
    monitor = MegaTrainMonitor()
    t = trainer(MegaTrainStrategy(offload_activations=True), max_steps=4, callbacks=[monitor])
    t.fit(mega, data())
    assert mega.losses == pytest.approx(plain.losses, rel=1e-6)
    assert monitor.last["perf/d2h_GBps"] > 0
