"""Bad input gets a clear error before anything is allocated."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning as L
import psutil
import pytest
import torch

import lightning_megatrain
from lightning_megatrain import MegaTrainPrecision, MegaTrainStrategy, MemoryPlanError
from models import BlockLM, data, trainer


def test_import_twice_and_registry() -> None:
    import importlib

    from lightning.pytorch.strategies import StrategyRegistry

    importlib.reload(lightning_megatrain)
    assert "megatrain" in StrategyRegistry
    t = trainer("megatrain")
    assert isinstance(t.strategy, MegaTrainStrategy)
    assert isinstance(t.precision_plugin, MegaTrainPrecision)
    assert t.strategy.root_device == torch.device("cpu")


def test_more_than_one_device() -> None:
    # several devices train data parallel (tests/test_distributed.py); nothing starts before fit
    assert trainer("megatrain", devices=2).strategy.is_distributed


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_unsupported_precision(precision: str) -> None:
    with pytest.raises(ValueError, match="supports precision '32-true' or 'bf16-mixed', got"):
        trainer("megatrain", precision=precision)


def test_fp16_mixed_refused() -> None:
    # On the CPU Lightning itself turns 16-mixed into bf16-mixed; on a GPU the plugin is refused.
    from lightning.pytorch.plugins.precision import MixedPrecision

    with pytest.raises(ValueError, match="got '16-mixed'"):
        MegaTrainPrecision.from_plugin(MixedPrecision("16-mixed", "cuda"))


def test_precision_plugin_flags() -> None:
    assert trainer("megatrain", precision="bf16-mixed").precision_plugin.compute_dtype == torch.bfloat16
    assert trainer("megatrain", precision="32-true").precision_plugin.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="got 'fp8'"):
        MegaTrainPrecision("fp8")  # type: ignore[arg-type]


def test_bad_prefetch() -> None:
    with pytest.raises(ValueError, match="prefetch must be an integer >= 1"):
        MegaTrainStrategy(prefetch=0)


def _ptrs(model: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in model.parameters()]


def _untouched(model: BlockLM, ptrs: list[int]) -> bool:
    """No arena was made: every parameter still has its own memory, no layer forward was replaced."""
    return _ptrs(model) == ptrs and all("forward" not in b.__dict__ for b in model.blocks)


def test_layer_cls_matching_nothing() -> None:
    model = BlockLM()
    ptrs = _ptrs(model)
    with pytest.raises(ValueError, match=r"layer_cls=\['NoSuchLayer'\] matches no module of BlockLM.*'Block'"):
        trainer(MegaTrainStrategy(layer_cls=["NoSuchLayer"])).fit(model, data())
    assert _untouched(model, ptrs)


def test_layer_cls_by_class_name_and_path() -> None:
    from models import Block

    for spec in (["Block"], ["models.Block"], [Block]):
        seen: dict[str, Any] = {}

        class Probe(L.Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                seen["n"] = len(trainer.strategy.runtime.layers)

        trainer(MegaTrainStrategy(layer_cls=spec), max_steps=1, callbacks=[Probe()]).fit(BlockLM(n=3), data())
        assert seen["n"] == 3


def test_not_enough_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(**{**real._asdict(), "available": 1000}))
    model = BlockLM()
    ptrs = _ptrs(model)
    with pytest.raises(MemoryPlanError, match=r"needs \d+ bytes .* more host memory .* but 1000 bytes"):
        trainer("megatrain").fit(model, data())
    assert _untouched(model, ptrs)


def test_check_memory_false_skips_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(**{**real._asdict(), "available": 1000}))
    trainer(MegaTrainStrategy(check_memory=False), max_steps=1).fit(BlockLM(), data())


def test_non_fp32_model_is_refused_before_allocation() -> None:
    model = BlockLM().to(torch.bfloat16)
    ptrs = _ptrs(model)
    with pytest.raises(TypeError, match="fp32 master weights"):
        trainer("megatrain").fit(model, data())
    assert _untouched(model, ptrs)


def test_lbfgs_refused() -> None:
    class WithLBFGS(BlockLM):
        def configure_optimizers(self) -> Any:
            return torch.optim.LBFGS(self.parameters())

    model = WithLBFGS()
    ptrs = _ptrs(model)
    with pytest.raises(ValueError, match="LBFGS re-evaluates the closure"):
        trainer("megatrain").fit(model, data())
    assert _untouched(model, ptrs)


def test_exception_in_training_leaves_no_thread_and_restores_the_model() -> None:
    import threading

    class Boom(BlockLM):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    t = trainer("megatrain")
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model, data())
    assert not [th for th in threading.enumerate() if th.name.startswith("megatrain")]
    assert t.strategy.runtime is None
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    # the model still works as a plain module
    model.loss(next(iter(data())))


def test_unfreezing_during_fit_is_refused() -> None:
    class Unfreeze(BlockLM):
        def __init__(self) -> None:
            super().__init__()
            self.blocks[2].requires_grad_(False)

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:
                self.blocks[2].requires_grad_(True)

    with pytest.raises(RuntimeError, match="changed requires_grad after megatrain set up"):
        trainer("megatrain").fit(Unfreeze(), data())


def test_memory_plan_public_function_and_device_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_megatrain import plan_memory
    from models import HFLM

    model = HFLM("llama")
    layers = list(model.model.model.layers)
    opt = torch.optim.AdamW(model.parameters())
    plan = plan_memory(model, layers, torch.bfloat16, torch.device("cpu"), prefetch=2, optimizers=[opt], batch_tokens=4096,
                       host_memory="fast")  # the layout with bf16 compute copies
    n = sum(p.numel() for p in model.parameters())
    layer_numel = sum(p.numel() for p in layers[0].parameters())
    assert plan.params == n and plan.n_layers == 3
    assert plan.host["fp32 master weights"] == 4 * n and plan.host["optimizer state (estimate)"] == 8 * n
    matrices = sum(p.numel() for p in layers[0].parameters() if p.dim() >= 2)
    assert plan.host["bfloat16 compute copies"] == 2 * 3 * matrices  # norm weights stream in fp32, uncast
    assert 3 * (2 * matrices + 4 * (layer_numel - matrices)) <= plan.device["weight slots"] <= 3 * (2 * layer_numel + 64 * 20)
    assert plan.device["saved layer inputs"] == 3 * 4096 * 32 * 2  # layers x tokens x hidden x bf16
    text = str(plan)
    assert "saved layer inputs" in text and "fits: yes" in text
    plan.device_free = 1000
    assert not plan.fits()
    with pytest.raises(MemoryPlanError, match=r"of device memory but 1000 bytes"):
        plan.check()


class _TiedAcross(BlockLM):
    """A module that cannot be streamed: the head shares a weight with a layer of the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(16, 64, bias=False)
        self.head.weight = self.blocks[0].fc.weight


