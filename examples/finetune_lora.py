"""LoRA fine-tuning of a Hugging Face causal LM from a local directory with ``strategy="megatrain"``.

The base is loaded in bf16 (2 bytes per parameter in host memory, streamed to the GPU layer by layer)
and frozen; PEFT LoRA adapters (fp32, trainable) are added with ``peft.get_peft_model``. Nothing is
downloaded: the directory is what ``save_pretrained`` writes (config.json + safetensors, optionally a
tokenizer).

    python examples/finetune_lora.py fit --model.pretrained_path=/models/llama-3-8b \\
        --model.adapter_dir=out/llama-3-8b-lora                                  # shipped corpus
    python examples/finetune_lora.py fit --config examples/configs/lora_llama3_70b.yaml \\
        --model.pretrained_path=/models/llama-3-70b --data.path=my_text.txt
    python examples/finetune_lora.py fit --model.pretrained_path=... --model.r=64 --model.alpha=128 \\
        --model.dropout=0.0 --model.target_modules='[q_proj,v_proj]'          # LoRA options
    python examples/finetune_lora.py fit --print_config                         # every option

At the end of ``fit`` the adapters are written in PEFT's own format (``adapter_model.safetensors`` +
``adapter_config.json``) to ``--model.adapter_dir``, ready for ``PeftModel.from_pretrained(base, dir)``;
with ``--model.merged_dir`` the base with the adapters merged in is also written in Hugging Face layout,
one tensor at a time (see :mod:`lightning_megatrain.peft`).

The base is built from its config without random initialisation and filled straight from the
safetensors shards (memory-mapped) by :func:`lightning_megatrain.checkpoint.load_hf_weights`, before
PEFT wraps it (PEFT renames the wrapped weights). This happens in ``configure_model``: the model only
exists once a fit starts, and a resumed fit (``--ckpt_path``) rebuilds the base the same way before the
checkpoint, which by default holds only the adapters and their optimizer state, is loaded.

Data and tokenization are those of ``examples/finetune_hf.py`` (the model's tokenizer when the directory
has one, else raw bytes). The configs ``examples/configs/lora_llama3_{8b,70b}.yaml`` give the host
memory each model needs (from the memory plan, which the run prints at start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from causal_lm import CausalLMModule  # noqa: E402
from finetune_hf import DTYPE_KWARG, FinetuneCLI, TextDataModule, copy_side_files, load_config, no_init_weights  # noqa: E402

import lightning_megatrain  # noqa: E402,F401  # registers strategy="megatrain" for the CLI
from lightning_megatrain.checkpoint import load_hf_weights  # noqa: E402
from lightning_megatrain.peft import export_adapters, export_merged  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFLoRAFinetune(CausalLMModule):
    """A frozen pretrained HF causal LM with trainable PEFT LoRA adapters, and its causal LM loss.

    Args:
        pretrained_path: a local directory written by ``save_pretrained`` (config.json + safetensors).
        r: LoRA rank.
        alpha: LoRA scaling numerator (``lora_alpha``; the update is scaled by ``alpha / r``).
        dropout: dropout on the adapters' input (``lora_dropout``).
        target_modules: module names (or name suffixes) to adapt, or ``"all-linear"`` (every linear
            layer but the output head).
        base_dtype: the dtype the frozen base is held in (``bfloat16``: 2 bytes per parameter).
        lr: peak learning rate, reached after the warmup.
        weight_decay: AdamW decoupled decay on the adapter matrices.
        warmup_steps: linear warmup length; a cosine decay to 10% of ``lr`` follows.
        adapter_dir: where the adapters are written in PEFT's format when ``fit`` ends (None: not written).
        merged_dir: where the base with the adapters merged in is written in HF layout (None: not written).
    """

    def __init__(
        self,
        pretrained_path: str,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: Union[str, list[str]] = "all-linear",
        base_dtype: str = "bfloat16",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        adapter_dir: Optional[str] = None,
        merged_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if base_dtype not in DTYPES:
            raise ValueError(f"base_dtype must be one of {sorted(DTYPES)}, got {base_dtype!r}")
        if r < 1:
            raise ValueError(f"r (the LoRA rank) must be >= 1, got {r}")
        self.save_hyperparameters()
        load_config(pretrained_path)  # fail at start, not when fit begins, on a directory without config.json
        self.model: Any = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        import peft

        hp = self.hparams
        config = load_config(hp.pretrained_path)
        # Random initialisation skipped: load_hf_weights overwrites every weight (a missing one is an error).
        with torch.device("cpu"), no_init_weights():
            base = AutoModelForCausalLM.from_config(config, **{DTYPE_KWARG: DTYPES[hp.base_dtype]})
        base.tie_weights()  # no_init_weights also skips the tying of tied embeddings
        load_hf_weights(base, hp.pretrained_path)  # memory-mapped shards, one tensor at a time, no fp32 copy
        lora = peft.LoraConfig(
            r=hp.r,
            lora_alpha=hp.alpha,
            lora_dropout=hp.dropout,
            target_modules=hp.target_modules,
            task_type="CAUSAL_LM",
        )
        # the base is frozen and the adapters are fp32 (PEFT casts them up): megatrain stores the base as is
        self.model = peft.get_peft_model(base, lora)

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        hp = self.hparams
        if hp.adapter_dir is not None:
            # from the host memory megatrain trains in (export waits for the last optimizer step)
            out = export_adapters(self, hp.adapter_dir)
            print(f"LoRA adapters exported in PEFT's format to {out}")
        if hp.merged_dir is not None:
            out = export_merged(self, hp.merged_dir)  # one merged tensor in memory at a time
            copy_side_files(Path(hp.pretrained_path), out)
            print(f"base with the adapters merged in exported in Hugging Face layout to {out}")


def main(args: Optional[list[str]] = None, run: bool = True) -> FinetuneCLI:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return FinetuneCLI(  # the fine-tuning CLI: the data module's tokenizer path follows the model's
        HFLoRAFinetune,
        TextDataModule,
        trainer_defaults={
            "strategy": "megatrain",
            "precision": "bf16-mixed",
            "max_steps": 100,
            "log_every_n_steps": 5,
            "accelerator": "auto",
            "devices": 1,
        },
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
