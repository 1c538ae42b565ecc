"""The memory plan for data parallel: per-node host figures (one shared copy plus each rank's private
1/N), per-rank GPU figures, the /dev/shm check, and the plan command line's --gpus-per-node/--nodes."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from models import HFLM

from lightning_megatrain.engine.collective import Collective
from lightning_megatrain.memory import MemoryPlanError, _fmt, plan_memory


def _plan(**kwargs: object):
    torch.manual_seed(0)
    model = HFLM("llama")
    layers = list(model.model.model.layers)
    opt = torch.optim.AdamW(model.parameters())
    defaults = dict(prefetch=1, optimizers=[opt], host_memory="fast", host_available=10**12, shm_free=10**12)
    defaults.update(kwargs)
    return plan_memory(model, layers, torch.bfloat16, torch.device("cpu"), **defaults)


def test_one_rank_is_the_single_device_plan() -> None:
    """ranks_per_node == nodes == 1 is today's plan, byte for byte and line for line."""
    default = _plan()
    explicit = _plan(ranks_per_node=1, nodes=1)
    assert str(default) == str(explicit)
    assert default.host == explicit.host and default.device == explicit.device
    assert not default.data_parallel and default.shm_free is None and not default.host_shared
    text = str(default)
    assert "per node" not in text and "per rank" not in text and "data parallel" not in text


