"""LoRA on a bf16 base: frozen parameters stored once as they are (2 bytes per parameter), adapters
trained with fp32 masters; the same training as plain Lightning with the same setup (issue 11)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_megatrain import MegaTrainStrategy
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
    # host_memory="fast": frozen fp32 matrices get a bf16 copy ("compact", the CPU default, streams them as stored)
    strategy = MegaTrainStrategy(host_memory="fast")
    trainer(strategy, max_steps=1, precision="bf16-mixed", callbacks=[Probe()]).fit(FrozenEmbedding(), data())
    assert seen["gnumel0"] == 0
    assert set(seen["cast0"]) == {"mix.weight", "fc.weight", "out.weight"}  # fp32 frozen matrices: a bf16 copy


def test_trainable_bf16_parameter_is_refused_before_allocation() -> None:
    class Bad(BlockLM):
        def __init__(self) -> None:
            super().__init__()
            self.blocks[1].fc.to(torch.bfloat16)

    with pytest.raises(TypeError, match=r"blocks.1.fc.weight.*bfloat16.*requires grad.*freeze"):
        trainer("megatrain", max_steps=1, precision="bf16-mixed").fit(Bad(), data())


# ----------------------------------------------------------------------------- checkpoints
def _fit(model: Recorder, steps: int, ckpt: Any = None, **kwargs: Any) -> L.Trainer:
    t = trainer("megatrain", max_steps=steps, precision="bf16-mixed", **kwargs)
    t.fit(model, data(n=8), ckpt_path=ckpt)  # two batches an epoch: a checkpoint at step 2 ends an epoch
    return t


@pytest.mark.parametrize("fmt", ["sharded", "single_file"])
def test_lora_checkpoint_holds_what_changes_and_resumes_exactly(tmp_path: Any, fmt: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_megatrain import MegaTrainStrategy
    from lightning_megatrain import checkpoint as ck

    def run(ckpt: Any, d: str) -> LoraLM:
        L.seed_everything(0)
        model = LoraLM(dropout=0.0)  # rebuilds the same base, as a module loading its base weights does
        cb = ModelCheckpoint(dirpath=tmp_path / d, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        t = trainer(MegaTrainStrategy(checkpoint_format=fmt), max_steps=4, precision="bf16-mixed",
                    enable_checkpointing=True, callbacks=[cb])
        t.fit(model, data(n=8), ckpt_path=ckpt)
        return model

    straight = run(None, "a")
    path = tmp_path / "a" / "step=2.ckpt"
    saved = ck.load_any(path)
    trainable = {n for n, p in straight.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable  # no base weight in the checkpoint
    frozen = [p for p in straight.parameters() if not p.requires_grad]
    assert len(saved["megatrain_frozen"]["names"]) == len(frozen)
    resumed = run(path, "b")
    assert resumed.losses == straight.losses[2:]
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_frozen_true_keeps_the_full_model(tmp_path: Any) -> None:
    from lightning_megatrain import MegaTrainStrategy
    from lightning_megatrain import checkpoint as ck

    L.seed_everything(0)
    model = LoraLM(dropout=0.0)
    t = trainer(MegaTrainStrategy(checkpoint_frozen=True), max_steps=1, precision="bf16-mixed")
    t.fit(model, data())
    t.save_checkpoint(tmp_path / "full")
    saved = ck.load_any(tmp_path / "full")
    assert set(saved["state_dict"]) == set(model.state_dict()) and "megatrain_frozen" not in saved


def test_resume_refuses_a_checkpoint_whose_omitted_parameters_are_trainable_here(tmp_path: Any) -> None:
    from lightning_megatrain.checkpoint import CheckpointMismatchError

    L.seed_everything(0)
    t = _fit(LoraLM(dropout=0.0), 1)
    t.save_checkpoint(tmp_path / "c")
    other = LoraLM(dropout=0.0)
    other.model.base_model.model.lm_head.weight.data = other.model.base_model.model.lm_head.weight.data.float()
    other.model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(CheckpointMismatchError, match="lm_head"):
        _fit(other, 2, ckpt=tmp_path / "c")


def test_telemetry_frozen_base_crosses_twice_in_bf16_and_only_adapter_grads_come_back() -> None:
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            rt = trainer.strategy.runtime
            rt.stats()  # reset
            seen["images"] = [u.nbytes for u in rt.layer_units]
            seen["slots"] = len(rt.slots.slots)
            seen["adapters"] = sum(u.gnumel for u in rt.layer_units)
            seen["outer"] = rt.outer_in.nbytes + rt.outer_out.nbytes
            seen["outer_grads"] = rt.outer_in.gnumel + rt.outer_out.gnumel

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            seen["stats"] = trainer.strategy.runtime.stats()

    L.seed_everything(0)
    strategy = MegaTrainStrategy(host_memory="fast")  # layer gradients come home in bf16
    trainer(strategy, max_steps=1, precision="bf16-mixed", callbacks=[Probe()]).fit(LoraLM(dropout=0.0), data())
    stats = seen["stats"]
    # each layer image (bf16 base, fp32 adapters) in twice, forward then the recompute in backward,
    # except the last layers, still resident in their slots when backward starts
    images, slots = seen["images"], seen["slots"]
    layer = list(LoraLM().model.base_model.model.model.layers[0].parameters())
    as_stored = sum(p.numel() * p.element_size() for p in layer)  # bf16 base, fp32 adapters: nothing cast
    assert len(set(images)) == 1 and as_stored <= images[0] < as_stored + 64 * len(layer)
    assert stats.h2d_bytes == (2 * len(images) - slots) * images[0] + seen["outer"]
    assert stats.d2h_bytes == 2 * seen["adapters"] + 4 * seen["outer_grads"]  # bf16 adapter grads only
    assert seen["outer_grads"] == 0
