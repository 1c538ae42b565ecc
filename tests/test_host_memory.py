"""host_memory modes: "compact" streams fp32 masters (exact, no host compute copy); "lean" holds
optimizer state in bf16 between steps; "auto" picks; the memory plan says which and what it costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain.engine import Runtime, RuntimeConfig
from lightning_megatrain.engine.state import LeanState
from lightning_megatrain.memory import choose_host_memory, hidden_tokens, plan_memory
from models import BlockLM, HFLM, assert_same_training, data, fit_pair, trainer


class Spy(L.Callback):
    """Records what the optimizer holds after each step (waits for the host update first)."""

    def __init__(self) -> None:
        self.dtypes: list[set[torch.dtype]] = []
        self.units: list[Any] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not isinstance(trainer.strategy, MegaTrainStrategy):
            return
        trainer.strategy.wait()
        opt = trainer.optimizers[0]
        self.dtypes.append({v.dtype for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0})
        runtime = trainer.strategy.runtime
        if runtime is not None and not self.units:
            self.units = [(not u._cast, {e.stream_dtype for e in u.entries}) for u in runtime.layer_units]


@pytest.mark.parametrize("make", [lambda: HFLM("llama", dropout=0.0), lambda: BlockLM(dropout=0.1)], ids=["llama", "layernorm-blocks"])
def test_compact_bf16_mixed_is_exact_against_plain_bf16_mixed(make: Any) -> None:
    """Streaming the fp32 masters and letting autocast cast them on the device is what plain mixed
    precision does, so the numbers are the same, bit for bit (a bf16 host copy would differ, and
    crashes nn.LayerNorm on the CPU). Guards against a host compute copy sneaking back into "compact".

    Both sides step with the same optimizer kernel (fit_pair: plain gets the fused CPU AdamW megatrain
    picks). Against plain's for-loop AdamW the fused kernel's few-ulp rounding, which differs from CPU
    to CPU, grows under bf16 to 1e-4 of the loss on some CPUs (seen: an AMD EPYC with AVX-512)."""
    spy = Spy()
    plain, mega = fit_pair(make, MegaTrainStrategy(host_memory="compact"), precision="bf16-mixed", callbacks=[spy])
    assert_same_training(plain, mega, rtol=0, atol=0)
    assert spy.units and all(uncast and dtypes == {torch.float32} for uncast, dtypes in spy.units)


def test_auto_is_compact_on_the_cpu_and_the_plan_says_why(capsys: pytest.CaptureFixture) -> None:
    L.seed_everything(0)
    model = HFLM("llama", dropout=0.0)
    strategy = MegaTrainStrategy()
    trainer(strategy, precision="bf16-mixed", max_steps=1).fit(model, data())
    plan = strategy.memory_plan
    assert plan.host_memory == "compact" and "no PCIe" in plan.host_memory_reason
    assert not any("compute copies" in k for k in plan.host)


def test_choose_host_memory_on_a_gpu_follows_the_step_time_model() -> None:
    cuda = torch.device("cuda", 0)
    assert hidden_tokens(4) == 2 * hidden_tokens(2) > 0
    mode, why = choose_host_memory("auto", cuda, torch.bfloat16, None)
    assert mode == "fast" and str(hidden_tokens(2)) in why
    assert choose_host_memory("auto", cuda, torch.bfloat16, hidden_tokens(2))[0] == "compact"
    assert choose_host_memory("auto", cuda, torch.bfloat16, hidden_tokens(2) - 1)[0] == "fast"
    assert choose_host_memory("auto", cuda, torch.float32, None)[0] == "compact"
    assert choose_host_memory("lean", cuda, torch.bfloat16, None)[0] == "lean"
    with pytest.raises(ValueError, match="host_memory must be one of"):
        MegaTrainStrategy(host_memory="small")  # type: ignore[arg-type]


def test_memory_plan_bytes_per_parameter_of_each_mode() -> None:
    """18 / 16 / 12 B per parameter with AdamW and bf16-mixed, for a model whose layers dominate."""
    layers = torch.nn.ModuleList([torch.nn.Linear(256, 256, bias=False) for _ in range(16)])
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters())
    per = {}
    for mode in ("fast", "compact", "lean"):
        plan = plan_memory(model, list(layers), torch.bfloat16, torch.device("cpu"), optimizers=[opt], host_memory=mode)
        per[mode] = plan.host_bytes_per_param
    # staging and (lean) one layer's fp32 scratch are one or two layers out of 16: < 1 B/param
    assert 18 <= per["fast"] < 19 and 16 <= per["compact"] < 17 and 12 <= per["lean"] < 13.2, per


MODE = "lean"


def _lean_fit(tmp_path: Path, max_steps: int, ckpt: str | None = None, opt: str = "adamw", every: int | None = None) -> tuple[BlockLM, Spy]:
    L.seed_everything(0)
    model = BlockLM(dropout=0.0)
    model.opt_name = opt
    spy = Spy()
    callbacks: list[Any] = [spy]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1))
    t = trainer(MegaTrainStrategy(host_memory=MODE), max_steps=max_steps, callbacks=callbacks,
                enable_checkpointing=bool(every))
    t.fit(model, data(), ckpt_path=ckpt)  # 6 batches an epoch: checkpoints at epoch ends resume exactly
    return model, spy


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_lean_holds_state_in_bf16_and_trains_close_to_exact(tmp_path: Path, opt: str) -> None:
    """Any optimizer: AdamW's moments and SGD's momentum are bf16 between steps (the step counter stays
    fp32), and training stays close to the exact run (a few steps: the rounding is ~0.4% per value)."""
    lean, spy = _lean_fit(tmp_path, 6, opt=opt)
    assert spy.dtypes and all(d == {torch.bfloat16} for d in spy.dtypes), spy.dtypes
    L.seed_everything(0)
    exact = BlockLM(dropout=0.0)
    exact.opt_name = opt
    trainer(MegaTrainStrategy(host_memory="compact"), max_steps=6).fit(exact, data())
    torch.testing.assert_close(torch.tensor(lean.losses), torch.tensor(exact.losses), rtol=2e-2, atol=0)
    # the updates are nearly the same, and not identical (the state really is rounded)
    L.seed_everything(0)
    start = BlockLM(dropout=0.0)
    diffs = []
    for (name, p0), pl_, pe in zip(start.named_parameters(), lean.parameters(), exact.parameters()):
        d_exact, d_lean = pe.detach() - p0.detach(), pl_.detach() - p0.detach()
        if d_exact.norm() > 0:
            diffs.append(((d_lean - d_exact).norm() / d_exact.norm()).item())
    assert max(diffs) < 0.1 and max(diffs) > 0, diffs


def test_lean_resume_is_exact_relative_to_the_lean_run(tmp_path: Path) -> None:
    """The checkpoint holds the state as held (bf16); a resumed lean run equals the uninterrupted one."""
    full, _ = _lean_fit(tmp_path / "a", 12, every=6)
    ckpt = tmp_path / "a" / "epoch=0-step=6.ckpt"
    from lightning_megatrain.checkpoint import load_sharded

    saved = load_sharded(ckpt)
    dtypes = {v.dtype for s in saved["optimizer_states"][0]["state"].values() for v in s.values() if v.dim() > 0}
    assert dtypes == {torch.bfloat16}
    resumed, spy = _lean_fit(tmp_path / "b", 12, ckpt=str(ckpt))
    assert resumed.losses == full.losses[6:]
    assert all(d == {torch.bfloat16} for d in spy.dtypes)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_lean_state_widens_into_one_reused_scratch() -> None:
    """Inside the step the state is fp32 views of one scratch buffer; outside it is bf16 again."""
    p = torch.nn.Parameter(torch.randn(64))
    q = torch.nn.Parameter(torch.randn(32))
    opt = torch.optim.Adam([p, q], lr=0.1)
    lean = LeanState()
    for _ in range(2):
        p.grad, q.grad = torch.randn(64), torch.randn(32)
        with lean.widened(opt, [p, q]):
            opt.step()
    held = opt.state[p]["exp_avg"]
    assert held.dtype == torch.bfloat16 and opt.state[p]["step"].dtype == torch.float32
    scratch = lean._scratch
    with lean.widened(opt, [p, q]):
        wide = opt.state[p]["exp_avg"]
        assert wide.dtype == torch.float32 and wide.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr()
        torch.testing.assert_close(wide, held.float(), rtol=0, atol=0)
    assert lean._scratch.numel() == 2 * (64 + 32)


def test_engine_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="host_memory must be"):
        Runtime(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), torch.device("cpu"), torch.float32,
                RuntimeConfig(host_memory="tiny"))


def test_plan_command_line_for_the_120b_headline(capsys: pytest.CaptureFixture) -> None:
    """The docs' claim: a 120B Llama-shaped model trains with host_memory="lean" on a 1.5 TiB host and
    an H200, and does not with the other modes."""
    from lightning_megatrain.plan import main

    main(["--model", "llama-120b", "--host-gb", "1536", "--gpu-gb", "141"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.split()}
    assert rows["lean"][4] == "yes" and rows["fast"][4] == "NO" and rows["compact"][4] == "NO"
    assert 12.0 <= float(rows["lean"][2]) < 12.5 and 18.0 <= float(rows["fast"][2]) < 18.5


def test_plan_of_an_hf_directory_counts_the_real_parameters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    from lightning_megatrain.plan import LlamaShape, build_meta, llama_of_size, plan_for

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=2)
    real = transformers.LlamaForCausalLM(cfg)
    real.save_pretrained(tmp_path)
    n = sum(p.numel() for p in real.parameters())
    module, layers, hidden, _ = build_meta(str(tmp_path))
    assert len(layers) == 6 and hidden == 256
    plan = plan_for(str(tmp_path), "compact", 10**12, 10**12, tokens=1024)
    assert plan.params == n
    shape = LlamaShape(256, 688, 6, 8, 2, vocab=1000)
    assert shape.params == n and plan_for(shape, "compact", 10**12, 10**12, 1024).params == n
    approx = llama_of_size(70 * 10**9)
    assert abs(approx.params / 70e9 - 1) < 0.02 and approx.hidden == 8192


def test_the_llama_70b_preset_is_llama_3_70b(tmp_path: Path) -> None:
    """docs/big-models.md plans Llama-3-70B with ``--model llama-70b``: the preset has its shape and its
    70.6B parameters, and plans as its config.json does (the model built on the meta device by transformers)."""
    import json

    transformers = pytest.importorskip("transformers")
    from lightning_megatrain.plan import PRESETS, plan_for

    shape = PRESETS["llama-70b"]
    assert (shape.hidden, shape.layers, shape.intermediate, shape.heads, shape.kv_heads, shape.vocab, shape.tied) == (
        8192, 80, 28672, 64, 8, 128256, False)
    assert shape.params == 70_553_706_496  # Meta-Llama-3-70B's count, "70.6B"
    config = transformers.LlamaConfig(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        real = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in real.parameters()) == shape.params
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    for mode in ("compact", "lean"):
        preset, directory = plan_for("llama-70b", mode, 2**40, 80 * 2**30, 16384), plan_for(str(tmp_path), mode, 2**40, 80 * 2**30, 16384)
        assert directory.params == preset.params and directory.host_total == preset.host_total, mode


def test_plan_command_line_refuses_bad_input() -> None:
    from lightning_megatrain.plan import main

    with pytest.raises(SystemExit):
        main(["--model", "no-such-model", "--host-gb", "10", "--gpu-gb", "10"])
    with pytest.raises(SystemExit):
        main(["--params", "-5", "--host-gb", "10", "--gpu-gb", "10"])


def test_lean_steps_big_units_in_chunks_of_one_layer() -> None:
    """The fp32 scratch holds at most one layer's state (or one parameter bigger than a layer): the
    embeddings and head are stepped in chunks of whole parameters, with the same update."""
    lean = LeanState(chunk_numel=64)
    a, b, c, d = (torch.zeros(n) for n in (64, 32, 32, 16))
    pieces = list(lean.chunks([[a, b, c], [d]]))
    assert [[[t.numel() for t in g] for g in piece] for piece in pieces] == [[[64], []], [[32, 32], []], [[], [16]]]
    # in a fit: AdamW's two moments of the largest chunk, not of the whole non-layer unit
    L.seed_everything(0)
    model = BlockLM(dropout=0.0)
    model.emb = torch.nn.Embedding(1024, 16)  # a non-layer unit bigger than a layer (rows past 64 unused)
    strategy = MegaTrainStrategy(host_memory="lean")
    trainer(strategy, max_steps=2, callbacks=[_KeepRuntime()]).fit(model, data())
    runtime = _KeepRuntime.runtime
    layer = max(u.gnumel for u in runtime.layer_units)
    sides = [runtime.outer_in, runtime.outer_out]  # the non-layer units (runtime.units is emptied at teardown)
    biggest = max(e.numel for u in [*sides, *runtime.layer_units] for e in u.entries)
    outer = max(u.gnumel for u in sides)
    assert outer > layer  # the case that needs chunks
    assert runtime.lean._scratch.numel() <= 2 * max(layer, biggest) < 2 * outer


class _KeepRuntime(L.Callback):
    runtime: Any = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        trainer.strategy.wait()
        type(self).runtime = trainer.strategy.runtime
