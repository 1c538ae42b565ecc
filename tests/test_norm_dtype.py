"""bf16-mixed with norms inside the streamed layers: vectors (norm weights, biases) stream in fp32,
as plain mixed precision computes with them, so CPU bf16 autocast works (issue 9, item 6)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.memory import plan_memory
from models import BlockLM, data, fit_pair, trainer


class NormLM(BlockLM):
    """Pre-norm blocks with nn.LayerNorm inside each streamed layer, no dropout."""

    def __init__(self) -> None:
        super().__init__(d=16, n=3, dropout=0.0)
        self.sched = False
        self.lr = 1e-3
        self.start = {k: v.detach().clone() for k, v in self.named_parameters()}
        self.ln_dtypes: set[torch.dtype] = set()
        self.blocks[0].ln.register_forward_pre_hook(lambda m, a: self.ln_dtypes.add(m.weight.dtype))


def _delta(model: NormLM) -> torch.Tensor:
    return torch.cat([(p.detach() - model.start[k]).flatten() for k, p in model.named_parameters()])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_layernorm_in_streamed_layers_trains_under_cpu_mixed_precision(precision: str) -> None:
    plain, mega = fit_pair(NormLM, max_steps=4, precision=precision)
    assert mega.ln_dtypes == {torch.float32}  # the same fp32 norm weights plain autocast uses
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=1e-3, atol=1e-4)
    dp, dm = _delta(plain), _delta(mega)
    assert dp.norm() > 0 and dm.norm() > 0
    assert (dm - dp).norm() / dp.norm() < 0.1


def test_slots_hold_matrices_in_bf16_and_vectors_in_fp32() -> None:
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            rt = trainer.strategy.runtime
            unit = rt.layer_units[0]
            seen["dtypes"] = {e.name: e.stream_dtype for e in unit.entries}
            seen["nbytes"] = unit.nbytes
            seen["slot"] = rt.slots.slots[0].buf.numel()
            seen["plan"] = trainer.strategy.memory_plan

    L.seed_everything(0)
    model = NormLM()
    layer_bytes = sum(p.numel() * (2 if p.dim() >= 2 else 4) for p in model.blocks[0].parameters())
    # host_memory="fast": matrices are cast to bf16 ("compact", the CPU default, streams fp32 masters)
    trainer(MegaTrainStrategy(host_memory="fast"), max_steps=1, precision="bf16-mixed", callbacks=[Probe()]).fit(model, data())
    assert seen["dtypes"]["ln.weight"] == seen["dtypes"]["fc.bias"] == torch.float32
    assert seen["dtypes"]["fc.weight"] == torch.bfloat16
    assert layer_bytes <= seen["nbytes"] < layer_bytes + 64 * 8  # 64-byte alignment of each tensor
    assert seen["slot"] == seen["nbytes"]
    assert seen["plan"].device["weight slots"] == 2 * seen["nbytes"]


def test_memory_plan_counts_fp32_vectors_in_the_slots() -> None:
    model = NormLM()
    plan = plan_memory(model, list(model.blocks), torch.bfloat16, torch.device("cpu"), prefetch=1, host_memory="fast")
    all_bf16 = sum(p.numel() * 2 for p in model.blocks[0].parameters())
    assert plan.device["weight slots"] > 2 * all_bf16
