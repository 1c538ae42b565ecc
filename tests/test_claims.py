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
from models import HFLM, BlockLM, data, trainer


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
                    time.sleep(0.25)
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


# ----------------------------------------------------------------------------- fused CPU optimizer
class WithOptimizer(BlockLM):
    def __init__(self, **opt_kwargs: Any) -> None:
        super().__init__(n=3, dropout=0.0)
        self.opt_kwargs = opt_kwargs

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, **self.opt_kwargs)


@pytest.mark.parametrize(
    "opt_kwargs, strategy_kwargs, fused",
    [({}, {}, True), ({"foreach": True}, {}, False), ({"foreach": False}, {}, False),
     ({}, {"fused_optimizer": False}, False)],
    ids=["default", "user-foreach", "user-foreach-False", "fused_optimizer-False"],
)
def test_fused_cpu_optimizer_is_selected_only_when_the_user_left_the_choice(
    monkeypatch: pytest.MonkeyPatch, opt_kwargs: dict, strategy_kwargs: dict, fused: bool
) -> None:
    """During the host step every group has ``fused=True`` and torch's fused AdamW kernel runs, unless
    the user chose ``foreach=True`` or ``foreach=False`` (the for-loop) or passed ``fused_optimizer=False``. Guards against
    ``enable_fused`` doing nothing (seen red: default), ``fused_optimizer=False`` being ignored
    (seen red) and a user's ``foreach=True`` being overridden (seen red)."""
    seen: list[tuple[Any, Any]] = []
    kernel_calls = [0]
    real_step, real_kernel = torch.optim.AdamW.step, torch._fused_adamw_

    def spy_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend((g.get("fused"), g.get("foreach")) for g in self.param_groups)
        return real_step(self, *args, **kwargs)

    def spy_kernel(*args: Any, **kwargs: Any) -> Any:
        kernel_calls[0] += 1
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    monkeypatch.setattr(torch, "_fused_adamw_", spy_kernel)
    L.seed_everything(0)
    trainer(MegaTrainStrategy(**strategy_kwargs), max_steps=2).fit(WithOptimizer(**opt_kwargs), data())
    assert seen, "the host step never ran"
    if fused:
        assert all(f is True for f, _ in seen), seen
        assert kernel_calls[0] > 0
    else:
        assert not any(f is True for f, _ in seen), seen
        assert kernel_calls[0] == 0
        if "foreach" in opt_kwargs:
            assert all(fe is opt_kwargs["foreach"] for _, fe in seen), seen


# ----------------------------------------------------------------------------- trainer.test
class Tested(HFLM):
    # Llama (RMSNorm): CPU autocast runs nn.LayerNorm with bf16 weights on fp32 inputs
    def __init__(self) -> None:
        super().__init__("llama", dropout=0.0)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        out = self.model(input_ids=batch[0], labels=batch[0])  # one forward per batch
        self.log("test_loss", out.loss)
        self.log("test_logit_norm", out.logits.float().norm())


class _H2DDuringTest(L.Callback):
    """Bytes the runtime copied to the device per test batch (its counters, read without a sync)."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []

    def on_test_batch_start(self, trainer: Any, *args: Any) -> None:
        trainer.strategy.runtime.stats()

    def on_test_batch_end(self, trainer: Any, *args: Any) -> None:
        self.per_batch.append(trainer.strategy.runtime.stats().h2d_bytes)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_test_equals_plain_lightning(precision: str) -> None:
    """``trainer.test`` after ``fit`` under megatrain logs the numbers plain Lightning logs (fp32: float
    noise; bf16-mixed: 1e-3 relative), with every layer streamed to the device for each batch and
    the non-layer parameters bound there. Guards against the strategy's ``test_step`` running
    without binding (seen red: no non-layer bytes copied) and test batches running on stale or
    unstreamed weights."""
    results = []
    probe = _H2DDuringTest()
    for strategy in ("auto", "megatrain"):
        L.seed_everything(0)
        model = Tested()
        # host_memory="fast": the layers stream in the compute dtype (the CPU default streams fp32 masters)
        make = (lambda: MegaTrainStrategy(host_memory="fast")) if strategy == "megatrain" else (lambda: "auto")
        t = trainer(make(), max_steps=3, precision=precision)
        t.fit(model, data())
        t.test(model, data(n=8), verbose=False)  # fit's trainer: the trained weights, then a second setup
        results.append(t.callback_metrics.copy())
        if strategy == "megatrain":
            t2 = trainer(make(), precision=precision, callbacks=[probe])
            t2.test(model, data(n=8), verbose=False)
            results.append(t2.callback_metrics.copy())
            layer_params = list(model.model.model.layers.parameters())
            outer = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in layer_params)
            csize = 2 if precision == "bf16-mixed" else 4
            # matrices stream in the compute dtype, vectors (norm weights) in fp32
            layers = sum(p.numel() * (csize if p.dim() >= 2 else 4) for p in layer_params)
            # the non-layer parameters cross once (their device copy is kept while they do not change)
            assert probe.per_batch == [layers + outer * 4, layers], probe.per_batch
    plain, mega, mega_again = results
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "32-true" else dict(rtol=1e-3, atol=0)
    for key in ("test_loss", "test_logit_norm"):
        torch.testing.assert_close(mega[key], plain[key], **tol)
        torch.testing.assert_close(mega_again[key], plain[key], **tol)
