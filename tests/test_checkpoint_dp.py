"""Data-parallel checkpoints: every rank writes its share into one directory with one index, and any
world size reads it back (gloo processes writing a real checkpoint's state split as the engine splits it;
ckpt_dp_worker.py). The end-to-end resume with the engine is in test_checkpoint_dp_resume.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_megatrain import checkpoint as ck
from ckpt_dp_worker import owned, param_shapes
from models import BlockLM, data, trainer

HERE = Path(__file__).parent
ROOT = HERE.parent


def _launch(n: int, src: Path, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(HERE / "ckpt_dp_worker.py"), str(src), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Path]:
    """A single-device checkpoint after 6 steps (``"src"``), and what 2 and 3 ranks wrote from it."""
    tmp = tmp_path_factory.mktemp("dp")
    L.seed_everything(0)
    cb = ModelCheckpoint(dirpath=tmp / "src", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    trainer("megatrain", max_steps=6, enable_checkpointing=True, callbacks=[cb]).fit(BlockLM(dropout=0.0), data())
    runs = {n: _launch(n, tmp / "src" / "step=6.ckpt", tmp / f"w{n}") for n in (2, 3)}  # side by side
    for n, proc in runs.items():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{n} ranks failed:\n{out[-5000:]}"
    return {"src": tmp / "src" / "step=6.ckpt", 2: tmp / "w2", 3: tmp / "w3"}


def _full(saved: dict[Any, Path]) -> dict[str, Any]:
    return ck.load_sharded(saved["src"])


def _same_as(full: dict[str, Any], got: dict[str, Any]) -> None:
    assert got.keys() == full.keys()
    assert got["state_dict"].keys() == full["state_dict"].keys()
    for k, v in full["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    for a, b in zip(full["optimizer_states"], got["optimizer_states"]):
        assert b["param_groups"] == a["param_groups"]
        assert b["state"].keys() == a["state"].keys()
        for idx, pstate in a["state"].items():
            assert b["state"][idx].keys() == pstate.keys()
            for key, v in pstate.items():
                w = b["state"][idx][key]
                if key == "step":
                    assert isinstance(w, torch.Tensor) and torch.equal(w, v)  # 0-d: stored whole, once
                else:
                    assert isinstance(w, ck.Pieces) and w.shape == v.shape and w.dtype == v.dtype
                    assert torch.equal(w.materialize(), v), (idx, key)
    for key in full:
        if key not in ("state_dict", "optimizer_states"):
            assert got[key] == full[key], key


@pytest.mark.parametrize("n", [2, 3])
def test_every_rank_writes_its_share_into_one_directory_with_one_index(saved: dict[Any, Path], n: int) -> None:
    d = saved[n] / "ok"
    assert json.loads((d / ck.META_FILE).read_text())["version"] == 2
    model_index = json.loads((d / ck.MODEL_INDEX).read_text())
    opt_index = json.loads((d / ck.OPTIMIZER_INDEX).read_text())
    shards = set(model_index["weight_map"].values()) | set(opt_index["weight_map"].values())
    assert {p.name for p in d.iterdir()} == shards | {ck.MODEL_INDEX, ck.OPTIMIZER_INDEX, ck.STATE_FILE, ck.META_FILE}
    assert not [p for p in saved[n].iterdir() if p.name.startswith(".")]  # no temporary directory left
    wrote = [set(json.loads((saved[n] / f"files-ok-r{r}.json").read_text())) for r in range(n)]
    assert set().union(*wrote) == shards and sum(map(len, wrote)) == len(shards)  # each file by one rank
    state_dict = ck.load_sharded(d)["state_dict"]
    largest = max(t.numel() * t.element_size() for t in state_dict.values())
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    for r, files in enumerate(wrote):
        assert f"optimizer-r{r:05d}-00001.safetensors" in files and all(f.startswith("model-") or f"-r{r:05d}-" in f for f in files)
        model_bytes = sum(t.numel() * t.element_size() for k, t in state_dict.items() if model_index["weight_map"][k] in files)
        assert abs(model_bytes - total / n) <= largest  # the model's bytes shared out evenly
    # every optimizer state tensor but the 0-d step is in pieces, and the pieces come from several ranks
    assert {name.rsplit(".", 1)[1] for name in opt_index["pieces"]} == {"exp_avg", "exp_avg_sq"}
    owners = {opt_index["weight_map"][stored].split("-")[1] for entry in opt_index["pieces"].values() for _, _, stored in entry["parts"]}
    assert owners == {f"r{r:05d}" for r in range(n)}
    assert any(len(entry["parts"]) > 1 for entry in opt_index["pieces"].values())  # split between ranks
    assert any(len(entry["parts"]) == 1 for entry in opt_index["pieces"].values())  # in one rank's range
    assert set(opt_index["metadata"]["crc32"]) == set(opt_index["weight_map"].values())


@pytest.mark.parametrize("n", [2, 3])
def test_round_trip_gives_back_the_saved_state(saved: dict[Any, Path], n: int) -> None:
    _same_as(_full(saved), ck.load_sharded(saved[n] / "ok"))


def test_ranks_of_other_nodes_write_nothing(saved: dict[Any, Path]) -> None:
    # 2 nodes of one rank each: node 0 writes everything, node 1 (a replica) takes part but writes nothing
    assert json.loads((saved[2] / "files-nodes-r1.json").read_text()) == []
    assert json.loads((saved[2] / "files-nodes-r0.json").read_text()) == [
        "model-00001-of-00001.safetensors", "optimizer-r00000-00001.safetensors"
    ]
    _same_as(_full(saved), ck.load_sharded(saved[2] / "nodes"))


@pytest.mark.parametrize("who", [1, 0])
def test_a_rank_failing_mid_write_fails_every_rank_and_publishes_nothing(saved: dict[Any, Path], who: int) -> None:
    messages = [(saved[2] / f"fail{who}-r{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]  # the same error on every rank
    assert f"rank {who} (local rank {who} of node 0): OSError: [Errno 28] No space left on device (injected)" in messages[0]
    assert "was not published" in messages[0]
    assert not [p for p in saved[2].iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    _same_as(_full(saved), ck.load_sharded(saved[2] / "ok"))  # the checkpoint it was to replace is intact


@pytest.mark.parametrize("source", ["src", 2, 3])
def test_any_world_size_takes_its_own_elements(saved: dict[Any, Path], source: Any) -> None:
    """1 -> 2, 1 -> 3, 2 -> 1, 2 -> 3, 3 -> 1, 3 -> 2 (and the same size): each rank's range of each tensor."""
    full = _full(saved)
    got = ck.load_sharded(saved[source] if source == "src" else saved[source] / "ok")
    for a, b in zip(full["optimizer_states"], got["optimizer_states"]):
        shapes = param_shapes(a)
        for world in (1, 2, 3):
            for rank in range(world):
                for idx, (lo, hi) in enumerate(owned(shapes, rank, world)):
                    for key in ("exp_avg", "exp_avg_sq"):
                        want = a["state"][idx][key].reshape(-1)[lo:hi]
                        assert torch.equal(ck.owned_slice(b["state"][idx][key], lo, hi), want), (world, rank, idx, key)
        for idx, pstate in b["state"].items():  # world size 1: the whole tensors
            assert torch.equal(ck.materialize(pstate["exp_avg"]), a["state"][idx]["exp_avg"])


