"""Fine-tune a Hugging Face causal LM from a local directory with ``strategy="megatrain"``.

The directory is what ``save_pretrained`` writes: ``config.json`` and safetensors weights (one file or a
sharded index), optionally a tokenizer. Nothing is downloaded:

    python examples/finetune_hf.py fit --model.pretrained_path=/models/llama-7b            # shipped corpus
    python examples/finetune_hf.py fit --model.pretrained_path=/models/llama-7b \\
        --data.path=my_text.txt --data.seq_len=2048 --data.batch_size=4 \\
        --trainer.precision=bf16-mixed --trainer.max_steps=500 --model.export_dir=out/llama-7b-ft
    python examples/finetune_hf.py fit --print_config                                       # every option

With ``strategy="megatrain"`` (the default) the model is built from its config on the meta device, so
nothing is allocated, and the strategy is given ``weights=<pretrained_path>`` (unless you passed
``--trainer.strategy.weights`` yourself): at setup each layer is made in its host arena and filled from
the memory-mapped safetensors files, one tensor at a time (bf16 files become fp32 masters exactly). The
model never exists whole anywhere else, and never touches the GPU as a whole: megatrain keeps it in
host memory and streams its layers. Any other strategy gets the model from ``from_pretrained`` in fp32
on the CPU, as plain Lightning would. With ``--model.export_dir`` the fine-tuned weights are written in
Hugging Face layout at the end of ``fit`` (with the config and, if the source had one, the tokenizer),
ready for ``from_pretrained``. Big models (Llama-3-70B, 120B): ``docs/big-models.md``.

Tokenization: with the model's tokenizer when the directory has one (``tokenizer.json``,
``tokenizer_config.json`` or ``tokenizer.model``). Without one the text is fed as raw UTF-8 bytes, token
id = byte value, which needs ``vocab_size >= 256`` (checked, with an error otherwise). This byte-level
fallback is meant for models trained on bytes and for tests; for a model with a real vocabulary the
byte ids are meaningless tokens, so ship its tokenizer in the directory.

Resuming an interrupted fine-tune: ``fit --ckpt_path=<checkpoint>`` restores the trained weights over
the pretrained ones (the checkpoint is loaded after the pretrained weights are in place).
"""

from __future__ import annotations

import sys
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from packaging.version import Version
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from causal_lm import CausalLMModule, TextWindowsDataModule, warmup_cosine  # noqa: E402,F401  (shared by the examples)

import lightning_megatrain  # noqa: E402,F401  # registers strategy="megatrain" for the CLI
from lightning_megatrain import MegaTrainStrategy  # noqa: E402
from lightning_megatrain.checkpoint import export_hf  # noqa: E402

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights  # noqa: F401  (imported from here by finetune_lora)

