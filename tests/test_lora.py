"""LoRA on a bf16 base: frozen parameters stored once as they are (2 bytes per parameter), adapters
trained with fp32 masters; the same training as plain Lightning with the same setup (issue 11)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from models import VOCAB, BlockLM, Recorder, data, fit_pair, trainer

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 3, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


class LoraLM(Recorder):
    """PEFT's own wrapper around a bf16 HF Llama, as a user writes it."""

    def __init__(self, targets: list[str] = ALL_PROJ, dropout: float = 0.1) -> None:
        super().__init__()
        peft = pytest.importorskip("peft")
        self.model = peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
        )
        self.start = {k: v.detach().clone() for k, v in self.named_parameters()}

    def loss(self, batch: Any) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss


def test_peft_adapters_are_fp32_and_the_base_is_bf16() -> None:
    model = LoraLM()
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all("lora_" in n for n in trainable)
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("targets", [ALL_PROJ, ["q_proj", "v_proj"]], ids=["attention+mlp", "attention"])
def test_lora_on_a_bf16_base_trains_like_plain_lightning(targets: list[str]) -> None:
    plain, mega = fit_pair(lambda: LoraLM(targets), max_steps=4, precision="bf16-mixed")
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(mega.norms), torch.tensor(plain.norms), rtol=1e-5, atol=1e-6)
    pp, mp = dict(plain.named_parameters()), dict(mega.named_parameters())
    moved = 0
    for name, p in mp.items():
        if p.requires_grad:
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, pp[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
            moved += not torch.equal(p, mega.start[name])
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, mega.start[name]), name  # bit-identical base
    assert moved == len([p for p in mp.values() if p.requires_grad])


def test_frozen_layers_hold_only_their_bf16_copy() -> None:
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            rt = trainer.strategy.runtime
            unit = rt.layer_units[0]
            base = [e for e in unit.entries if not e.param.requires_grad]
            adapters = [e for e in unit.entries if e.param.requires_grad]
            seen["base_in_image"] = all(e.soffset is None and e.stream_dtype == torch.bfloat16 for e in base)
            seen["base_pointer"] = all(e.param.data_ptr() == unit.param_view(unit.compute, e).data_ptr() for e in base)
            # adapters are a small part of the layer: streamed in fp32 straight from their masters
            seen["adapters_fp32"] = all(e.soffset is None and e.stream_dtype == torch.float32 for e in adapters)
            seen["master"] = unit.master.numel()
            seen["adapters"] = sum(e.numel for e in adapters)
            seen["gnumel"] = unit.gnumel
            seen["plan"] = trainer.strategy.memory_plan

    L.seed_everything(0)
    model = LoraLM()
    trainer("megatrain", max_steps=1, precision="bf16-mixed", callbacks=[Probe()]).fit(model, data())
    assert seen["base_in_image"] and seen["base_pointer"]
    assert seen["adapters_fp32"] and seen["master"] == 0  # no separate cast copy: the image is all there is
    assert seen["adapters"] == seen["gnumel"] > 0  # fp32 gradients: adapters only
    plan = seen["plan"]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert plan.host["frozen weights (as stored)"] == 2 * frozen
    assert plan.host["fp32 master weights"] == 4 * (plan.trainable)
    assert plan.host["fp32 gradients"] == 4 * plan.trainable


class FrozenEmbedding(BlockLM):
    """No PEFT: a bf16 frozen embedding, one frozen fp32 layer (cast to bf16 once), a trainable head."""

    def __init__(self) -> None:
        super().__init__(d=16, n=3, dropout=0.1)
        self.emb.to(torch.bfloat16).requires_grad_(False)
        self.blocks[0].requires_grad_(False)
        self.norm.requires_grad_(False)
        self.start = {k: v.detach().clone() for k, v in self.named_parameters()}


def test_frozen_bf16_embedding_and_fp32_frozen_layer_with_a_trainable_head() -> None:
    plain, mega = fit_pair(FrozenEmbedding, max_steps=4, precision="bf16-mixed")
    torch.testing.assert_close(torch.tensor(mega.losses), torch.tensor(plain.losses), rtol=1e-3, atol=1e-4)
    for name, p in mega.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, mega.start[name]) and p.dtype == mega.start[name].dtype, name
            assert p.grad is None
    dp = torch.cat([(p - plain.start[n]).flatten() for n, p in plain.named_parameters() if p.requires_grad])
    dm = torch.cat([(p - mega.start[n]).flatten() for n, p in mega.named_parameters() if p.requires_grad])
    assert dp.norm() > 0 and (dm - dp).norm() / dp.norm() < 0.05


def test_a_frozen_layer_sends_no_gradients_and_computes_none() -> None:
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            rt = trainer.strategy.runtime
            seen["gnumel0"] = rt.layer_units[0].gnumel
            seen["cast0"] = [e.name for e in rt.layer_units[0].entries if e.soffset is not None]

    L.seed_everything(0)
    trainer("megatrain", max_steps=1, precision="bf16-mixed", callbacks=[Probe()]).fit(FrozenEmbedding(), data())
    assert seen["gnumel0"] == 0
    assert set(seen["cast0"]) == {"mix.weight", "fc.weight", "out.weight"}  # fp32 frozen matrices: a bf16 copy


def test_trainable_bf16_parameter_is_refused_before_allocation() -> None:
    class Bad(BlockLM):
        def __init__(self) -> None:
            super().__init__()
            self.blocks[1].fc.to(torch.bfloat16)

    with pytest.raises(TypeError, match=r"blocks.1.fc.weight.*bfloat16.*requires grad.*freeze"):
        trainer("megatrain", max_steps=1, precision="bf16-mixed").fit(Bad(), data())
