"""Exporting LoRA results (issue 11, item 4): adapters in PEFT's format, and the merged model in HF
layout written tensor by tensor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_megatrain.memory import HostMemoryPeak
from lightning_megatrain.peft import export_adapters, export_merged
from models import data, trainer
from test_lora import LoraLM, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained() -> LoraLM:
    L.seed_everything(0)
    model = LoraLM(dropout=0.0)
    trainer("megatrain", max_steps=3, precision="bf16-mixed").fit(model, data())
    return model


def test_adapters_load_with_peft_from_pretrained(trained: LoraLM, tmp_path: Path) -> None:
    out = export_adapters(trained, tmp_path / "adapters")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    L.seed_everything(0)
    base = tiny_llama()  # the same base weights (same seed), as a user reloads the base from its source
    loaded = peft.PeftModel.from_pretrained(base, out)
    got = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    want = {k: v for k, v in trained.model.named_parameters() if "lora_" in k}
    assert got.keys() == want.keys() and got
    for k in want:
        assert torch.equal(got[k], want[k]), k
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, trained.model(input_ids=idx).logits)


def test_merged_model_equals_peft_merge_and_unload(trained: LoraLM, tmp_path: Path) -> None:
    out = export_merged(trained, tmp_path / "merged", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    merged = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    reference = copy.deepcopy(trained.model).merge_and_unload()
    ref = reference.state_dict()
    got = merged.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], trained.start[
        "model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_merged_export_needs_about_one_matrix_of_memory(tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=8, num_key_value_heads=4)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "up_proj", "down_proj"], init_lora_weights=False))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4  # one merged matrix, computed in fp32
    export_merged(model, tmp_path / "warm-up", shard_bytes=4 * 2**20)  # first-call allocations (BLAS, allocator)
    with HostMemoryPeak() as peak:
        export_merged(model, tmp_path / "m", shard_bytes=4 * 2**20)
    # a few matrices at most (allocator slack included); a merged copy of the model would be > total
    assert peak.extra < 5 * largest < total / 4, (peak.extra, largest, total)
