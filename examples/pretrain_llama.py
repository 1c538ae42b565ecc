"""Pre-train a small Llama-style model from scratch with ``strategy="megatrain"``.

Byte-level (vocab 256), random init, no hub access and no tokenizer download, so it runs anywhere:

    python examples/pretrain_llama.py fit                                   # GPU if present, else CPU
    python examples/pretrain_llama.py fit --config examples/configs/cpu_tiny.yaml
    python examples/pretrain_llama.py fit --model.num_layers=8 --trainer.precision=bf16-mixed
    python examples/pretrain_llama.py fit --print_config                    # every option, as YAML

GPU-sized configs (bf16, one GPU, the model in host memory): examples/configs/llama_1b.yaml, llama_7b.yaml and
llama_14b.yaml; their headers give the parameter count and the host RAM each needs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from causal_lm import CausalLMModule, TextWindowsDataModule, warmup_cosine  # noqa: E402,F401  (shared by the examples)

import lightning_megatrain  # noqa: E402,F401  # registers strategy="megatrain" for the CLI

VOCAB_SIZE = 256  # one token per byte: no tokenizer to download or train


class ByteTextDataModule(TextWindowsDataModule):
    """A UTF-8 text file as byte tokens, split into a train head and a validation tail.

    Args:
        path: the text file; ``None`` means the corpus shipped next to this script (so the default works
            from any working directory).
        seq_len: tokens (bytes) per window.
        batch_size: windows per batch.
        val_fraction: share of the file, taken from its end, held out for validation. A contiguous tail
            rather than random windows, so no training window overlaps a validation one.
        num_workers: DataLoader workers; slicing a tensor is cheap, so 0 is usually fastest.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
    ) -> None:
        super().__init__(path, seq_len, batch_size, val_fraction, num_workers)
        self.save_hyperparameters()


class LlamaPretrainModule(CausalLMModule):
    """A randomly initialised ``LlamaForCausalLM`` and its causal LM loss.

    Built in ``__init__`` on purpose: under megatrain the weights live in host memory anyway, so there is
    no device-side init to defer, and checkpoints reload without a ``configure_model`` step.

    Args:
        hidden_size: model width.
        intermediate_size: SwiGLU MLP width.
        num_layers: decoder layers; these are what megatrain streams to the device one at a time.
        num_heads: attention heads (must divide ``hidden_size``).
        num_kv_heads: key/value heads; fewer than ``num_heads`` gives grouped-query attention.
        max_position_embeddings: longest sequence; linked to ``data.seq_len`` by the CLI.
        lr: peak learning rate, reached after the warmup.
        weight_decay: AdamW decoupled decay, applied to matrices only (not norms or biases).
        warmup_steps: linear warmup length; a cosine decay to 10% of ``lr`` follows.
        tie_word_embeddings: share the input embedding with the output projection.
    """

    def __init__(
        self,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        max_position_embeddings: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 5,
        tie_word_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must divide hidden_size ({hidden_size}) "
                f"and be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            use_cache=False,  # training only: a KV cache would just hold memory
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        self.model = LlamaForCausalLM(config)


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth for the context length: the model's positions follow the data's windows.
        parser.link_arguments("data.seq_len", "model.max_position_embeddings")


def main(args: Optional[list[str]] = None, run: bool = True) -> PretrainCLI:
    """Parse ``args`` (default: the command line) and, with ``run=True``, run the subcommand.

    ``run=False`` parses without a subcommand and returns the CLI with ``cli.trainer``, ``cli.model`` and
    ``cli.datamodule`` built, e.g. to check a config file: ``main(["--config", "llama_7b.yaml"], run=False)``.
    """
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 path; no effect on CPU
    return PretrainCLI(
        LlamaPretrainModule,
        ByteTextDataModule,
        trainer_defaults={
            "strategy": "megatrain",
            "max_steps": 20,
            "log_every_n_steps": 5,
            "accelerator": "auto",
            "devices": 1,
        },
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},  # re-running in the same directory must not fail
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
