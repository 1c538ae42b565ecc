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


# ------------------------------------------------------------------ updates started during backward
class NormsAfterStep(L.Callback):
    """The whole step's gradient norm, read after the step (on_before_optimizer_step would be a reader
    that keeps the updates after backward)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack(grads).norm()) if grads else 0.0)


class QuietHF(__import__("models").HFLM):
    on_before_optimizer_step = L.LightningModule.on_before_optimizer_step


class TwiceFirst(Quiet):
    """Block 0 runs twice in each forward: its gradients are final only after its second backward."""

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) * self.gain
        mask = torch.ones(idx.shape, device=idx.device)
        x = self.blocks[0](x, scale=0.5, mask=mask)
        for block in self.blocks:
            x = block(x, scale=0.5, mask=mask)
        return self.head(self.norm(x))


class UpdateOrder(L.Callback):
    """Which units the host updates in each optimizer step, in the order it runs them (the gate is
    called on the worker before each unit's update)."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.early: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        runtime = getattr(trainer.strategy, "runtime", None)
        if runtime is not None:
            runtime.gate = self.order.append

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        runtime = getattr(trainer.strategy, "runtime", None)
        if runtime is not None:
            runtime.wait()
            self.early.append(runtime.stats(reset=False).early_updates)
            runtime.gate = None


def _fit_early(make: Any, steps: int = 3, accumulate: int = 3, late: bool = False, plain: bool = True,
               **kwargs: Any) -> tuple[Any, Any, NormsAfterStep, NormsAfterStep, UpdateOrder]:
    """Plain Lightning and megatrain on the same model, data and seed; ``late``: megatrain with the
    step after backward (as where something reads the gradients), the reference for modes that
    round differently from plain training ("fast", "lean")."""
    from models import trainer

    from lightning_megatrain import MegaTrainStrategy

    out, cbs = [], []
    order = UpdateOrder()
    host_memory = kwargs.pop("host_memory", "auto")
    for strat in (["auto"] if plain else []) + ["megatrain"]:
        L.seed_everything(0)
        model = make()
        norms = NormsAfterStep()
        extra = [norms, order] if strat == "megatrain" else [norms]
        strategy: Any = MegaTrainStrategy(host_memory=host_memory) if strat == "megatrain" else strat
        with pytest.MonkeyPatch.context() as m:
            if late:
                m.setattr("lightning_megatrain.precision.early_step_blockers", lambda module: ["test: late"])
            trainer(strategy, max_steps=steps, accumulate_grad_batches=accumulate, callbacks=extra, **kwargs).fit(
                model, data(n=4 * steps * accumulate)
            )
        out.append(model)
        cbs.append(norms)
    if not plain:
        out.insert(0, None)
        cbs.insert(0, None)  # type: ignore[arg-type]
    return out[0], out[1], cbs[0], cbs[1], order


@pytest.mark.parametrize("host_memory", ["fast", "compact", "lean"])
def test_updates_start_during_the_last_backward_and_train_exactly(host_memory: str) -> None:
    """Nothing reads gradients before the step: each layer's update is launched from its backward, in
    backward order (last layer first), and the numbers are those of the step after backward, bit for
    bit ("compact": also plain Lightning's, bit for bit; "fast" and "lean" round the streamed copy or
    the optimizer state to bf16, so plain differs from both schedules alike)."""
    plain, mega, plain_norms, mega_norms, order = _fit_early(Quiet, precision="bf16-mixed", host_memory=host_memory)
    _, late, _, late_norms, late_order = _fit_early(Quiet, precision="bf16-mixed", host_memory=host_memory, late=True, plain=False)
    assert_same_training(late, mega, rtol=0, atol=0)
    assert mega_norms.norms == late_norms.norms and len(mega_norms.norms) == 9
    if host_memory == "compact":
        assert_same_training(plain, mega, rtol=0, atol=0)
        assert mega_norms.norms == plain_norms.norms
    n_layers, steps = 4, 3
    assert order.early == [n_layers * steps] and late_order.early == [0]
    per_step = len(order.order) // steps
    for k in range(steps):
        step = order.order[k * per_step : (k + 1) * per_step]
        # layers 4..1 (unit indices) as their backward ends, then the non-layer units after backward
        assert step[:n_layers] == [4, 3, 2, 1], order.order
        assert sorted(step[n_layers:]) == [0, n_layers + 1]
        assert late_order.order[k * per_step : (k + 1) * per_step] == list(range(n_layers + 2))  # forward order


def test_updates_start_during_backward_for_an_hf_llama_with_accumulation() -> None:
    plain, mega, plain_norms, mega_norms, order = _fit_early(lambda: QuietHF(layers=3), steps=2, accumulate=2)
    assert_same_training(plain, mega)
    torch.testing.assert_close(torch.tensor(mega_norms.norms), torch.tensor(plain_norms.norms), rtol=1e-5, atol=1e-6)
    assert order.early == [3 * 2]


def test_a_layer_called_twice_is_updated_after_its_last_backward() -> None:
    plain, mega, plain_norms, mega_norms, order = _fit_early(TwiceFirst, steps=2, accumulate=2)
    assert_same_training(plain, mega)
    torch.testing.assert_close(torch.tensor(mega_norms.norms), torch.tensor(plain_norms.norms), rtol=1e-5, atol=1e-6)
    assert order.early == [4 * 2]  # block 0 (unit 1) once per step, after its second backward


@pytest.mark.parametrize("reader", ["clip", "hook", "manual"])
def test_the_step_waits_for_backward_where_something_reads_the_gradients(reader: str) -> None:
    """Clipping by norm, a hook that reads gradients before the step: no update starts early, and the
    memory plan says why."""
    from models import trainer

    L.seed_everything(0)
    model = BlockLM() if reader == "hook" else Quiet()  # BlockLM records norms in on_before_optimizer_step
    order = UpdateOrder()
    kwargs: dict[str, Any] = {"gradient_clip_val": 0.05} if reader == "clip" else {}
    if reader == "manual":
        model = ManualQuiet()
    t = trainer("megatrain", max_steps=2, accumulate_grad_batches=1 if reader == "manual" else 2, callbacks=[order], **kwargs)
    t.fit(model, data(n=16))
    assert order.early == [0]
    plan = str(t.strategy.memory_plan)
    expected = {"clip": "gradient_clip_val=0.05", "hook": "BlockLM.on_before_optimizer_step", "manual": "manual optimization"}[reader]
    assert "host optimizer step: after backward" in plan and expected in plan, plan


def test_the_plan_says_when_updates_start_during_backward() -> None:
    from models import trainer

    t = trainer("megatrain", max_steps=1)
    t.fit(Quiet(), data(n=4))
    assert "host optimizer step: during the last backward of each step" in str(t.strategy.memory_plan)


class ManualQuiet(Quiet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_prefetch_never_holds_a_layer_back_for_the_next_layers_host_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward's prefetch of layer 1 must not wait for layer 1's host update before layer 0 runs: a
    gate holds that update until layer 0's forward has run (and gives up after 20 s, which fails). BlockLM
    reads gradients before the step, so the updates run after backward in forward order (layer 0's
    before layer 1's) while the next forward goes on."""
    import threading

    from lightning_megatrain.engine import whole

    real = whole.Whole.update
    forwards = [threading.Event() for _ in range(8)]  # set as layer 0's forward of step i runs
    gated: list[bool] = []  # per gated update: True if layer 0 ran before the gate gave up

    def gate(self: Any, unit: Any, *args: Any, **kwargs: Any) -> None:
        if unit.index == 2 and len(gated) < 2:  # layer 1's updates after steps 0 and 1: a forward follows each
            gated.append(forwards[len(gated) + 1].wait(20.0))  # that next step's layer 0
        real(self, unit, *args, **kwargs)

    class Gate(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            if getattr(trainer.strategy, "runtime", None) is not None:
                count = iter(forwards)
                pl_module.blocks[0].register_forward_hook(lambda *a: next(count).set())

    monkeypatch.setattr(whole.Whole, "update", gate)
    plain, mega = fit_pair(BlockLM, max_steps=3, callbacks=[Gate()])
    assert_same_training(plain, mega)
    assert gated and all(gated), f"layer 1's update waited for layer 0's forward, which waited for it: {gated}"
