"""megatrain against plain Lightning, same model, data and seed, in one process (CPU)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain import MegaTrainStrategy
from models import HFLM, MLP, BlockLM, assert_same_training, data, fit_pair


@pytest.mark.parametrize("tied", [False, True])
def test_block_stack_dropout_accumulation_clip_norm_scheduler(tied: bool) -> None:
    plain, mega = fit_pair(lambda: BlockLM(tied=tied), accumulate_grad_batches=2, gradient_clip_val=0.05)
    assert_same_training(plain, mega)
    assert len(mega.norms) == 6 and len(mega.losses) == 12  # 2 batches per optimizer step


def test_clip_by_value_sgd_momentum_prefetch_2() -> None:
    def make() -> BlockLM:
        m = BlockLM(n=5)
        m.opt_name = "sgd"
        return m

    plain, mega = fit_pair(
        make, strategy=MegaTrainStrategy(prefetch=2), accumulate_grad_batches=3, gradient_clip_val=0.01,
        gradient_clip_algorithm="value", max_steps=3, loader=lambda: data(n=36),
    )
    assert_same_training(plain, mega)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama(tied: bool) -> None:
    plain, mega = fit_pair(lambda: HFLM("llama", tied=tied), max_steps=4)
    assert_same_training(plain, mega)
    if tied:
        assert mega.model.lm_head.weight is mega.model.model.embed_tokens.weight


def test_hf_gradient_checkpointing_is_turned_off_with_a_warning() -> None:
    def make() -> HFLM:
        m = HFLM("llama")
        m.model.gradient_checkpointing_enable()
        return m

    with pytest.warns(UserWarning, match="gradient checkpointing on"):
        plain, mega = fit_pair(make, max_steps=3)
    assert_same_training(plain, mega)


def test_no_layer_stack_trains_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="nothing is streamed"):
        plain, mega = fit_pair(MLP, max_steps=4)
    assert_same_training(plain, mega)


class Frozen(BlockLM):
    def __init__(self) -> None:
        super().__init__(n=4)
        for p in self.blocks[0].parameters():
            p.requires_grad_(False)
        self.blocks[1].fc.bias.requires_grad_(False)
        self.emb.weight.requires_grad_(False)


def test_frozen_parameters_get_no_grad_and_no_state() -> None:
    plain, mega = fit_pair(Frozen, max_steps=4)
    assert_same_training(plain, mega)
    frozen = [mega.emb.weight, mega.blocks[1].fc.bias, *mega.blocks[0].parameters()]
    assert all(p.grad is None for p in frozen)
    # the frozen block still changes nothing
    for p, q in zip(plain.blocks[0].parameters(), mega.blocks[0].parameters()):
        assert torch.equal(p, q)


def test_frozen_layers_have_no_gradient_memory() -> None:
    import lightning as L

    from models import trainer

    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            rt = trainer.strategy.runtime
            seen["gnumel"] = [u.gnumel for u in rt.layer_units]
            seen["numel"] = [u.numel for u in rt.layer_units]

    L.seed_everything(0)
    trainer("megatrain", max_steps=1, callbacks=[Probe()]).fit(Frozen(), data())
    assert seen["gnumel"][0] == 0 and seen["numel"][0] > 0
    assert seen["gnumel"][1] == seen["numel"][1] - 64  # fc.bias (4*d) frozen
    assert seen["gnumel"][2] == seen["numel"][2]


class Manual(BlockLM):
    """Two updates per training_step; the second forward must see the first update."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        for _ in range(2):
            loss = self.loss(batch)
            self.losses.append(loss.item())
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
            opt.step()
        self.lr_schedulers().step()


def test_manual_optimization() -> None:
    plain, mega = fit_pair(Manual, max_steps=6)
    assert len(mega.losses) == 6  # max_steps counts optimizer steps: 3 training steps x 2
    assert_same_training(plain, mega)


class SkipSome(BlockLM):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 3 == 1:
            return None
        return super().training_step(batch, batch_idx)


def test_training_step_returning_none_skips_the_step() -> None:
    plain, mega = fit_pair(SkipSome, max_steps=6)
    assert_same_training(plain, mega)


