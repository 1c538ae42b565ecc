"""Claims of the README checked where a broken feature would still train correctly: the optimizer
overlapped with the next forward under ``Trainer.fit``, the fused CPU optimizer actually selected,
``trainer.test`` equal to plain Lightning. Each test says which breakage it was seen to catch."""

from __future__ import annotations

import threading
import time
from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain import MegaTrainStrategy
from models import BlockLM, data, trainer


class _Log:
    """Events from the training thread and the host worker, in the order they happened."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, step: int) -> None:
        with self._lock:
            self.events.append((kind, step))

    def index(self, kind: str, step: int) -> int:
        return self.events.index((kind, step))


class SlowLastLayer(BlockLM):
    """An optimizer whose update of the last streamed layer sleeps; the first layer's forward is logged."""

    def __init__(self, log: _Log) -> None:
        super().__init__(n=4, dropout=0.0)
        self.log = log
        self.sched = False
        self.updates = 0
        self.blocks[0].register_forward_hook(lambda m, a, o: log.add("forward layer 0", self._step_no()))

    def _step_no(self) -> int:
        return self.trainer.global_step if self._trainer is not None else -1

    def configure_optimizers(self) -> Any:
        last = {id(p) for p in self.blocks[-1].parameters()}
        module = self

        class SlowSGD(torch.optim.SGD):
            def step(self, closure: Any = None) -> Any:  # type: ignore[override]
                params = [p for g in self.param_groups for p in g["params"]]
                slow = any(id(p) in last for p in params)
                if slow:
                    time.sleep(0.15)
                out = super().step(closure)
                if slow:  # the k-th update of the last layer is step k's
                    module.log.add("last layer updated", module.updates)
                    module.updates += 1
                return out

        return SlowSGD(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_optimizer_step_overlaps_the_next_forward_in_trainer_fit(overlap: bool) -> None:
    """Under ``Trainer.fit`` the host update of the last layer of step k is still running when the
    first layer of step k+1 has computed its forward (overlap_optimizer=True), and is done before it
    with overlap_optimizer=False.

    Guards against: ``MegaTrainStrategy.optimizer_step`` always waiting for the host step (seen red),
    and a layer's forward waiting for the whole step rather than for its own layer's update."""
    log = _Log()
    L.seed_everything(0)
    model = SlowLastLayer(log)
    trainer(MegaTrainStrategy(overlap_optimizer=overlap), max_steps=3).fit(model, data())
    for k in range(2):  # the update of step k against the forward of step k+1
        forward_next, updated = log.index("forward layer 0", k + 1), log.index("last layer updated", k)
        if overlap:
            assert forward_next < updated, log.events
        else:
            assert updated < forward_next, log.events
