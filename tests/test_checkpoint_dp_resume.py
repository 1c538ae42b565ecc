"""Resuming data-parallel training from its checkpoints, end to end with the engine: at the same world
size exactly (2 -> 2), and at another one (2 -> 1, 1 -> 2) to float noise, against uninterrupted runs with
the same global batch. The 2-process runs are in ckpt_dp_resume_worker.py (one torchrun launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from lightning_megatrain import checkpoint as ck
from models import BlockLM, data, trainer

HERE = Path(__file__).parent
ROOT = HERE.parent
RTOL, ATOL = 1e-5, 1e-6  # float noise: a global batch summed in another order


def _global_batches() -> DataLoader:
    """One device's loader of the global batches 2 ranks get: Lightning gives each rank a shuffling
    DistributedSampler (seed: the global seed, reshuffled every epoch) and rank r takes every 2nd sample of
    the permutation, so the global batch of a step is the next 4 samples of that permutation."""
    dataset = data().dataset
    return DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0))


def _single(ckpt_path: Any = None, checkpoints: Path | None = None, max_steps: int = 12, save_after: Path | None = None) -> BlockLM:
    L.seed_everything(0)
    model = BlockLM(dropout=0.0)
    cbs = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=6, save_top_k=-1, filename="{step}")] if checkpoints else []
    t = trainer("megatrain", max_steps=max_steps, enable_checkpointing=bool(checkpoints), callbacks=cbs)
    t.fit(model, _global_batches(), ckpt_path=ckpt_path)
    if save_after is not None:
        t.save_checkpoint(save_after)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dpresume")
    single = _single(checkpoints=tmp / "single")  # one device, 12 steps, a checkpoint at step 6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(HERE / "ckpt_dp_resume_worker.py"), str(tmp), str(tmp / "single" / "step=6.ckpt"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the 2-process runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = {name: [torch.load(tmp / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)] for name in ("full", "resumed", "from_single", "after_fit", "resumed_after_fit", "async")}
    out["single"] = single
    out["dir"] = tmp
    return out


def _global_losses(ranks: list[dict[str, Any]]) -> torch.Tensor:
    """Each step's loss over the global batch: the mean of the ranks' (equal-sized) micro-batch losses."""
    return torch.tensor([r["losses"] for r in ranks]).mean(0)


def test_the_data_parallel_checkpoint_is_one_directory_written_by_both_ranks(runs: dict[str, Any]) -> None:
    d = runs["dir"] / "dp" / "step=6.ckpt"
    assert ck.is_sharded_checkpoint(d)
    assert json.loads((d / ck.META_FILE).read_text()) == {"format": ck.FORMAT, "version": 2, "writers": 2}
    assert sorted(p.name for p in d.glob("optimizer-*.safetensors")) == ["optimizer-r00000-00001.safetensors", "optimizer-r00001-00001.safetensors"]
    state = ck.load_sharded(d)
    params = dict(runs["single"].named_parameters())
    for idx, pstate in state["optimizer_states"][0]["state"].items():
        assert isinstance(pstate["exp_avg"], ck.Pieces)  # no rank held a whole tensor
        assert pstate["exp_avg"].numel() == list(params.values())[idx].numel()


def test_resume_at_the_same_world_size_is_exact(runs: dict[str, Any]) -> None:
    """2 -> 2: the resumed steps and final weights are the uninterrupted run's, bit for bit, on every rank."""
    for rank, (full, resumed) in enumerate(zip(runs["full"], runs["resumed"])):
        assert len(resumed["losses"]) == 6 and resumed["losses"] == full["losses"][6:], rank
        assert resumed["params"].keys() == full["params"].keys()
        for name, p in full["params"].items():
            assert torch.equal(resumed["params"][name], p), (rank, name)


def test_resume_on_one_device_from_two_ranks(runs: dict[str, Any]) -> None:
    """2 -> 1: one device resumes the 2-rank checkpoint and trains as the 2 ranks went on to."""
    model = _single(ckpt_path=runs["dir"] / "dp" / "step=6.ckpt")
    full = runs["full"]
    assert len(model.losses) == 6
    torch.testing.assert_close(torch.tensor(model.losses), _global_losses(full)[6:], rtol=RTOL, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), full[0]["params"][name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_on_two_ranks_from_one_device(runs: dict[str, Any]) -> None:
    """1 -> 2: two ranks resume the single-device checkpoint and train as the single device went on to."""
    single, resumed = runs["single"], runs["from_single"]
    assert all(len(r["losses"]) == 6 for r in resumed)
    torch.testing.assert_close(_global_losses(resumed), torch.tensor(single.losses[6:]), rtol=RTOL, atol=ATOL)
    for name, p in single.named_parameters():
        for rank, r in enumerate(resumed):
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=name, k=rank: f"rank {k}, {n}: {m}")


def test_after_fit_each_rank_holds_its_share_of_the_optimizer_state(runs: dict[str, Any]) -> None:
    """As with DDP, the optimizer's state is there after fit: on each rank the elements it owns."""
    at6 = ck.load_sharded(runs["dir"] / "dp" / "step=6.ckpt")["optimizer_states"][0]["state"]
    names = list(runs["after_fit"][0]["params"])
    for idx, name in enumerate(names):
        numel = runs["after_fit"][0]["params"][name].numel()
        covered = 0
        for rank in runs["after_fit"]:
            lo, hi = rank["owned"][name]
            covered += hi - lo
            if hi == lo:
                assert name not in rank["state"]
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(rank["state"][name][key], ck.owned_slice(at6[idx][key], lo, hi)), (name, key)
            assert torch.equal(rank["state"][name]["step"], at6[idx]["step"])
        assert covered == numel, name  # the ranks' shares cover each element once