def test_bf16_mixed_close_to_plain_bf16_mixed() -> None:
    """Losses within 1e-3 relative, and each parameter's update (final - initial) within 10% of the
    plain update's size (measured here: < 3%). Comparing final weights with an absolute tolerance
    would pass with no update at all: guards against a host optimizer that never updates (seen red)."""
    # CPU autocast leaves layer_norm out of its fp32 list, so this uses Llama's RMSNorm
    L.seed_everything(0)
    initial = {k: v.detach().clone() for k, v in HFLM("llama").named_parameters()}  # what fit_pair builds
    plain, mega = fit_pair(lambda: HFLM("llama"), precision="bf16-mixed", max_steps=4)
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=1e-3, atol=0)
    pp, mp = dict(plain.named_parameters()), dict(mega.named_parameters())
    for name, start in initial.items():
        assert mp[name].dtype == torch.float32
        d_plain, d_mega = pp[name] - start, mp[name] - start
        assert d_plain.norm() > 0, name
        rel = ((d_mega - d_plain).norm() / d_plain.norm()).item()
        assert rel < 0.1, f"{name}: update differs from plain by {rel:.3f} of its size"


def test_validate_and_predict_equal() -> None:
    import lightning as L

    from models import trainer

    outs = []
    for strat in ("auto", "megatrain"):
        L.seed_everything(0)
        model = HFLM("llama")
        t = trainer(strat)
        val = t.validate(model, data())
        pred = t.predict(model, data())
        test_model = BlockLM()
        outs.append((val[0]["val_loss"], torch.cat(pred), test_model))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def test_fit_then_validate_reuses_trained_weights() -> None:
    import lightning as L

    from models import trainer

    vals = []
    for strat in ("auto", "megatrain"):
        L.seed_everything(0)
        model = BlockLM()
        t = trainer(strat, max_steps=4)
        t.fit(model, data())
        vals.append(t.validate(model, data())[0]["val_loss"])
    assert vals[1] == pytest.approx(vals[0], rel=1e-5)


def test_val_check_inside_fit() -> None:
    plain, mega = fit_pair(BlockLM, max_steps=6, val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=1)
    assert_same_training(plain, mega)


