"""The host schedule: training waits for the host only where something needs it (CPU, counted, not timed)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from models import BlockLM, assert_same_training, data, fit_pair


class Quiet(BlockLM):
    """No hook of this module reads gradients."""

    on_before_optimizer_step = L.LightningModule.on_before_optimizer_step


class ReadsAfterBackward(Quiet):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def on_after_backward(self) -> None:
        self.seen.append(float(self.blocks[0].fc.weight.grad.abs().sum()))  # not through parameters(): no guard


class CountWaits(L.Callback):
    """Full waits for the host worker in each training batch (each one drains the device's queue)."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self._start = 0

    def _waits(self, trainer: L.Trainer) -> int:
        return trainer.strategy.runtime.worker.full_waits

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = self._waits(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.per_batch.append(self._waits(trainer) - self._start)


def _fit_counting(make: Any, **kwargs: Any) -> tuple[Any, Any, CountWaits]:
    counter = CountWaits()
    plain, mega = fit_pair(make, accumulate_grad_batches=3, max_steps=3, loader=lambda: data(n=36), callbacks=[counter], **kwargs)
    return plain, mega, counter


@pytest.fixture
def count_mega_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """CountWaits reads the megatrain runtime; on the plain run it does nothing."""
    original = CountWaits._waits
    monkeypatch.setattr(CountWaits, "_waits", lambda self, t: original(self, t) if getattr(t.strategy, "runtime", None) else 0)


def test_no_host_wait_across_micro_batches_when_nothing_reads_gradients(count_mega_only: None) -> None:
    plain, mega, counter = _fit_counting(Quiet)
    assert_same_training(plain, mega)
    mega_counts = counter.per_batch[len(counter.per_batch) // 2 :]  # the second fit is megatrain's
    assert len(mega_counts) == 9
    # the first micro-batch of a step waits once, in zero_grad (it clears what the pending step reads);
    # the others run with no wait for the host at all
    assert [c for i, c in enumerate(mega_counts) if i % 3] == [0] * 6
    assert all(c <= 1 for c in mega_counts)


def test_a_hook_reading_gradients_after_backward_waits_and_sees_them_whole(count_mega_only: None) -> None:
    plain, mega, counter = _fit_counting(ReadsAfterBackward)
    assert_same_training(plain, mega)
    assert mega.seen == plain.seen and len(mega.seen) == 9
    mega_counts = counter.per_batch[len(counter.per_batch) // 2 :]
    assert all(c >= 1 for c in mega_counts)


def test_clipping_waits_only_at_the_step_boundary(count_mega_only: None) -> None:
    plain, mega, counter = _fit_counting(Quiet, gradient_clip_val=0.05)
    assert_same_training(plain, mega)
    mega_counts = counter.per_batch[len(counter.per_batch) // 2 :]
    assert [c for i, c in enumerate(mega_counts) if i % 3 == 1] == [0, 0, 0]
    assert all(c >= 1 for i, c in enumerate(mega_counts) if i % 3 == 2)
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses))


class FrozenHalf(Quiet):
    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks[:2]:
            block.requires_grad_(False)


def test_a_slow_host_never_reads_a_non_layer_gradient_the_next_micro_batch_overwrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wait after backward: the next micro-batch's non-layer gradients (one host buffer per unit, not
    a pool of channels) must not be copied into that buffer before the host has added the last ones."""
    import time

    from lightning_megatrain.engine import whole

    real = whole.Whole.consume

    def slow(self: Any, unit: Any, *args: Any) -> None:
        if unit.staging is not None:
            time.sleep(0.05)  # the host falls behind: the next backward comes first
        real(self, unit, *args)

    monkeypatch.setattr(whole.Whole, "consume", slow)
    # two trainable layers, two channels: backward never waits for a channel, i.e. for the host
    plain, mega = fit_pair(FrozenHalf, accumulate_grad_batches=3, max_steps=2, loader=lambda: data(n=24))
    assert_same_training(plain, mega, rtol=0, atol=0)


def test_residency_is_kept_across_steps_for_unchanged_layers() -> None:
    """Layers still in a slot after backward are not copied again: across micro-batches of a step
    (nothing changed) and, for frozen layers, across optimizer steps; updated layers are copied fresh."""
    plain, mega = fit_pair(FrozenHalf, accumulate_grad_batches=2, max_steps=3, loader=lambda: data(n=24))
    assert_same_training(plain, mega)
    loads = []

    class Loads(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            loads.append(trainer.strategy.runtime.slots.loads)

    from models import trainer

    L.seed_everything(0)
    model = FrozenHalf()
    trainer("megatrain", max_steps=3, accumulate_grad_batches=2, callbacks=[Loads()]).fit(model, data(n=24))
    per_batch = [b - a for a, b in zip([0, *loads], loads)]
    n, slots = 4, 2  # prefetch 1: two slots; after backward they hold blocks 0 and 1 (both frozen)
    # first micro-batch: every layer in forward, all but the two resident in backward
    assert per_batch[0] == n + n - slots
    # every later micro-batch finds blocks 0 and 1 resident: after an accumulation micro-batch because
    # nothing changed, after an optimizer step because they are frozen
    assert per_batch[1:] == [2 * (n - slots)] * (len(per_batch) - 1)
