"""Sharded safetensors checkpoints: layout, memory, atomicity, resume, mismatches, interop, async."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_megatrain import MegaTrainStrategy
from lightning_megatrain import checkpoint as ck
from lightning_megatrain.memory import HostMemoryPeak
from models import HFLM, BlockLM, data, trainer

HERE = Path(__file__).parent


def _fit(tmp: Path, strategy: Any = None, steps: int = 6, every: int = 6, make: Any = None, ckpt_path: Any = None, **cb: Any) -> tuple[Any, Any]:
    L.seed_everything(0)
    model = (make or (lambda: BlockLM(dropout=0.0)))()
    callback = ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, filename="{step}", **({"save_top_k": -1} | cb))
    t = trainer(strategy or "megatrain", max_steps=steps, enable_checkpointing=True, callbacks=[callback])
    t.fit(model, data(), ckpt_path=ckpt_path)
    return model, t


def test_layout_names_shards_and_safetensors_compatibility(tmp_path: Path) -> None:
    model, _ = _fit(tmp_path, MegaTrainStrategy(checkpoint_shard_bytes=8 * 1024))
    d = tmp_path / "step=6.ckpt"
    assert d.is_dir() and ck.is_sharded_checkpoint(d)
    index = json.loads((d / ck.MODEL_INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())  # names = the LightningModule's state_dict names
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2 and {p.name for p in shards} == set(index["weight_map"].values())
    largest_tensor = max(t.numel() * 4 for t in model.state_dict().values())
    for shard in shards:
        assert shard.stat().st_size <= max(8 * 1024, largest_tensor) + 4096  # bounded (+ header)
    # the files are plain safetensors: the reference library reads them
    loaded = {}
    for shard in shards:
        loaded.update(load_file(shard))
    for name, t in model.state_dict().items():
        assert torch.equal(loaded[name], t), name
    opt = {}
    for shard in d.glob("optimizer-*.safetensors"):
        opt.update(load_file(shard))
    assert any(k.endswith(".exp_avg") for k in opt) and (d / ck.STATE_FILE).stat().st_size < 64 * 1024


def test_save_and_load_use_about_one_shard_of_extra_host_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    d, n = 1024, 24  # ~100M parameters of weights + Adam state: a full copy would be ~1.2 GB
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(n)])
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 0}
    total = sum(t.numel() * 4 for t in model.state_dict().values()) * 3
    shard = 16 * 1024**2
    with HostMemoryPeak() as save_peak:
        ck.save_sharded(checkpoint, tmp_path / "big", shard_bytes=shard)
    assert save_peak.extra < 4 * shard, f"save used {save_peak.extra / 2**20:.0f} MiB extra for {total / 2**20:.0f} MiB of state"
    with HostMemoryPeak() as load_peak:
        loaded = ck.load_sharded(tmp_path / "big")
    assert load_peak.extra < 4 * shard, f"load used {load_peak.extra / 2**20:.0f} MiB extra"
    with torch.no_grad():
        for name, t in model.state_dict().items():
            assert torch.equal(loaded["state_dict"][name], t)


def test_model_checkpoint_top_k_and_save_last_with_directories(tmp_path: Path) -> None:
    _fit(tmp_path, steps=8, every=2, save_top_k=2, monitor="step", mode="max", save_last=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "step=6.ckpt", "step=8.ckpt"], names
    assert all(ck.is_sharded_checkpoint(tmp_path / n) for n in names)
    assert ck.load_sharded(tmp_path / "last.ckpt")["global_step"] == 8


def test_mismatched_checkpoint_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    _fit(tmp_path / "a", make=lambda: BlockLM(d=16, n=4, dropout=0.0))
    L.seed_everything(1)
    other = BlockLM(d=16, n=3, dropout=0.0)  # one layer fewer
    other.blocks[0].fc = torch.nn.Linear(16, 32)  # and a different shape
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ck.CheckpointMismatchError) as err:
        trainer("megatrain", max_steps=7).fit(other, data(), ckpt_path=tmp_path / "a" / "step=6.ckpt")
    msg = str(err.value)
    assert "nothing was loaded" in msg and "shape of blocks.0.fc.weight" in msg and "not in the model: blocks.3.ln.weight" in msg
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_convert_to_a_lightning_ckpt_function_and_command_line(tmp_path: Path) -> None:
    model, _ = _fit(tmp_path)
    d = tmp_path / "step=6.ckpt"
    out = ck.to_lightning_checkpoint(d, tmp_path / "one.ckpt")
    single = torch.load(out, weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(single["state_dict"][k], v)
    assert single["global_step"] == 6 and "exp_avg" in single["optimizer_states"][0]["state"][0]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    res = subprocess.run([sys.executable, "-m", "lightning_megatrain.checkpoint", "convert", str(d), str(tmp_path / "cli.ckpt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    # plain Lightning resumes from the converted file
    L.seed_everything(0)
    plain = BlockLM(dropout=0.0)
    trainer("auto", max_steps=7).fit(plain, data(), ckpt_path=tmp_path / "cli.ckpt")
    assert len(plain.losses) == 1


def test_export_to_hf_and_load_hf_weights(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    L.seed_everything(0)
    lm = HFLM("llama", tied=True)
    trainer("megatrain", max_steps=2).fit(lm, data())
    out = ck.export_hf(lm, tmp_path / "hf", shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as HF does
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(p, lm.model.state_dict()[name], rtol=0, atol=0, msg=name)
    # from a megatrain checkpoint directory, with an explicit prefix and config
    model, _ = _fit(tmp_path / "ck", make=lambda: HFLM("llama"), steps=6)
    out2 = ck.export_hf(tmp_path / "ck" / "step=6.ckpt", tmp_path / "hf2", prefix="model.", config=model.model.config)
    hf2 = transformers.LlamaForCausalLM.from_pretrained(out2)
    for name, p in hf2.state_dict().items():
        torch.testing.assert_close(p, model.model.state_dict()[name], rtol=0, atol=0, msg=name)
    # initial weights from an HF directory written by transformers itself
    L.seed_everything(3)
    fresh = transformers.LlamaForCausalLM(model.model.config)
    fresh.save_pretrained(tmp_path / "saved", safe_serialization=True)
    target = HFLM("llama")
    ck.load_hf_weights(target, tmp_path / "saved")
    for name, p in fresh.state_dict().items():
        assert torch.equal(target.model.state_dict()[name], p), name


def test_load_hf_weights_into_host_arenas_after_setup(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    L.seed_everything(5)
    donor = HFLM("llama", dropout=0.0)
    donor.model.save_pretrained(tmp_path / "w", safe_serialization=True)
    seen: dict[str, Any] = {}

    class LoadOnFitStart(HFLM):
        def on_fit_start(self) -> None:
            ck.load_hf_weights(self, tmp_path / "w")
            rt = self.trainer.strategy.runtime
            seen["in_arena"] = all(
                any(u.holds(p) for u in rt.units)
                for p in self.parameters()
            )
            seen["device"] = {p.device.type for p in self.parameters()}

    L.seed_everything(0)
    model = LoadOnFitStart("llama", dropout=0.0)
    trainer("megatrain", max_steps=1).fit(model, data())
    assert seen == {"in_arena": True, "device": {"cpu"}}
    # the first loss is the donor's loss on the first batch
    batch = next(iter(data()))
    with torch.no_grad():
        expected = donor.loss(batch).item()
    assert model.losses[0] == pytest.approx(expected, rel=1e-5)


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, lightning as L
    sys.path.insert(0, {tests!r})
    import lightning_megatrain
    from lightning.pytorch.callbacks import ModelCheckpoint
    from models import BlockLM, data, trainer

    class Big(BlockLM):
        def __init__(self):
            super().__init__(d=512, n=12, dropout=0.0)

    cb = ModelCheckpoint(dirpath={out!r}, every_n_train_steps=1, save_top_k=0, save_last=True)
    strategy = lightning_megatrain.MegaTrainStrategy(checkpoint_shard_bytes=2 * 1024 ** 2)
    trainer(strategy, max_steps=1000, enable_checkpointing=True, callbacks=[cb]).fit(Big(), data(n=4000))
    """
)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    out = tmp_path / "ckpts"
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(HERE), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        killed_mid_save = False
        while time.time() < deadline and proc.poll() is None:
            if (out / "last.ckpt").is_dir() and any(p.name.startswith(".last.ckpt.megatrain-tmp-") for p in out.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_save = True
                break
            time.sleep(0.001)
        assert killed_mid_save, f"never saw a save in progress; stderr: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert any(p.name.startswith(".last.ckpt.megatrain-tmp-") for p in out.iterdir())  # the save really was cut off
    last = ck.load_sharded(out / "last.ckpt")
    step = last["global_step"]
    assert step >= 1
    L.seed_everything(0)
    sys.path.insert(0, str(HERE))
    model = BlockLM(d=512, n=12, dropout=0.0)
    # loadable: Lightning resumes from it and trains one more step
    trainer("megatrain", max_steps=step + 1).fit(model, data(n=4000), ckpt_path=out / "last.ckpt")
    assert len(model.losses) == 1
    # and the next save cleans the dead process's temporary directory
    ck.save_sharded({"state_dict": model.state_dict()}, out / "last.ckpt")
    assert not any(p.name.startswith(".last.ckpt.megatrain-tmp-") for p in out.iterdir())


def test_async_save_is_one_consistent_step_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # slow the writer so that training runs several steps while the checkpoint is being written
    real_write = ck._ShardWriter.write

    def slow_write(self: Any, t: torch.Tensor) -> None:
        time.sleep(0.01)
        real_write(self, t)

    sync_model, _ = _fit(tmp_path / "sync", MegaTrainStrategy(), steps=9, every=3)
    monkeypatch.setattr(ck._ShardWriter, "write", slow_write)
    async_model, _ = _fit(tmp_path / "async", MegaTrainStrategy(async_checkpoint=True), steps=9, every=3)
    assert async_model.losses == sync_model.losses
    for step in (3, 6, 9):
        a = ck.load_sharded(tmp_path / "sync" / f"step={step}.ckpt")
        b = ck.load_sharded(tmp_path / "async" / f"step={step}.ckpt")
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (step, k)
        for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (step, key)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwriting_a_checkpoint_replaces_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(ck.publish, "_exchange", lambda a, b: False)  # filesystems without RENAME_EXCHANGE
    target = tmp_path / "last.ckpt"
    ck.save_sharded({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, target)
    ck.save_sharded({"state_dict": {"w": torch.ones(3), "v": torch.ones(2)}, "global_step": 2}, target)
    loaded = ck.load_sharded(target)
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary or old directory left
