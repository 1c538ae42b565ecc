"""Models built on the meta device materialised in the host arenas, and ``MegaTrainStrategy(weights=...)``
(issue 24 points 1 and 2): the same training as plain Lightning loading the same files with
``from_pretrained``; initialisation by the modules when no weights are given; errors before anything
is allocated (mismatched names and shapes, damaged files, meta tensors nothing initialises)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from torch import nn

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine.materialize import MaterializeError
from lightning_megatrain.weights import WeightsError
from models import VOCAB, BlockLM, Recorder, assert_same_training, data, trainer

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402 - a dependency of transformers too
from safetensors.torch import save_file  # noqa: E402


def llama_config(tied: bool = False, layers: int = 3) -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, attention_dropout=0.1,
    )


def save_llama(path: Path, tied: bool = False, dtype: torch.dtype = torch.float32, **kw: Any) -> Path:
    torch.manual_seed(123)
    model = transformers.LlamaForCausalLM(llama_config(tied)).to(dtype)
    model.save_pretrained(path, **kw)
    return path


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


class HFModule(Recorder):
    """An HF Llama inside a LightningModule: from the files (``from_pretrained``, plain Lightning) or
    built on the meta device in ``configure_model`` (megatrain, ``weights=``)."""

    def __init__(self, source: Optional[Path] = None, tied: bool = False, attr: str = "model") -> None:
        super().__init__()
        self.source, self.tied, self.attr, self.sched = source, tied, attr, False

    @property
    def hf(self) -> nn.Module:
        return getattr(self, self.attr)

    def configure_model(self) -> None:
        if hasattr(self, self.attr):
            return
        if self.source is not None:
            model = transformers.LlamaForCausalLM.from_pretrained(self.source, dtype=torch.float32).train()
        else:
            with torch.device("meta"):
                model = transformers.LlamaForCausalLM(llama_config(self.tied))
        setattr(self, self.attr, model)

    def on_train_start(self) -> None:
        torch.manual_seed(7)  # the same dropout streams on both sides, whatever building the model drew

    def loss(self, batch: Any) -> torch.Tensor:
        return self.hf(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> Any:
        # the same implementation on both sides (megatrain with fused_optimizer=False keeps it)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, fused=False, foreach=False)


def strategy(path: Any, **kw: Any) -> MegaTrainStrategy:
    return MegaTrainStrategy(weights=path, fused_optimizer=False, **kw)


def fit(model: L.LightningModule, strat: Any = "auto", steps: int = 6) -> L.LightningModule:
    trainer(strat, fused=False, max_steps=steps).fit(model, data())
    return model


@pytest.mark.parametrize("host_memory", ["fast", "compact"])
def test_meta_llama_from_weights_trains_as_plain_lightning_from_pretrained(tmp_path: Path, host_memory: str) -> None:
    hf = save_llama(tmp_path / "hf")
    plain = fit(HFModule(source=hf))
    mega = fit(HFModule(), strategy(hf, host_memory=host_memory))
    assert not any(p.is_meta for p in mega.parameters()) and not any(b.is_meta for b in mega.buffers())
    assert_same_training(plain, mega)


def test_lean_from_weights_has_the_same_first_loss(tmp_path: Path) -> None:
    """lean holds optimizer state in bf16 (later steps differ by design); the loaded weights are the same."""
    hf = save_llama(tmp_path / "hf")
    plain = fit(HFModule(source=hf), steps=2)
    mega = fit(HFModule(), strategy(hf, host_memory="lean"), steps=2)
    assert mega.losses[0] == plain.losses[0]


def test_tied_embeddings_load_from_files_without_the_head(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", tied=True)
    assert "lm_head.weight" not in file_tensors(hf)  # HF drops the tied copy
    plain = fit(HFModule(source=hf), steps=3)
    mega = fit(HFModule(tied=True), strategy(hf), steps=3)
    assert mega.model.lm_head.weight is mega.model.model.embed_tokens.weight
    assert_same_training(plain, mega)


class Start(L.Callback):
    """The module's tensors when training starts (after setup filled them)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}


def start_of(model: L.LightningModule, strat: Any) -> Start:
    start = Start()
    trainer(strat, fused=False, max_steps=1, callbacks=[start]).fit(model, data())
    return start