# from_config's dtype argument: "torch_dtype" before transformers 4.56
DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Files of the source directory that describe the model but are not weights: copied along on export.
EXTRA_FILES = ("generation_config.json",)


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_config(pretrained_path: str | Path) -> Any:
    path = Path(pretrained_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a directory written by save_pretrained")
    return AutoConfig.from_pretrained(path)


class TextDataModule(TextWindowsDataModule):
    """A UTF-8 text file as tokens, split into a train head and a validation tail.

    Args:
        path: the text file; ``None`` means the corpus shipped with the examples.
        tokenizer_path: where to look for a tokenizer and the model config; linked to
            ``model.pretrained_path`` by the CLI.
        seq_len: tokens per window (at most the model's ``max_position_embeddings``).
        batch_size: windows per batch.
        val_fraction: share of the tokens, from the end, held out for validation.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        num_workers: int = 0,
    ) -> None:
        super().__init__(path, seq_len, batch_size, val_fraction, num_workers)
        self.save_hyperparameters()

    def tokenize(self, text: str) -> Tensor:
        """The text as a 1-D tensor of token ids: the model's tokenizer, else bytes (see the module docstring)."""
        directory = self.hparams.tokenizer_path
        config = load_config(directory) if directory is not None else None
        vocab_size = getattr(config, "vocab_size", None) if config is not None else None
        max_positions = getattr(config, "max_position_embeddings", None) if config is not None else None
        if max_positions is not None and self.seq_len > max_positions:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's max_position_embeddings={max_positions}")
        if directory is not None and has_tokenizer(directory):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
            ids: list[int] = []
            # line blocks: bounded memory per call, and no "sequence longer than the model" warning
            lines = text.splitlines(keepends=True)
            for i in range(0, len(lines), 1000):
                ids += tokenizer("".join(lines[i : i + 1000]), add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.int32)  # windows are cast to int64 one at a time
        if vocab_size is not None and vocab_size < 256:
            raise ValueError(
                f"{directory} has no tokenizer, and the byte-level fallback needs vocab_size >= 256 "
                f"(one id per byte value), but the model has vocab_size={vocab_size}. Add the model's tokenizer "
                "to the directory (tokenizer.save_pretrained)."
            )
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class HFCausalLMFinetune(CausalLMModule):
    """A pretrained HF causal LM and its causal LM loss.

    Args:
        pretrained_path: a local directory written by ``save_pretrained`` (config.json + safetensors).
        lr: peak learning rate, reached after the warmup.
        weight_decay: AdamW decoupled decay, applied to matrices only (not norms or biases).
        warmup_steps: linear warmup length; a cosine decay to 10% of ``lr`` follows.
        export_dir: if given, the fine-tuned weights are written there in HF layout when ``fit`` ends.
    """

    def __init__(
        self,
        pretrained_path: str,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        export_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        load_config(pretrained_path)  # fail at start, not when fit begins, on a directory without config.json
        self.model: Any = None  # built in configure_model, where the strategy is known

    def configure_model(self) -> None:
        # Before megatrain's setup and before a ckpt_path restore, so a resumed run keeps its trained weights.
        if self.model is not None:
            return
        path = self.hparams.pretrained_path
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, MegaTrainStrategy) and strategy.weights is not None:
            # Nothing allocated: megatrain makes each layer in its host arena and fills it from `weights`.
            # fp32 whatever dtype config.json names: the host holds fp32 masters, the precision flag picks
            # the compute dtype.
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(load_config(path), **{DTYPE_KWARG: torch.float32})
        else:  # any other strategy: the whole model in fp32 on the CPU, as plain Lightning would load it
            # (from_pretrained returns eval mode; Lightning trains the modes it finds)
            self.model = AutoModelForCausalLM.from_pretrained(path, **{DTYPE_KWARG: torch.float32}).train()

    def on_train_end(self) -> None:
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir)
        # straight from the host memory megatrain trains in (state_dict waits for the last optimizer step)
        export_hf(self, out)
        copy_side_files(Path(self.hparams.pretrained_path), out)
        print(f"fine-tuned weights exported in Hugging Face layout to {out}")


def copy_side_files(source: Path, out: Path) -> None:
    """What an exported HF directory needs beside its weights: the extra files and the tokenizer."""
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    if has_tokenizer(source):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(out)


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module finds the tokenizer (and checks vocab_size / positions) in the model's directory.
        parser.link_arguments("model.pretrained_path", "data.tokenizer_path")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # megatrain reads the weights itself, into the arenas of the meta-built model: point it at the model's
        # directory, unless --trainer.strategy.weights names other files (a megatrain checkpoint, say)
        strategy = self.trainer.strategy
        if isinstance(self.model, HFCausalLMFinetune) and isinstance(strategy, MegaTrainStrategy) and strategy.weights is None:
            strategy.weights = self.model.hparams.pretrained_path


def main(args: Optional[list[str]] = None, run: bool = True) -> FinetuneCLI:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return FinetuneCLI(
        HFCausalLMFinetune,
        TextDataModule,
        trainer_defaults={
            "strategy": "megatrain",
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