def test_zero_grad_right_after_step_waits_for_the_pending_step() -> None:
    import time

    done: list[int] = []

    class SlowAdamW(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            time.sleep(0.02)
            out = super().step(closure)
            done.append(len(self.param_groups[0]["params"]))
            return out

    class ZeroAfterStep(BlockLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.checked = 0

        def configure_optimizers(self) -> Any:
            return SlowAdamW(self.parameters(), lr=1e-2)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            loss = self.loss(batch)
            self.manual_backward(loss)
            done.clear()
            opt.step()
            opt.zero_grad()  # must not clear gradients the host step is still reading
            assert len(done) == len(self.blocks) + 2, done  # input side, layers, output side
            assert all(p.grad is None for p in self.parameters())
            self.checked += 1

    from models import trainer

    model = ZeroAfterStep()
    trainer("megatrain", max_steps=3).fit(model, data())
    assert model.checked == 3


class EMA(L.Callback):
    """Reads all parameters right after every optimizer step, as EMA/SWA callbacks do."""

    def __init__(self) -> None:
        self.ema: list[torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        with torch.no_grad():
            params = [p.detach().clone() for p in pl_module.parameters()]
            if self.ema is None:
                self.ema = params
            else:
                self.ema = [0.9 * e + 0.1 * p for e, p in zip(self.ema, params)]


def test_validation_every_step_and_callbacks_reading_parameters_see_the_update() -> None:
    # Lightning zeroes the module's grads before validation and callbacks read parameters while
    # the host step may still be running: both must wait for it (a race here once crashed).
    from models import trainer

    results = []
    for strat in ("auto", "megatrain"):
        L.seed_everything(0)
        model, ema = BlockLM(n=6, d=64), EMA()
        t = trainer(strat, max_steps=8, val_check_interval=1, limit_val_batches=1, callbacks=[ema])
        t.fit(model, data(), data())
        results.append((model, ema))
    (plain, pe), (mega, me) = results
    assert_same_training(plain, mega)
    for a, b in zip(pe.ema, me.ema):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_overlap_optimizer_false_matches_too() -> None:
    plain, mega = fit_pair(BlockLM, strategy=MegaTrainStrategy(overlap_optimizer=False), max_steps=4)
    assert_same_training(plain, mega)


class TwoBindings(BlockLM):
    """A loss over a forward before and a forward after an update in the same training_step: the
    non-layer parameters are bound twice and both bindings' gradients must reach the host."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        first = self.loss(batch)
        opt.step()  # no gradients yet: changes nothing, but the next forward binds again
        second = self.loss(batch)
        self.losses.append((first + second).item())
        self.manual_backward(first + second)  # gradients from both bindings
        opt.step()
        opt.zero_grad()


class ThreeSteps(BlockLM):
    """Three forward/backward/step rounds in one training_step: one device copy of the non-layer
    parameters at a time, not one per step kept until the training_step ends."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.copies: list[int] = []  # distinct device copies of the input side alive after each round

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        for _ in range(3):
            loss = self.loss(batch)
            self.losses.append(loss.item())
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            runtime = getattr(self.trainer.strategy, "runtime", None)
            if runtime is not None:
                outer = runtime.outer.copies[runtime.outer.outer_in.index]
                alive = {outer.dev.data_ptr()} | {leaf.data_ptr() for leaves in outer.bindings for leaf in leaves[:1]}
                self.copies.append(len(alive))


def test_manual_optimization_several_steps_in_one_training_step_hold_one_device_copy() -> None:
    plain, mega = fit_pair(ThreeSteps, max_steps=6)
    assert len(mega.losses) == 6
    assert_same_training(plain, mega)
    assert mega.copies and set(mega.copies) == {1}, mega.copies


class BackwardAfterStep(BlockLM):
    """Two graphs, a step between their backwards: plain PyTorch refuses the second backward where the
    step bumps the weights' versions (the for-loop AdamW: "modified by an inplace operation"; the fused
    kernel updates in place without a bump and the backward silently mixes old activations with new
    weights). megatrain refuses it: it must not compute with a device copy the host is overwriting."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        first, second = self.loss(batch), self.loss(batch)
        self.manual_backward(first)
        opt.step()
        opt.zero_grad()
        self.manual_backward(second)


def test_manual_optimization_backward_of_a_graph_from_before_a_step_is_refused() -> None:
    from models import trainer

    with pytest.raises(RuntimeError, match="from before an optimizer step of the same training_step"):
        trainer("megatrain", max_steps=2).fit(BackwardAfterStep(), data())


def test_manual_optimization_loss_over_two_forwards() -> None:
    plain, mega = fit_pair(TwoBindings, max_steps=6)
    assert len(mega.losses) == 3  # max_steps counts both opt.step() calls
    assert_same_training(plain, mega)


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam], ids=["adamw", "adam"])
def test_fused_cpu_adamw_is_within_rounding_of_the_for_loop(opt_cls: Any) -> None:
    """What ``fused_optimizer=True`` changes: torch's fused CPU kernel against its for-loop, fp32, the
    same parameters and gradients, 30 steps. The exactness tests compare megatrain with plain Lightning
    stepping the same kernel (tests/models.py ``SameKernel``); this bounds the kernel itself.

    The bound, from float rounding: both kernels compute the same formula in another order of operations
    (fused multiply-adds, constants folded differently, this CPU's vector width). Each rounded fp32
    operation is off by at most u = 2**-24 relative. An update is p - lr * (m_hat / (sqrt(v_hat) + eps)
    + wd * p); the step's error is at most a dozen u times its size, which for Adam is at most about lr,
    and storing p costs u * |p|. The gradients here do not depend on the parameters, so the errors add
    up: after k steps |fused - loop| <= k * u * (|p| + C * lr), C = 16 (a generous count of the rounded
    operations in one update). An update that differs by more than rounding (eps=1e-6 instead of 1e-8)
    is off by ~3e-5, a hundred times the bound.
    """
    u, steps, lr, c = 2.0**-24, 30, 1e-2, 16
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (37,), (1000,), (64, 48), (4099,)]  # odd sizes: the vector loop's tails too
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]

    def run(**impl: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [torch.nn.Parameter(p.clone()) for p in start]
        largest = [p.detach().abs() for p in params]  # |p| along the way, elementwise
        opt = opt_cls(params, lr=lr, weight_decay=0.1, **impl)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
            largest = [torch.maximum(m, p.detach().abs()) for m, p in zip(largest, params)]
        return [p.detach() for p in params], largest

    (fused, _), (loop, largest) = run(fused=True), run(foreach=False)
    moved = 0.0
    for f, ref, p0, big in zip(fused, loop, start, largest):
        moved = max(moved, (ref - p0).abs().max().item())
        excess = ((f - ref).abs() - steps * u * (big + c * lr)).max().item()
        assert excess <= 0, f"fused is off the for-loop by more than the rounding bound (by {excess:.3g})"
    assert moved > 10 * lr  # the parameters really moved: the bound is not met by doing nothing