def test_bf16_files_fill_fp32_masters_exactly(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", dtype=torch.bfloat16)
    files = file_tensors(hf)
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    start = start_of(HFModule(), strategy(hf))
    for name, value in files.items():
        got = start.params[f"model.{name}"]
        assert got.dtype == torch.float32
        assert torch.equal(got, value.float()), name


def test_a_sharded_save_pretrained_directory(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    files = file_tensors(hf)
    start = start_of(HFModule(), strategy(hf))
    assert files.keys() == {n[len("model.") :] for n in start.params}
    for name, value in files.items():
        assert torch.equal(start.params[f"model.{name}"], value), name


def test_a_single_safetensors_file_and_weights_prefix(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf")
    files = file_tensors(hf)
    for prefix in ("net.", "net", None):  # given with or without the dot, or found
        start = start_of(HFModule(attr="net"), strategy(hf / "model.safetensors", weights_prefix=prefix))
        for name, value in files.items():
            assert torch.equal(start.params[f"net.{name}"], value), (prefix, name)
    with pytest.raises(WeightsError, match=r"prefix 'model\.'.*missing from the files"):
        start_of(HFModule(attr="net"), strategy(hf, weights_prefix="model."))


def test_a_megatrain_sharded_checkpoint_as_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = BlockLM()
    strat = MegaTrainStrategy(fused_optimizer=False)
    t = trainer(strat, max_steps=2, default_root_dir=tmp_path)
    t.fit(trained, data())
    t.save_checkpoint(tmp_path / "ckpt")
    with torch.device("meta"):
        fresh = BlockLM()
    start = start_of(fresh, strategy(tmp_path / "ckpt"))
    for name, value in trained.named_parameters():
        assert torch.equal(start.params[name], value.detach()), name


def test_mismatched_files_are_one_error_before_anything_is_allocated(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf")
    tensors = file_tensors(hf)
    del tensors["model.norm.weight"]  # missing
    tensors["model.extra.weight"] = torch.zeros(3)  # unexpected
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 31)  # wrong shape
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    strat = strategy(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        start_of(HFModule(), strat)
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "1 missing from the files: model.norm.weight (module model.model.norm.weight)" in msg
    assert "1 in the files but not in the module: model.extra.weight" in msg
    assert "1 with another shape: model.layers.1.mlp.up_proj.weight (file [64, 31], module [64, 32])" in msg
    assert strat.runtime is None and strat.memory_plan is None  # refused before the plan and any arena


def test_many_missing_names_are_counted(tmp_path: Path) -> None:
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"\d+ missing from the files: .* \.\.\. \(\d+ more\); 1 in the files but not"):
        start_of(HFModule(), strategy(tmp_path / "w.safetensors"))


def test_a_truncated_file_names_the_file(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", max_shard_size="20KB")
    shard = sorted(hf.glob("*.safetensors"))[1]
    data_ = shard.read_bytes()
    shard.write_bytes(data_[: len(data_) // 2])
    with pytest.raises(WeightsError, match=f"{shard.name}.*(damaged|truncated)"):
        start_of(HFModule(), strategy(hf))
    (hf / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightsError, match="model.safetensors.index.json"):
        start_of(HFModule(), strategy(hf))


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file or directory"):
        start_of(HFModule(), strategy(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no .safetensors file"):
        start_of(HFModule(), strategy(tmp_path / "empty"))



class BuiltModule(HFModule):
    """The HF model built whole on the CPU (randomly initialised) in ``__init__``, or under ``init_module``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = transformers.LlamaForCausalLM(llama_config())


def test_weights_overwrite_a_model_built_on_the_cpu_and_load_once(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf")
    files = file_tensors(hf)
    torch.manual_seed(99)
    model = BuiltModule()
    assert not torch.equal(model.model.lm_head.weight.detach(), files["lm_head.weight"])
    start = start_of(model, strategy(hf))
    for name, value in files.items():
        assert torch.equal(start.params[f"model.{name}"], value), name
    # a later run of the same (trained) module with the same weights does not reset it
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(trained["model.lm_head.weight"], files["lm_head.weight"])
    trainer(strategy(hf), max_steps=1).validate(model, data())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name


def test_init_module_empty_init_with_weights(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf")
    strat = strategy(hf)
    t = trainer(strat, max_steps=1)
    with t.init_module(empty_init=True):
        model = BuiltModule()
    assert all(p.is_meta for p in model.parameters())
    start = Start()
    t.callbacks.append(start)
    t.fit(model, data())
    for name, value in file_tensors(hf).items():
        assert torch.equal(start.params[f"model.{name}"], value), name


# ---------------------------------------------------------------------- no weights: the modules' own init
class InitLM(BlockLM):
    def reset_parameters(self) -> None:  # the raw parameter: what nothing else initialises
        nn.init.ones_(self.gain)


def test_empty_init_is_honoured_and_each_module_initialises_itself() -> None:
    t = trainer(MegaTrainStrategy(fused_optimizer=False), max_steps=2)
    with t.init_module(empty_init=True):
        model = InitLM()
    assert all(p.is_meta for p in model.parameters())
    t.fit(model, data())
    assert not any(p.is_meta for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert len(model.losses) == 2 and all(torch.isfinite(torch.tensor(model.losses)))
    # reset_parameters ran: LayerNorm weights start at one, Linear weights are not all equal
    with torch.device("meta"):
        fresh = InitLM()
    start = start_of(fresh, MegaTrainStrategy(fused_optimizer=False))
    assert torch.equal(start.params["blocks.0.ln.weight"], torch.ones(16)) and start.params["gain"].item() == 1.0
    assert start.params["blocks.0.fc.weight"].std() > 0


def test_without_empty_init_the_model_is_built_on_the_cpu() -> None:
    with trainer(MegaTrainStrategy()).init_module(empty_init=False):
        model = BlockLM()
    assert not any(p.is_meta for p in model.parameters())


def test_a_meta_parameter_nothing_initialises_is_named_before_allocation() -> None:
    with torch.device("meta"):
        model = BlockLM()  # its raw parameter ``gain`` has no initialiser
    strat = MegaTrainStrategy()
    with pytest.raises(MaterializeError, match=r"gain \(BlockLM\)"):
        trainer(strat, max_steps=1).fit(model, data())
    assert strat.runtime is None


class HalfInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(4))
        self.b = nn.Parameter(torch.empty(4))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.a)  # forgets b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a + self.b


def test_a_parameter_its_initialiser_leaves_unset_is_named() -> None:
    class M(BlockLM):
        def __init__(self) -> None:
            super().__init__()
            self.half = HalfInit()

        def reset_parameters(self) -> None:
            nn.init.ones_(self.gain)

    with torch.device("meta"):
        model = M()
    with pytest.raises(MaterializeError, match=r"not initialised.*half\.b"):
        trainer(MegaTrainStrategy(), max_steps=1).fit(model, data())


def _count_inits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every initialiser that runs on real (not meta) parameters: HF's ``_init_weights``, the
    modules' ``reset_parameters`` and torch's random inits."""
    calls: list[str] = []

    def counted(name: str, fn: Any, real: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            if real(*args, *kw.values()):
                calls.append(name)
            return fn(*args, **kw)
        return wrapper

    def module_real(*args: Any) -> bool:
        m = args[-1]  # _init_weights(self, module), reset_parameters(self)
        return any(not p.is_meta for p in m.parameters(recurse=False))

    hf = transformers.LlamaForCausalLM
    monkeypatch.setattr(hf, "_init_weights", counted("_init_weights", hf._init_weights, module_real))
    for cls in (nn.Linear, nn.Embedding, transformers.models.llama.modeling_llama.LlamaRMSNorm):
        if hasattr(cls, "reset_parameters"):
            monkeypatch.setattr(cls, "reset_parameters", counted(f"{cls.__name__}.reset_parameters", cls.reset_parameters, module_real))
    for fn in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_"):
        monkeypatch.setattr(nn.init, fn, counted(f"init.{fn}", getattr(nn.init, fn), lambda *a: not next(t for t in a if torch.is_tensor(t)).is_meta))
    return calls


def test_no_initialiser_runs_when_weights_fill_every_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setup from files spends no time on random init: the arenas are written once, from the files."""
    hf = save_llama(tmp_path / "hf")
    model = HFModule()
    model.configure_model()  # built on the meta device (HF's post_init runs there, on no memory)
    calls = _count_inits(monkeypatch)
    start = start_of(model, strategy(hf))
    assert calls == []
    for name, value in file_tensors(hf).items():
        assert torch.equal(start.params[f"model.{name}"], value), name
    # the counter sees initialisers that do run: the same model without weights is initialised
    fresh = HFModule()
    fresh.configure_model()
    start_of(fresh, MegaTrainStrategy(fused_optimizer=False))
    assert "_init_weights" in calls


def test_a_meta_hf_model_without_weights_runs_init_weights() -> None:
    start = start_of(HFModule(), MegaTrainStrategy(fused_optimizer=False))
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(llama_config())
    for name, p in reference.named_parameters():
        got = start.params[f"model.{name}"]
        assert bool(torch.isfinite(got).all()), name
        if "norm" in name:
            assert torch.equal(got, torch.ones_like(got)), name  # _init_weights: RMSNorm weights are one
        else:  # _init_weights: normal(0, initializer_range)
            assert abs(got.std().item() - reference.config.initializer_range) < 0.005, name
    inv_freq = reference.model.rotary_emb.inv_freq
    assert torch.equal(start.buffers["model.model.rotary_emb.inv_freq"], inv_freq)  # a meta buffer, computed


# ---------------------------------------------------------------------- LoRA: the base from the files
class LoraModule(HFModule):
    """A frozen bf16 base built on the meta device, PEFT adapters around it."""

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        peft = pytest.importorskip("peft")
        if self.source is not None:
            base = transformers.LlamaForCausalLM.from_pretrained(self.source, dtype=torch.bfloat16).train()
        else:
            with torch.device("meta"):
                # as from_pretrained builds it: bf16 weights, the rotary buffers in fp32
                base = transformers.LlamaForCausalLM._from_config(llama_config(), dtype=torch.bfloat16)
        self.model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2, fused=False, foreach=False)


def test_lora_base_from_weights_adapters_from_peft(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", dtype=torch.bfloat16)
    files = file_tensors(hf)
    model = LoraModule()
    model.configure_model()
    assert all(p.is_meta for p in model.parameters())  # PEFT made its adapters on the base's (meta) device
    start = start_of(model, strategy(hf))
    base = {n: v for n, v in start.params.items() if "lora_" not in n}
    assert len(base) == len(files)
    for name, value in base.items():
        key = name.replace("model.base_model.model.", "").replace(".base_layer", "")
        assert value.dtype == torch.bfloat16 and torch.equal(value, files[key]), name  # stored as on disk
    lora_b = [v for n, v in start.params.items() if "lora_B" in n]
    lora_a = [v for n, v in start.params.items() if "lora_A" in n]
    assert lora_b and all(torch.equal(v, torch.zeros_like(v)) for v in lora_b)  # PEFT's init: B = 0
    assert lora_a and all(v.dtype == torch.float32 and v.std() > 0 for v in lora_a)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # B = 0: the first loss is the base model's, as plain Lightning loading the files computes it
    plain = fit(LoraModule(source=hf), steps=1)
    assert model.losses[0] == plain.losses[0]


# ---------------------------------------------------------------------- data parallel
def test_data_parallel_weights_train_as_ddp_from_pretrained(tmp_path: Path) -> None:
    """devices=2: the node's first rank fills the node-shared arenas from the files, every rank its buffers;
    the training is DDP's loading the same files (tolerance as tests/test_distributed.py: another
    summation order of the gradients)."""
    import os
    import subprocess
    import sys

    hf = save_llama(tmp_path / "hf")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    worker = Path(__file__).resolve().parent / "weights_dp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(hf), str(tmp_path), "2"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        mega, ddp = res["megatrain"], res["ddp"]
        assert len(mega["losses"]) == 3
        torch.testing.assert_close(torch.tensor(mega["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-5)
        for name, value in ddp["params"].items():
            torch.testing.assert_close(mega["params"][name], value, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_lora_resume_takes_the_base_from_weights_and_the_adapters_from_the_checkpoint(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf", dtype=torch.bfloat16)
    first = LoraModule()
    t = trainer(strategy(hf), max_steps=2, default_root_dir=tmp_path)
    t.fit(first, data())
    t.save_checkpoint(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    saved = [n for n in index["weight_map"] if n.startswith("model.")]
    assert saved and all("lora_" in n for n in saved)  # checkpoint_frozen=None: adapters only (most is frozen)
    resumed = LoraModule()
    start = Start()
    trainer(strategy(hf), max_steps=3, callbacks=[start]).fit(resumed, data(), ckpt_path=tmp_path / "ckpt")
    want = {n: p.detach() for n, p in first.named_parameters()}
    for name, value in start.params.items():
        assert torch.equal(value, want[name]), name  # base from the files, adapters as trained


def test_validate_a_meta_model_from_weights(tmp_path: Path) -> None:
    hf = save_llama(tmp_path / "hf")
    plain = trainer("auto", fused=False).validate(HFModule(source=hf), data())
    mega = trainer(strategy(hf)).validate(HFModule(), data())
    assert mega[0]["val_loss"] == pytest.approx(plain[0]["val_loss"], rel=1e-6)


def _release_free_heap() -> None:
    """Give freed heap pages back (glibc), so that the arenas' growth is seen, not hidden in reused pages."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory of earlier tests may hide part of the growth
        pass


def test_materialising_from_weights_makes_no_copy_of_the_model(tmp_path: Path) -> None:
    """The arenas are the only model-sized memory: each tensor is read from the memory-mapped file into its
    unit's arena (a transient of one tensor), never a whole model first."""
    from lightning_megatrain.engine import Runtime, RuntimeConfig
    from lightning_megatrain.memory import HostMemoryPeak
    from lightning_megatrain.weights import weights_materializer

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    # the files written one small shard at a time: no model-sized allocation is left in the heap to reuse
    out, weight_map = tmp_path / "w", {}
    out.mkdir()
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(".".join(name.split(".")[:3]) if ".layers." in name else name, []).append(name)
    for i, names in enumerate(groups.values()):
        shard = f"model-{i:05d}.safetensors"
        save_file({n: torch.randn(model.get_parameter(n).shape) for n in names}, str(out / shard))
        weight_map.update({n: shard for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    materialize, files = weights_materializer(model, tmp_path / "w")
    _release_free_heap()
    with HostMemoryPeak() as peak:
        runtime = Runtime(model, torch.device("cpu"), torch.float32, RuntimeConfig(grads=False, materialize=materialize))
    files.close()
    try:
        # the arenas (model_bytes) plus about one tensor; a model copy first would be twice the model
        assert model_bytes - 2 * largest < peak.extra < model_bytes + 2 * largest, (peak.extra, model_bytes)
        for name, value in file_tensors(tmp_path / "w").items():
            assert torch.equal(model.get_parameter(name), value), name
    finally:
        runtime.detach()


class Scale(nn.Module):
    """A custom module HF's ``_init_weights`` does not know, with its own ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.empty(32))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gain)


def test_a_custom_module_inside_a_meta_hf_model_uses_its_reset_parameters() -> None:
    class WithScale(HFModule):
        def configure_model(self) -> None:
            super().configure_model()
            if not hasattr(self.model.model, "scale"):
                with torch.device("meta"):
                    self.model.model.scale = Scale()

    start = start_of(WithScale(), MegaTrainStrategy(fused_optimizer=False))
    assert torch.equal(start.params["model.model.scale.gain"], torch.ones(32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_streamed_copies_written_from_the_files_equal_casting_the_masters(tmp_path: Path, dtype: torch.dtype) -> None:
    """Setup writes a "fast" unit's bf16 copy from the same read that fills its fp32 masters (no second pass
    over the masters); it is what casting the masters gives. fp64 files (rounded into fp32 masters) are
    cast from the masters instead: rounding twice could differ."""
    from lightning_megatrain.engine import Runtime, RuntimeConfig
    from lightning_megatrain.weights import _Filler, weights_materializer

    hf = save_llama(tmp_path / "hf", dtype=dtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config())
    materialize, files = weights_materializer(model, hf)
    wrote: list[bool] = []
    into = _Filler.into

    def counted(self: Any, out: torch.Tensor, cast: torch.Tensor) -> bool:
        wrote.append(into(self, out, cast))
        return wrote[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Filler, "into", counted)
        runtime = Runtime(model, torch.device("cpu"), torch.bfloat16, RuntimeConfig(host_memory="fast", materialize=materialize))
    files.close()
    try:
        casts = [(u, e) for u in runtime.units for e in u._cast]
        assert casts and len(wrote) == len(casts) and all(wrote) == (dtype != torch.float64)
        for unit, e in casts:
            assert torch.equal(unit.param_view(unit.compute, e), unit.store_view(e).to(torch.bfloat16)), e.name
        for name, value in file_tensors(hf).items():
            assert torch.equal(model.get_parameter(name), value.float()), name
    finally:
        runtime.detach()
