"""The shipped example must keep working: it is the first thing a user runs.

The end-to-end tests run the script in a subprocess, as a user would, so the CLI parsing, the strategy
registration on import and both strategy forms (registered name and class_path) are exercised.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_llama.py"
CONFIG = REPO / "examples" / "configs" / "cpu_tiny.yaml"
CORPUS = REPO / "examples" / "data" / "tiny_corpus.txt"

# A few steps of a ~20K-parameter model: the cost is dominated by importing torch/lightning/transformers.
TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.intermediate_size=64",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--model.num_kv_heads=1",
    "--data.seq_len=32",
    "--data.batch_size=4",
]


def _run(args: list[str], cwd: Path, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the checkout's package, not whatever else may be installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["CUDA_VISIBLE_DEVICES"] = ""  # these tests pin the CPU; keep a present GPU out of the picture
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,  # a hang must fail the test, not the CI job
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}; output:\n{proc.stdout[-6000:]}"
    return proc


def test_config_file_with_class_path_strategy(tmp_path: Path) -> None:
    proc = _run(
        [
            "fit",
            f"--config={CONFIG}",
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=REPO,
    )
    assert "megatrain memory plan" in proc.stdout
    assert "3 streamed layers" in proc.stdout  # num_layers from the config file
    assert "max_steps=3` reached" in proc.stdout


def test_registered_name_from_another_directory(tmp_path: Path) -> None:
    """String form of the strategy; run outside the repo so the default corpus must resolve next to the script."""
    proc = _run(
        [
            "fit",
            "--trainer.strategy=megatrain",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--model.warmup_steps=2",
            *TINY_MODEL,
        ],
        cwd=tmp_path,
    )
    assert "megatrain memory plan" in proc.stdout
    assert "2 streamed layers" in proc.stdout

    (metrics_file,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics_file.open() as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train) == 4 and len(val) == 2, rows
    assert all(math.isfinite(x) for x in train + val)
    # random init over 256 bytes starts near ln(256); a few steps must not blow it up
    assert train[0] < 1.5 * math.log(256)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load("pretrain_llama_example", SCRIPT)


def test_shipped_corpus_is_text() -> None:
    raw = CORPUS.read_bytes()
    assert 60_000 <= len(raw) <= 120_000
    text = raw.decode("utf-8")
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.9


def test_datamodule_split_and_windows(example: ModuleType) -> None:
    dm = example.ByteTextDataModule(seq_len=64, batch_size=8, val_fraction=0.1)
    assert dm.path == CORPUS  # None resolves to the shipped corpus, wherever the process runs
    dm.setup("fit")
    n = len(CORPUS.read_bytes())
    train_bytes, val_bytes = len(dm.train_set.data), len(dm.val_set.data)
    assert train_bytes + val_bytes == n and val_bytes == int(n * 0.1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 64) and batch.dtype == torch.long
    assert int(batch.max()) < example.VOCAB_SIZE
    assert len(next(iter(dm.val_dataloader()))) > 0

    no_val = example.ByteTextDataModule(seq_len=64, val_fraction=0.0)
    no_val.setup("fit")
    assert no_val.val_dataloader() == []


def test_warmup_cosine_schedule(example: ModuleType) -> None:
    f = example.warmup_cosine
    assert [f(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 20) == pytest.approx(1.0)
    assert f(20, 4, 20) == pytest.approx(0.1)
    assert f(100, 4, 20) == pytest.approx(0.1)  # past the end: stays at the floor
    assert f(0, 0, 1) == pytest.approx(1.0)  # no warmup


# ----------------------------------------------------------------------------- GPU-sized configs
BIG_CONFIGS = ["llama_1b", "llama_7b", "llama_14b"]
# The big configs with their sizes cut down and the device pinned to the CPU: everything else (strategy
# class_path and its options, precision key, callbacks, schedule, data keys) comes from the file.
TINY_OVERRIDES = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--model.hidden_size=32",
    "--model.intermediate_size=64",
    "--model.num_layers=2",
    "--model.num_heads=4",
    "--model.num_kv_heads=2",
    "--model.warmup_steps=1",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.parametrize("name", BIG_CONFIGS)
def test_gpu_config_runs_at_tiny_size(example: ModuleType, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (a subprocess per config would cost ~10 s of imports each): parse the real file with tiny
    overrides, check what it asks for, train two steps with a checkpoint each step, then resume one more."""
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_megatrain import MegaTrainStrategy

    config = REPO / "examples" / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(config.read_text())
    assert raw["trainer"]["accelerator"] == "cuda" and raw["trainer"]["precision"] == "bf16-mixed"
    assert raw["data"]["seq_len"] * raw["data"]["batch_size"] * raw["trainer"].get("accumulate_grad_batches", 1) >= 16384
    header = config.read_text().split("seed_everything")[0]
    assert "parameters" in header and "Host RAM" in header

    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])  # pytest's own arguments are not the CLI's

    def cli(root: Path, *extra: str):  # type: ignore[no-untyped-def]
        return example.main([f"--config={config}", *TINY_OVERRIDES, f"--trainer.default_root_dir={root}", *extra], run=False)

    first = cli(tmp_path, "--trainer.max_steps=2")
    strategy = first.trainer.strategy
    assert isinstance(strategy, MegaTrainStrategy)
    assert strategy.config.prefetch == 2 and strategy.async_checkpoint and strategy.checkpoint_format == "sharded"
    (checkpoint_cb,) = [c for c in first.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint_cb._every_n_train_steps >= 100  # the file's interval; shortened below to exercise it
    checkpoint_cb._every_n_train_steps = 1
    assert first.model.hparams.max_position_embeddings == 32  # linked to data.seq_len
    first.trainer.fit(first.model, first.datamodule)
    assert first.trainer.global_step == 2

    saved = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step0000002.ckpt"], saved  # save_top_k=1: the step-1 one was removed
    assert (saved[0] / "megatrain.json").is_file()  # sharded, written asynchronously

    resumed = cli(tmp_path / "resumed", "--trainer.max_steps=3")
    for cb in resumed.trainer.checkpoint_callbacks:
        cb._every_n_train_steps = 1  # as when the checkpoint was written (Lightning matches callback states)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(saved[0]))
    assert resumed.trainer.global_step == 3


# ----------------------------------------------------------------------------- fine-tuning an HF model
FINETUNE = REPO / "examples" / "finetune_hf.py"


@pytest.fixture(scope="module")
def finetune_example() -> ModuleType:
    return _load("finetune_hf_example", FINETUNE)


def _tiny_hf_dir(path: Path, vocab_size: int = 256, tie: bool = True) -> "torch.nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_finetune_hf_trains_and_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = _tiny_hf_dir(tmp_path / "base")  # tied embeddings: the file holds no lm_head.weight
    export = tmp_path / "export"
    proc = _run(
        [
            "fit",
            f"--model.pretrained_path={tmp_path / 'base'}",
            f"--model.export_dir={export}",
            "--model.lr=0.01",
            "--model.warmup_steps=1",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.seq_len=32",
            "--data.batch_size=4",
        ],
        cwd=tmp_path,
        script=FINETUNE,
    )
    assert "megatrain memory plan" in proc.stdout and "2 streamed layers" in proc.stdout
    assert "max_steps=3` reached" in proc.stdout

    tuned = AutoModelForCausalLM.from_pretrained(export)
    assert tuned.config.tie_word_embeddings and tuned.lm_head.weight is tuned.model.embed_tokens.weight
    before, after = base.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.isfinite(t).all() for t in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed, changed
    # it started from the pretrained weights, not from a fresh initialisation: 3 small steps stay close
    delta = (after["model.layers.0.self_attn.q_proj.weight"] - before["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    assert 0 < delta < 0.1


def test_finetune_data_byte_fallback_and_tokenizer(finetune_example: ModuleType, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = CORPUS.read_text(encoding="utf-8")

    # no tokenizer, vocab >= 256: bytes
    _tiny_hf_dir(tmp_path / "bytes")
    dm = finetune_example.TextDataModule(tokenizer_path=str(tmp_path / "bytes"), seq_len=16, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set.data) + len(dm.val_set.data) == len(text.encode("utf-8"))

    # no tokenizer, vocab < 256: refused, with the reason
    _tiny_hf_dir(tmp_path / "small", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        finetune_example.TextDataModule(tokenizer_path=str(tmp_path / "small"), seq_len=16).setup("fit")
    # longer windows than the model's positions: refused
    with pytest.raises(ValueError, match="max_position_embeddings"):
        finetune_example.TextDataModule(tokenizer_path=str(tmp_path / "bytes"), seq_len=65).setup("fit")

    # a tokenizer in the directory is used
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text.splitlines()[:200], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    _tiny_hf_dir(tmp_path / "tok", vocab_size=200)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    assert finetune_example.has_tokenizer(tmp_path / "tok")
    dm = finetune_example.TextDataModule(tokenizer_path=str(tmp_path / "tok"), seq_len=16, batch_size=2)
    dm.setup("fit")
    n_tokens = len(dm.train_set.data) + len(dm.val_set.data)
    assert 0 < n_tokens < len(text) // 2  # words, not bytes
    assert int(dm.train_set.data.max()) < 200
    assert next(iter(dm.train_dataloader())).shape == (2, 16)


class FirstSteps(pl.Callback):
    """The batches and losses of a fit, and the parameters it starts from."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        torch.manual_seed(7)  # the same shuffle on both sides, whatever building the model drew

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(batch.detach().clone())
        self.losses.append(float(outputs["loss"]))


FINETUNE_ARGS = [
    "--model.lr=0.01",
    "--model.warmup_steps=1",
    "--trainer.accelerator=cpu",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_checkpointing=false",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.seq_len=16",
    "--data.batch_size=2",
]


def _finetune(example: ModuleType, base: Path, root: Path, *extra: str, steps: int = 2) -> Any:
    """The example's CLI, in-process and not run yet, with a recording callback attached."""
    cli = example.main([f"--model.pretrained_path={base}", *FINETUNE_ARGS, f"--trainer.default_root_dir={root}",
                        f"--trainer.max_steps={steps}", *extra], run=False)
    cli.recorder = FirstSteps()
    cli.trainer.callbacks.append(cli.recorder)
    return cli


def test_finetune_megatrain_builds_on_meta_and_starts_as_from_pretrained(
    finetune_example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """megatrain: the model is built on the meta device and filled by the strategy (``weights=`` set to
    the model's directory by the CLI), never by ``from_pretrained``; it starts from the same weights and
    has the same first loss as another strategy that loads the model with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from lightning_megatrain import MegaTrainStrategy

    monkeypatch.setattr(sys, "argv", [str(FINETUNE)])
    base_model = _tiny_hf_dir(tmp_path / "base", tie=False)
    base = tmp_path / "base"

    plain = _finetune(finetune_example, base, tmp_path / "plain", "--trainer.strategy=auto", steps=1)
    assert not isinstance(plain.trainer.strategy, MegaTrainStrategy)
    plain.trainer.fit(plain.model, plain.datamodule)

    mega = _finetune(finetune_example, base, tmp_path / "mega", steps=1)
    assert isinstance(mega.trainer.strategy, MegaTrainStrategy) and mega.trainer.strategy.weights == str(base)
    built: dict[str, bool] = {}
    configure = mega.model.configure_model

    def spy() -> None:
        configure()
        built["meta"] = all(p.is_meta for p in mega.model.parameters())

    mega.model.configure_model = spy
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("megatrain called from_pretrained"))
        mega.trainer.fit(mega.model, mega.datamodule)
    assert built == {"meta": True}
    assert mega.model._megatrain_weights_source == str(base.resolve())  # filled by the strategy from the files

    want = {k: v.detach() for k, v in base_model.named_parameters()}
    for side in (plain, mega):
        assert side.recorder.start.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(side.recorder.start[k], v), k
    assert torch.equal(mega.recorder.batches[0], plain.recorder.batches[0])
    assert mega.recorder.losses[0] == pytest.approx(plain.recorder.losses[0], rel=1e-6, abs=0)


def test_finetune_strategy_options_from_the_command_line(finetune_example: ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The class_path form takes megatrain's options (the docs' 70B line); weights given there are kept."""
    from lightning_megatrain import MegaTrainStrategy

    monkeypatch.setattr(sys, "argv", [str(FINETUNE)])
    _tiny_hf_dir(tmp_path / "base")
    base = tmp_path / "base"
    options = ["--trainer.strategy=lightning_megatrain.MegaTrainStrategy", "--trainer.strategy.host_memory=lean"]
    cli = _finetune(finetune_example, base, tmp_path, *options)
    assert isinstance(cli.trainer.strategy, MegaTrainStrategy)
    assert cli.trainer.strategy.host_memory == "lean" and cli.trainer.strategy.weights == str(base)
    other = str(tmp_path / "elsewhere")
    cli = _finetune(finetune_example, base, tmp_path, *options, f"--trainer.strategy.weights={other}")
    assert str(cli.trainer.strategy.weights) == other


def test_finetune_loads_fp32_and_resume_keeps_trained_weights(
    finetune_example: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: a bf16 checkpoint becomes fp32 host weights, exactly; a resumed fit ends with the
    checkpoint's weights, not the pretrained ones that the strategy fills in first."""
    monkeypatch.setattr(sys, "argv", [str(FINETUNE)])
    base = _tiny_hf_dir(tmp_path / "base", tie=False).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    first = _finetune(finetune_example, tmp_path / "base", tmp_path)
    first.trainer.fit(first.model, first.datamodule)
    start = first.recorder.start
    assert start.keys() == dict(base.named_parameters()).keys()
    for k, v in base.named_parameters():
        assert start[k].dtype == torch.float32 and torch.equal(start[k], v.detach().float()), k  # bf16 -> fp32 exactly
    ckpt = tmp_path / "two_steps.ckpt"
    first.trainer.save_checkpoint(ckpt)
    trained = {k: v.clone() for k, v in first.model.model.state_dict().items()}
    for k, v in base.state_dict().items():
        assert not torch.equal(trained[k].to(torch.bfloat16), v) or trained[k].ndim < 2, k

    resumed = _finetune(finetune_example, tmp_path / "base", tmp_path)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(ckpt))  # max_steps reached: no step
    assert resumed.trainer.global_step == 2
    after = resumed.model.model.state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained)