def _edit_index(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    index = json.loads((d / ck.OPTIMIZER_INDEX).read_text())
    edit(index)
    (d / ck.OPTIMIZER_INDEX).write_text(json.dumps(index))


def _split_entry(index: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in index["pieces"].values() if len(e["parts"]) > 1)


def _gap(d: Path) -> str:
    _edit_index(d, lambda index: _split_entry(index)["parts"].pop())
    return "end at element"


def _hole(d: Path) -> str:
    _edit_index(d, lambda index: _split_entry(index)["parts"].pop(0))
    return "no part of"


def _overlap(d: Path) -> str:
    def edit(index: dict[str, Any]) -> None:
        parts = _split_entry(index)["parts"]
        parts[1][0] -= 1
    _edit_index(d, edit)
    return "overlap"


def _wrong_size(d: Path) -> str:
    def edit(index: dict[str, Any]) -> None:
        parts = _split_entry(index)["parts"]
        parts[0][1] += 1
        parts[1][0] += 1
    _edit_index(d, edit)
    return "the index says"


def _not_in_weight_map(d: Path) -> str:
    def edit(index: dict[str, Any]) -> None:
        del index["weight_map"][_split_entry(index)["parts"][0][2]]
    _edit_index(d, edit)
    return "is not in its weight_map"


def _missing_rank_file(d: Path) -> str:
    (d / "optimizer-r00001-00001.safetensors").unlink()
    return "optimizer-r00001-00001.safetensors: file missing"


@pytest.mark.parametrize("damage", [_gap, _hole, _overlap, _wrong_size, _not_in_weight_map, _missing_rank_file])
def test_missing_or_overlapping_pieces_are_named(saved: dict[Any, Path], tmp_path: Path, damage: Callable[[Path], str]) -> None:
    d = tmp_path / "ck"
    shutil.copytree(saved[2] / "ok", d)
    expected = damage(d)
    with pytest.raises(ck.CheckpointCorruptError, match="damaged") as err:
        ck.load_sharded(d)
    assert expected in str(err.value)


def test_convert_and_export_hf_put_the_pieces_together(saved: dict[Any, Path], tmp_path: Path) -> None:
    out = ck.to_lightning_checkpoint(saved[3] / "ok", tmp_path / "one.ckpt")
    one = torch.load(out, weights_only=False)
    full = _full(saved)
    for idx, pstate in full["optimizer_states"][0]["state"].items():
        for key, v in pstate.items():
            assert type(one["optimizer_states"][0]["state"][idx][key]) is torch.Tensor
            assert torch.equal(one["optimizer_states"][0]["state"][idx][key], v)
    hf = ck.export_hf(saved[3] / "ok", tmp_path / "hf", prefix="blocks.")
    weights = ck.read_safetensors(hf / "model.safetensors")
    assert weights.keys() == {k[len("blocks."):] for k in full["state_dict"] if k.startswith("blocks.")}


def test_a_single_device_resumes_exactly_from_a_data_parallel_checkpoint(saved: dict[Any, Path]) -> None:
    """2 -> 1 through the strategy: the same training as resuming from the single-device checkpoint."""
    assert json.loads((saved["src"] / ck.META_FILE).read_text())["version"] == 1  # one device still writes version 1
    runs = []
    for path in (saved["src"], saved[2] / "ok"):
        L.seed_everything(0)
        model = BlockLM(dropout=0.0)
        trainer("megatrain", max_steps=12).fit(model, data(), ckpt_path=path)
        runs.append(model)
    assert len(runs[1].losses) == 6 and runs[1].losses == runs[0].losses
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)