def test_teardown_after_a_setup_failure_never_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setup fails (a module that cannot be streamed) and a teardown step fails too: the user's traceback
    ends on the setup error, and the teardown steps after the failing one still ran."""
    seen: list[str] = []

    def broken(self: Any) -> None:
        seen.append("precision teardown")
        raise RuntimeError("teardown broke")

    monkeypatch.setattr(MegaTrainPrecision, "teardown", broken)
    with pytest.raises(ValueError, match="also used outside the layer stack") as info:
        trainer("megatrain").fit(_TiedAcross(), data())
    assert "teardown broke" not in str(info.value) and info.value.__context__ is None
    assert seen == ["precision teardown"]


def test_detach_failing_after_a_training_failure_never_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training fails with the engine attached and detaching fails too: the user's error is what the
    user sees, the engine is detached once, and the later teardown steps still run."""
    from lightning_megatrain.engine import Runtime

    class Failing(BlockLM):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 1:
                raise KeyError("the user's own error")
            return super().training_step(batch, batch_idx)

    real = Runtime.detach
    calls: list[str] = []

    def broken(self: Runtime) -> None:
        real(self)  # free what it holds, then report a failure
        calls.append("detach")
        raise RuntimeError("detach broke")

    monkeypatch.setattr(Runtime, "detach", broken)
    monkeypatch.setattr(MegaTrainPrecision, "teardown", lambda self: calls.append("precision teardown"))
    with pytest.raises(KeyError, match="the user's own error") as info:
        trainer("megatrain").fit(Failing(), data())
    assert info.value.__context__ is None
    assert calls == ["detach", "precision teardown"]


def test_teardown_error_without_a_failure_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only after a failure is a teardown error logged instead of raised: otherwise it is the error."""
    monkeypatch.setattr(MegaTrainPrecision, "teardown", lambda self: (_ for _ in ()).throw(RuntimeError("teardown broke")))
    with pytest.raises(RuntimeError, match="teardown broke"):
        trainer("megatrain", max_steps=1).fit(BlockLM(), data())