def test_a_checkpoint_saved_after_fit_resumes_at_any_world_size(runs: dict[str, Any]) -> None:
    """trainer.save_checkpoint after a 2-rank fit: the full training state (the step-6 checkpoint's weights and
    optimizer state), resumed on 2 ranks (2 -> 2) and on one device (2 -> 1) as one device resumes its own."""
    after = ck.load_sharded(runs["dir"] / "dp" / "after_fit.ckpt")
    at6 = ck.load_sharded(runs["dir"] / "dp" / "step=6.ckpt")
    assert after["global_step"] == at6["global_step"] == 6
    for k, v in at6["state_dict"].items():
        assert torch.equal(after["state_dict"][k], v), k
    for idx, pstate in at6["optimizer_states"][0]["state"].items():
        for key, v in pstate.items():
            assert torch.equal(ck.materialize(after["optimizer_states"][0]["state"][idx][key]), ck.materialize(v)), (idx, key)
    # the reference: one device saving after its 6-step fit and resuming (the scheduler stepped once more
    # than in the step-6 checkpoint, which ModelCheckpoint wrote before the scheduler's step)
    _single(max_steps=6, save_after=runs["dir"] / "single_after_fit.ckpt")
    reference = _single(ckpt_path=runs["dir"] / "single_after_fit.ckpt")
    assert len(reference.losses) == 6
    resumed = runs["resumed_after_fit"]
    assert all(len(r["losses"]) == 6 for r in resumed)  # 2 -> 2
    torch.testing.assert_close(_global_losses(resumed), torch.tensor(reference.losses), rtol=RTOL, atol=ATOL)
    one = _single(ckpt_path=runs["dir"] / "dp" / "after_fit.ckpt")  # 2 -> 1
    torch.testing.assert_close(torch.tensor(one.losses), torch.tensor(reference.losses), rtol=RTOL, atol=ATOL)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(one.named_parameters())[name].detach(), p.detach(), rtol=RTOL, atol=ATOL)
        for rank, r in enumerate(resumed):
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=name, k=rank: f"rank {k}, {n}: {m}")


def test_async_checkpoints_with_two_ranks_are_the_sync_ones(runs: dict[str, Any]) -> None:
    """async_checkpoint=True on 2 ranks: each writes its shards in the background while training goes on;
    the published checkpoints hold exactly what the synchronous saves hold, and training is unchanged."""
    for rank, (full, run) in enumerate(zip(runs["full"], runs["async"])):
        assert run["losses"] == full["losses"], rank
        # the save of step 6 was still being written when step 7 started (writes are slowed down), on both ranks
        assert run["saves"][6] == ("DistributedSave", False) and full["saves"][6] is None, (rank, run["saves"])
    for step in (6, 12):
        sync, got = (ck.load_sharded(runs["dir"] / d / f"step={step}.ckpt") for d in ("dp", "dp_async"))
        assert json.loads((runs["dir"] / "dp_async" / f"step={step}.ckpt" / ck.META_FILE).read_text())["writers"] == 2
        assert got["global_step"] == sync["global_step"] == step
        for k, v in sync["state_dict"].items():
            assert torch.equal(got["state_dict"][k], v), (step, k)
        for idx, pstate in sync["optimizer_states"][0]["state"].items():
            for key, v in pstate.items():
                assert torch.equal(ck.materialize(got["optimizer_states"][0]["state"][idx][key]), ck.materialize(v)), (step, idx, key)
    assert not [p for p in (runs["dir"] / "dp_async").iterdir() if p.name.startswith(".")]  # no temporary left
    model = _single(ckpt_path=runs["dir"] / "dp_async" / "step=6.ckpt")  # and it resumes (2 -> 1)
    torch.testing.assert_close(torch.tensor(model.losses), _global_losses(runs["full"])[6:], rtol=RTOL, atol=ATOL)


def test_a_failed_part_of_an_async_save_publishes_nothing_and_every_rank_raises(tmp_path: Path) -> None:
    """async_checkpoint=True on 2 ranks, rank 1's part of the step-8 save fails (a full disk): the checkpoint
    is not published (no directory, no temporary left), the one published before is intact, and fit raises
    on every rank naming the failure (rank 1 its own error, rank 0 naming rank 1) instead of training on."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(HERE / "ckpt_dp_resume_worker.py"), "--failing-part", str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the 2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    seen = [(tmp_path / f"failing-rank{r}.txt").read_text() for r in range(2)]
    assert seen[1].startswith("fit: CheckpointWriteError: writing checkpoint ") and "step=8.ckpt" in seen[1], seen
    assert "No space left on device (test)" in seen[1] and "was not published" in seen[1], seen
    assert seen[0].startswith("fit: ") and "rank 1" in seen[0], seen  # rank 0 names the rank whose part failed
    for text in seen:  # raised at a step after the save started, before the run's end
        step = int(text.rsplit(" ", 1)[1])
        assert 8 <= step < 12, seen
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step=4.ckpt"], names  # step 8 not published, nothing hidden left behind
    assert ck.load_sharded(tmp_path / "ck" / "step=4.ckpt")["global_step"] == 4