@pytest.mark.parametrize("ranks, nodes", [(2, 1), (3, 1), (4, 2)])
def test_node_holds_one_shared_copy_and_each_rank_its_share(ranks: int, nodes: int) -> None:
    single = _plan()
    dp = _plan(ranks_per_node=ranks, nodes=nodes)
    assert dp.data_parallel and dp.ranks_per_node == ranks and dp.nodes == nodes
    # shared: one copy per node of the masters, gradients and compute copies (not N)
    shared = ("fp32 master weights", "fp32 gradients", "bfloat16 compute copies")
    assert dp.host_shared == {k: single.host[k] for k in shared}
    # private: 1/N of the optimizer state per rank
    state = dp.host_private[f"optimizer state, 1/{ranks} (est.)"]
    assert state == 8 * math.ceil(dp.trainable / ranks)
    assert state * ranks - single.host["optimizer state (estimate)"] < 8 * ranks
    staging = dp.host_private[f"gradient staging (1/{ranks})"]
    assert single.host["gradient staging"] / ranks <= staging < single.host["gradient staging"] / ranks + 64 * 4
    # the node: shared + N x private, not N copies of the state
    assert dp.host_total == dp.shm_needed + ranks * dp.host_private_per_rank
    assert abs(dp.host_total - single.host_total) < 64 * 4 * ranks
    # each GPU: whole layers in the slots, a 1/N shard per slot, whole gradient buffers
    slots = dp.device["weight slots (whole layers)"]
    assert single.device["weight slots"] <= slots < single.device["weight slots"] + 2 * 64 * ranks
    assert dp.device[f"weight shards (1/{ranks} per slot)"] * ranks == slots
    # the shard is the engine's: Collective.chunk of the largest layer image, per slot (prefetch 1: 2 slots)
    geometry = Collective(group=None, rank=0, size=ranks, world_size=ranks * nodes, world_rank=0)
    assert dp.device[f"weight shards (1/{ranks} per slot)"] == 2 * geometry.chunk(single.device["weight slots"] // 2)
    assert dp.device["gradient buffers (whole layers)"] >= single.device["gradient buffers"]
    assert dp.device["non-layer params and grads"] == single.device["non-layer params and grads"]
    # PCIe per rank: its 1/N of the single-device traffic (up to the padding)
    assert single.transfer_bytes() / ranks <= dp.transfer_bytes() < single.transfer_bytes() / ranks + 3 * 64 * 3 * 2
    assert dp.gather_bytes > 0 and (dp.internode_bytes > 0) == (nodes > 1)


def test_printout_shows_per_node_and_per_rank_figures() -> None:
    dp = _plan(ranks_per_node=4, nodes=2, shm_dir="/some/shm")
    text = str(dp)
    print(text)
    for line in (
        "data parallel: 2 nodes x 4 ranks (GPUs) per node",
        "host per node (",
        "with a GPU each rank page-locks",
        "shared by the node's 4 ranks, one copy in /some/shm:",
        "private to each rank:",
        "optimizer state, 1/4 (est.)",
        "GPU per rank (before activations",
        "weight shards (1/4 per slot)",
        "host link per rank and micro-batch:",
        "between nodes:",
        "fits: yes",
    ):
        assert line in text, line
    rows = dict(re.findall(r"^\s+(\S.*?)\s{2,}(\d+\.\d+ \w+|\d+ B)", text, re.M))
    assert rows["total per node"] == _fmt(dp.host_total)
    assert rows["shared, per node"] == _fmt(dp.shm_needed)
    assert rows["private, per rank"] == _fmt(dp.host_private_per_rank)
    assert rows["total per rank"] == _fmt(dp.device_total)


def test_check_compares_the_node_total_with_ram() -> None:
    dp = _plan(ranks_per_node=3)
    dp.host_in_use = 0
    dp.host_available = dp.host_total  # exactly enough for the node
    dp.check()
    dp.host_available = dp.host_total - 1
    assert not dp.fits()
    with pytest.raises(MemoryPlanError, match=r"more host memory per node \(.* shared by the node's 3 ranks, 3 x .* private"):
        dp.check()


def test_check_refuses_a_small_shared_memory_and_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dp = _plan(ranks_per_node=2, shm_free=None, shm_dir=None)
    assert dp.shm_dir == "/dev/shm" or not Path("/dev/shm").exists()
    monkeypatch.setenv("MEGATRAIN_SHM_DIR", str(tmp_path))
    dp = _plan(ranks_per_node=2, shm_free=None)
    assert dp.shm_dir == str(tmp_path)
    assert abs(dp.shm_free - shutil.disk_usage(tmp_path).free) < 2**30  # measured there
    dp.shm_free = dp.shm_needed
    dp.check()
    dp.shm_free = dp.shm_needed - 1
    assert not dp.fits()
    with pytest.raises(MemoryPlanError, match=rf"must fit in {tmp_path}, which has .* free") as err:
        dp.check()
    assert "/dev/shm" in str(err.value) and "MEGATRAIN_SHM_DIR" in str(err.value) and "--shm-size" in str(err.value)
    # a single device maps no shared memory: nothing to check
    single = _plan(shm_free=0)
    assert single.shm_free is None and single.fits()
    # nor does planning another machine (the table shows what /dev/shm must hold instead)
    dp.shm_free = None
    dp.check()


def test_bad_data_parallel_input_is_refused() -> None:
    # lean: each rank holds its 1/N of the optimizer state in bf16 (half of compact's), plus its own fp32 scratch
    lean, compact = _plan(host_memory="lean", ranks_per_node=2), _plan(host_memory="compact", ranks_per_node=2)
    assert 2 * lean.host_private["optimizer state, bf16, 1/2 (est.)"] == compact.host_private["optimizer state, 1/2 (est.)"]
    assert lean.host_private["fp32 scratch of 1/2 layer's state"] > 0 and lean.shm_needed == compact.shm_needed
    with pytest.raises(ValueError, match="ranks_per_node to be a positive int"):
        _plan(ranks_per_node=0)
    with pytest.raises(ValueError, match="nodes to be a positive int"):
        _plan(nodes=1.5)
    _plan(host_memory="lean")  # one device: as before


def test_plan_command_line_per_node_and_per_rank(capsys: pytest.CaptureFixture) -> None:
    from lightning_megatrain.plan import main, plan_for

    main(["--model", "llama-70b", "--host-gb", "2048", "--gpu-gb", "80", "--gpus-per-node", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "2 node(s) x 8 GPU(s) per node" in out and "nodes are replicas" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for mode in ("fast", "compact", "lean"):
        total, shared, per_rank, per_param, gpu = map(float, rows[mode][1:6])
        assert abs(total - (shared + 8 * per_rank)) < 0.5 and rows[mode][6] == "yes"
        plan = plan_for("llama-70b", mode, 2048 * 2**30, 80 * 2**30, 16384, ranks_per_node=8, nodes=2)
        assert abs(plan.host_total / 2**30 - total) < 0.06 and abs(plan.device_total / 2**30 - gpu) < 0.06
        assert abs(plan.shm_needed / 2**30 - shared) < 0.06 and plan.shm_free is None
        # per node: one copy of the state with AdamW (16-18 B/param; lean 12 and a little), whatever the number of ranks
        assert (12.0 <= per_param < 12.6) if mode == "lean" else (16.0 <= per_param < 18.5), (mode, per_param)
    # the single-device table is unchanged by the new flags' defaults
    main(["--model", "llama-8b", "--host-gb", "512", "--gpu-gb", "80"])
    assert "per node" not in capsys.readouterr().out
    for bad in (["--gpus-per-node", "0"], ["--nodes", "-1"]):
        with pytest.raises(SystemExit):
            main(["--model", "llama-8b", "--host-gb", "512", "--gpu-gb", "80", *bad])
