"""The LightningModule reports the root device and every non-parameter tensor state lives there,
while the parameters stay at home on the host (the runtime streams them)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

import lightning_megatrain.strategy as strategy_mod
from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.placement import place_states
from models import BlockLM, data, trainer

META = torch.device("meta")


class WithMetric(BlockLM):
    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.register_buffer("scale", torch.ones(()))
        self.train_loss = MeanMetric()
        self.metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=64, average="micro")})
        self.devices_seen: list[torch.device] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.devices_seen.append(self.device)
        x = batch[0]
        logits = self.logits(x)[:, :-1]
        y = x[:, 1:]
        positions = torch.arange(y.shape[1], device=self.device)  # user code relying on self.device
        assert positions.device == logits.device
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.train_loss.update(loss.detach())
        self.metrics.update(logits.argmax(-1).flatten(), y.flatten())
        self.losses.append(loss.item())
        return loss


def test_place_states_moves_everything_but_parameters() -> None:
    # the meta device stands in for a GPU: whatever moved is visibly elsewhere, nothing is computed
    model = WithMetric()
    model.train_loss.update(torch.tensor(2.0))
    head_grad = torch.zeros_like(model.head.weight)
    model.head.weight.grad = head_grad
    place_states(model, META)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.head.weight.grad is head_grad
    assert model.scale.device == META
    assert model.device == META  # LightningModule.device
    assert model.train_loss.device == META and model.train_loss.mean_value.device == META
    acc = model.metrics["acc"]
    assert acc.device == META and all(getattr(acc, k).device == META for k in acc._defaults)
    # reset() keeps the states where they are now
    model.train_loss.reset()
    assert model.train_loss.mean_value.device == META


def test_place_states_on_a_metric_with_parameters_leaves_them_on_the_host() -> None:
    class Learned(MeanMetric):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

    metric = Learned()
    place_states(metric, META)
    assert metric.proj.weight.device.type == "cpu"
    assert metric.mean_value.device == META and metric.device == META


def test_strategy_places_states_on_its_root_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []

    def spy(module: nn.Module, device: torch.device) -> None:
        calls.append(device)
        place_states(module, device)

    monkeypatch.setattr(strategy_mod, "place_states", spy)
    L.seed_everything(0)
    model = WithMetric()
    t = trainer(MegaTrainStrategy(), max_steps=3)
    t.fit(model, data())
    assert calls == [t.strategy.root_device]
    assert model.devices_seen == [t.strategy.root_device] * 3
    assert model.train_loss.compute().item() == pytest.approx(sum(model.losses) / 3)
    assert 0 <= model.metrics.compute()["acc"].item() <= 1
