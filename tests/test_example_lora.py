"""examples/finetune_lora.py (issue 11, item 6): LoRA through LightningCLI on a local HF directory, with
the tiny CPU config; the adapters it exports load with PEFT and compute what the trained module computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from test_example import REPO, _load, _tiny_hf_dir

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LORA = REPO / "examples" / "finetune_lora.py"
CONFIG = REPO / "examples" / "configs" / "lora_cpu_tiny.yaml"


@pytest.fixture(scope="module")
def lora_example() -> ModuleType:
    return _load("finetune_lora_example", LORA)


def test_finetune_lora_trains_adapters_and_exports_them(
    lora_example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [str(LORA)])
    base_dir = tmp_path / "base"
    _tiny_hf_dir(base_dir, tie=False).to(torch.bfloat16).save_pretrained(base_dir, safe_serialization=True)
    adapters, merged = tmp_path / "adapters", tmp_path / "merged"
    cli = lora_example.main(
        [
            f"--config={CONFIG}",
            f"--model.pretrained_path={base_dir}",
            f"--model.adapter_dir={adapters}",
            f"--model.merged_dir={merged}",
            "--model.target_modules=[q_proj,v_proj,down_proj]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert type(cli.trainer.strategy).__name__ == "MegaTrainStrategy" and cli.trainer.precision == "bf16-mixed"
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4
    module = cli.model

    # the base stayed bf16 and bit-identical to the files; only the adapters (fp32) trained
    reference = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    ref = reference.state_dict()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if n.endswith("lora_A.default.weight")} == {"q_proj", "v_proj", "down_proj"}
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref[key]), name
    assert all(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)  # moved from zero

    # the export is PEFT's own: it loads on the base and gives the trained module's logits
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    loaded = peft.PeftModel.from_pretrained(reference, adapters)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)(input_ids=ids).logits
        assert not torch.equal(want, base_logits)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # the merged export: the base with the adapters folded in (bf16 rounding of W + BA)
        folded = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)(input_ids=ids).logits
        torch.testing.assert_close(folded.float(), want.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["lora_llama3_8b.yaml", "lora_llama3_70b.yaml"])
def test_gpu_configs_parse(lora_example: ModuleType, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 8B/70B configs name only options the script has (they need a GPU and the weights to run)."""
    monkeypatch.setattr(sys, "argv", [str(LORA)])
    with pytest.raises(SystemExit) as exit_info:
        lora_example.main([f"--config={REPO / 'examples' / 'configs' / name}", f"--model.pretrained_path={tmp_path}", "--print_config"], run=False)
    assert exit_info.value.code in (0, None)
