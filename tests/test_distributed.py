"""Data parallel (issue 12): ``Trainer(strategy="megatrain", devices=K)`` against ``strategy="ddp"``.

The launch tests start ``torchrun --nproc_per_node=K tests/dist_worker.py`` (K = 2 and 3: 3 makes uneven
shards) once per K, and every scenario runs in that one launch; see tests/dist_worker.py for what each
rank records. The other tests need no second process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_megatrain import MegaTrainPrecision, MegaTrainStrategy
from lightning_megatrain.strategy import _add_to_message, check_elementwise_optimizer
from models import BlockLM, data, trainer

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
SCENARIOS = ("auto", "clip_value", "manual", "batchnorm")
# tests/models.py assert_same_training's rtol; atol 1e-5 rather than 1e-6: the gradient is summed in another
# order than DDP's all-reduce (reduce-scatter, then / world size), and Adam turns that rounding on a near-zero
# gradient into up to ~1e-6 of a weight (seen: 1.6e-6 on one element of 2048, 3 ranks, lr 1e-2 = 1e3 x that)
RTOL, ATOL = 1e-5, 1e-5


def launch(k: int, scenarios: str, out: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # fault runs: the agent checks its workers every 5 s, so a failing rank's peers end by their own error
    # (what the fault tests read) before the agent would stop them
    monitor = ["--monitor-interval=5"] if "fault" in scenarios else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *monitor, f"--nproc_per_node={k}",
           str(WORKER), scenarios, str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    k = request.param
    out = tmp_path_factory.mktemp(f"dp{k}")
    proc, _ = launch(k, ",".join((*SCENARIOS, "refusals")), out, timeout=300)
    assert proc.returncode == 0, f"the {k}-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = {s: [torch.load(out / f"{s}-rank{r}.pt", weights_only=False) for r in range(k)] for s in SCENARIOS}
    refusals = [(out / f"refusals-rank{r}.txt").read_text() for r in range(k)]
    return {"k": k, "results": results, "refusals": refusals, "out": out}


# ------------------------------------------------------------------ the launch itself (no engine work needed)
def test_launch_process_group_and_sampler(run: dict[str, Any]) -> None:
    k = run["k"]
    for scenario, ranks in run["results"].items():
        for r, res in enumerate(ranks):
            facts = res["megatrain"]["facts"]
            assert facts["dist_initialized"] and facts["dist_world"] == k, (scenario, facts)
            assert facts["global_rank"] == r and facts["world_size"] == k, (scenario, facts)
            assert facts["collective"] == (r, k), (scenario, facts)  # the engine's node group: local rank r of k
            assert facts["sampler"] == "DistributedSampler", (scenario, facts)
            # each rank got the same share of every global batch as under strategy="ddp"
            assert res["megatrain"]["samples"] == res["ddp"]["samples"], (scenario, r)
            # same weights and data before the first update: the first micro-batch's loss is the same
            torch.testing.assert_close(res["megatrain"]["losses"][0], res["ddp"]["losses"][0], rtol=RTOL, atol=ATOL)
        firsts = [tuple(map(tuple, res["megatrain"]["samples"][:2])) for res in ranks]
        assert len(set(firsts)) == k, f"{scenario}: ranks saw the same samples: {firsts}"


# ------------------------------------------------------------------ exactness (needs the engine's data parallel)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_training_as_ddp(run: dict[str, Any], scenario: str) -> None:
    """Losses of each rank's micro-batches, gradient norms seen in on_before_optimizer_step and final weights
    on every rank equal plain DDP's with the same global batch (accumulation, clipping by norm and by value,
    a step LR schedule, manual optimization)."""
    for r, res in enumerate(run["results"][scenario]):
        plain, mega = res["ddp"], res["megatrain"]
        assert len(plain["losses"]) > 0 and len(mega["losses"]) == len(plain["losses"]), (scenario, r)
        torch.testing.assert_close(torch.tensor(mega["losses"]), torch.tensor(plain["losses"]), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{scenario} rank {r} losses: {m}")
        assert len(mega["norms"]) == len(plain["norms"]) > 0, (scenario, r)
        torch.testing.assert_close(torch.tensor(mega["norms"]), torch.tensor(plain["norms"]), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{scenario} rank {r} gradient norms: {m}")
        assert mega["params"].keys() == plain["params"].keys()
        for name, p in plain["params"].items():
            torch.testing.assert_close(mega["params"][name], p, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{scenario} rank {r} {n}: {m}")
        # validation inside the fit (clip_value): the same logged loss as DDP on each rank
        assert (mega["val_loss"] is None) == (plain["val_loss"] is None) == (scenario != "clip_value"), (scenario, r)
        if plain["val_loss"] is not None:
            torch.testing.assert_close(mega["val_loss"], plain["val_loss"], rtol=RTOL, atol=ATOL)
        # buffers too (BatchNorm statistics: rank 0's at the start of every step, as DDP broadcasts them)
        assert mega["buffers"].keys() == plain["buffers"].keys()
        for name, b in plain["buffers"].items():
            torch.testing.assert_close(mega["buffers"][name], b, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{scenario} rank {r} buffer {n}: {m}")


@pytest.mark.parametrize("scenario", ["auto", "clip_value"])  # AdamW (2 states per element), SGD momentum (1)
def test_optimizer_state_is_sharded(run: dict[str, Any], scenario: str) -> None:
    """Each rank holds optimizer state for about 1/K of the elements, and the ranks together exactly one copy."""
    k, ranks = run["k"], run["results"][scenario]
    total = ranks[0]["ddp"]["facts"]["state_numel"]  # DDP: every rank holds all of it
    assert total >= ranks[0]["ddp"]["facts"]["trainable_numel"] > 0
    shares = [res["megatrain"]["facts"]["state_numel"] for res in ranks]
    assert all(res["megatrain"]["facts"].get("shard_api") for res in ranks), "runtime.shard_optimizer_state is missing"
    assert sum(shares) == total, f"{scenario}: ranks hold {shares}, together {sum(shares)}, one copy is {total}"
    for r, share in enumerate(shares):
        assert abs(share - total / k) <= 0.05 * total / k, f"{scenario}: rank {r} holds {share} of {total} ({k} ranks)"


def test_checkpoint_holds_rank_0s_buffers(run: dict[str, Any]) -> None:
    """Buffers are each rank's own: a data parallel checkpoint (whichever rank writes a tensor) holds rank 0's
    BatchNorm statistics, as DDP's checkpoint (written by rank 0) does."""
    from lightning_megatrain.checkpoint import load_sharded

    out = run["out"]
    mega = load_sharded(out / "mega")["state_dict"]
    ddp = torch.load(out / "ddp.ckpt", weights_only=False)["state_dict"]
    names = [n for n in ddp if n.startswith("bn.running")]
    assert names, list(ddp)
    for name in names:
        torch.testing.assert_close(mega[name], ddp[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_refused_at_run_time(run: dict[str, Any]) -> None:
    """A training checkpoint after fit is written with the optimizer state of every parameter (each rank its
    share, as with one device); a weights-only one is written; predict with a different number of batches per rank is refused before it
    starts (every forward is a collective) instead of hanging."""
    for r, seen in enumerate(run["refusals"]):
        assert any(line.startswith("after-fit: saved, optimizer state of ") and not line.endswith(" 0 parameters") for line in seen.splitlines()), (r, seen)
        assert "weights-only: True" in seen, (r, seen)
        assert "predict: AgreedRefusal: with several devices megatrain needs the same number of batches" in seen, (r, seen)
        # a refusal stops no rank: the process group is intact on every rank, and the same Trainer predicts
        # again on a loader the ranks can share
        k = run["k"]
        assert f"after the refusal: group True, all_reduce {k * (k + 1) // 2}" in seen, (r, seen)
        assert "predict after the refusal: 1 batches" in seen, (r, seen)


# ------------------------------------------------------------------ faults
def test_a_failing_rank_stops_every_rank(tmp_path: Path) -> None:
    """Rank 1 raises in training_step at step 3: both processes end non-zero promptly, rank 0's error names
    rank 1, and the checkpoint saved at step 2 loads."""
    from lightning_megatrain.checkpoint import load_sharded

    proc, seconds = launch(2, "fault", tmp_path, timeout=120)
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode != 0, log
    assert seconds < 60, f"took {seconds:.0f} s\n{log}"
    err1 = (tmp_path / "fault-rank1.err").read_text()
    assert "fails on purpose" in err1, err1
    err0 = (tmp_path / "fault-rank0.err").read_text()  # rank 0 ended by its own error (not killed by torchrun)
    assert "rank 1 failed first" in err0, err0
    saved = sorted((tmp_path / "ckpt").iterdir())
    assert saved, "no checkpoint was written before the failure"
    checkpoint = load_sharded(saved[0])
    assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]


def test_a_killed_rank_stops_every_rank(tmp_path: Path) -> None:
    """Rank 1 is killed with SIGKILL mid-training under Lightning's own launcher (no torchrun agent to clean
    up): the run ends promptly, non-zero, and what rank 0 reports names the dead rank (its pid)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        env.pop(var, None)
    env["LOCAL_WORLD_SIZE"] = "2"  # read by the worker script only
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_worker.py"), "kill", str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode != 0, log
    assert seconds < 60, f"took {seconds:.0f} s\n{log}"
    pid = (tmp_path / "rank1.pid").read_text()
    err0 = tmp_path / "kill-rank0.err"
    said = (err0.read_text() if err0.exists() else "") + log
    assert f"rank 1 failed first: local rank 1 (pid {pid}) is gone" in said, said


def test_peer_error_names_the_rank_that_failed(tmp_path: Path) -> None:
    """The fault bookkeeping without processes: a rank whose collective broke names the rank marked failed."""
    from lightning_megatrain.engine.collective import NodeBoard

    path = str(tmp_path / "board")
    board0 = NodeBoard(path, 0, 2, create=True)
    board1 = NodeBoard(path, 1, 2, create=False)
    strategy = trainer("megatrain", devices=2).strategy
    assert isinstance(strategy, MegaTrainStrategy)

    def collective(board: NodeBoard) -> SimpleNamespace:
        return SimpleNamespace(board=board, node=0, size=2, rank=board.rank)

    strategy.config.collective = collective(board1)  # type: ignore[attr-defined]
    own = ValueError("bad batch")
    strategy._fail_distributed(own)
    assert str(own) == "bad batch"  # its own error is left as it is
    assert int(board1.table[1, 3]) == 1  # and marked failed for the others

    strategy.config.collective = collective(board0)  # type: ignore[attr-defined]
    broken = RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    strategy._fail_distributed(broken)
    assert str(broken).startswith("megatrain: rank 1 failed first") and "Connection closed" in str(broken)
    assert int(board0.table[0, 3]) == NodeBoard.STOPPED  # not the cause: marked stopped, never blamed

    # a collective broke and no rank of this node failed first (a rank on another node did): nobody is blamed
    board1.table[1, 3] = NodeBoard.STOPPED
    strategy.config.collective = collective(board0)  # type: ignore[attr-defined]
    elsewhere = RuntimeError("Connection closed by peer [10.0.0.2]:1234")
    strategy._fail_distributed(elsewhere)
    assert "no rank of this node failed first" in str(elsewhere) and "rank 1 failed" not in str(elsewhere)
    assert strategy.config.collective is None  # type: ignore[attr-defined]


def test_add_to_message() -> None:
    err = RuntimeError("boom", 3)
    _add_to_message(err, "note")
    assert err.args == ("note\nboom", 3)


# ------------------------------------------------------------------ one device is unchanged; options
class _Seen(Callback):
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.sampler = type(trainer.train_dataloader.sampler).__name__


def test_one_device_starts_nothing() -> None:
    before = dict(os.environ)
    seen = _Seen()
    t = trainer("megatrain", callbacks=[seen], max_steps=2)
    strategy = t.strategy
    assert isinstance(strategy, MegaTrainStrategy)
    assert not strategy.is_distributed and strategy.launcher is None
    assert (strategy.world_size, strategy.global_rank, strategy.local_rank, strategy.is_global_zero) == (1, 0, 0, True)
    t.fit(BlockLM(), data())
    assert seen.sampler != "DistributedSampler"
    assert not dist.is_initialized()
    assert dict(os.environ) == before
    assert strategy.reduce(torch.tensor(2.0)) == 2.0 and strategy.broadcast(5) == 5


def test_one_device_ignores_ranks_around_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. a single-device run inside a torchrun job: rank 0 of 1 on the device it was given
    monkeypatch.setenv("LOCAL_RANK", "1")
    strategy = trainer("megatrain").strategy
    assert (strategy.local_rank, strategy.global_rank, strategy.world_size) == (0, 0, 1)
    assert strategy.root_device == torch.device("cpu")


def test_devices_configure_data_parallel_without_starting_it() -> None:
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    t = trainer("megatrain", devices=3)
    strategy = t.strategy
    assert isinstance(strategy, MegaTrainStrategy) and strategy.is_distributed
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 3, "rank": 0}
    assert len(strategy.parallel_devices) == 3 and strategy.root_device == torch.device("cpu")
    assert not dist.is_initialized()

    t = trainer(MegaTrainStrategy(start_method="spawn"), devices=2, num_nodes=2)
    assert isinstance(t.strategy.launcher, _MultiProcessingLauncher)
    assert t.strategy.num_nodes == 2 and t.strategy.distributed_sampler_kwargs["num_replicas"] == 4


def test_single_file_refused_with_several_devices() -> None:
    trainer(MegaTrainStrategy(checkpoint_format="single_file"))  # one device: fine
    with pytest.raises(ValueError, match="not supported with several devices"):
        trainer(MegaTrainStrategy(checkpoint_format="single_file"), devices=2)


def test_async_checkpoint_with_several_devices_is_accepted() -> None:
    # each rank writes in the background (tests/test_checkpoint_dp_resume.py runs it)
    t = trainer(MegaTrainStrategy(async_checkpoint=True), devices=2)
    assert t.strategy.launcher is not None and t.strategy.async_checkpoint


def test_elementwise_optimizers_only() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    for opt in (torch.optim.AdamW(p), torch.optim.Adam(p), torch.optim.SGD(p, lr=0.1), torch.optim.RMSprop(p)):
        check_elementwise_optimizer(opt)

    class Lamb(torch.optim.AdamW):  # a subclass may look at whole tensors in step()
        pass

    for opt in (torch.optim.LBFGS(p), Lamb(p)):
        with pytest.raises(ValueError, match="not known to be elementwise"):
            check_elementwise_optimizer(opt)


def test_clipping_goes_to_the_runtime_in_data_parallel() -> None:
    """Gradients are node-shared views: clipping must be the runtime's (global norm, own range), not torch's
    in place on every rank."""
    calls: list[Any] = []
    runtime = SimpleNamespace(
        collective=object(),
        wait=lambda: calls.append("wait"),  # the host has added every gradient before clipping reads them
        clip_grad_norm_=lambda params, v: calls.append(("norm", len(params), v)),
        clip_grad_value_=lambda params, v: calls.append(("value", len(params), v)),
    )
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    opt = torch.optim.SGD([p], lr=0.1)
    plugin = MegaTrainPrecision()
    plugin.runtime = runtime  # type: ignore[assignment]
    plugin.clip_grad_by_norm(opt, 1.0)
    plugin.clip_grad_by_value(opt, 0.5)
    assert calls == ["wait", ("norm", 1, 1.0), "wait", ("value", 1, 0.5)]
    assert torch.equal(p.grad, torch.full((3,), 10.0))  # untouched here

    plugin.runtime = SimpleNamespace(collective=None, wait=lambda: None)  # type: ignore[assignment]
    plugin.clip_grad_by_value(opt, 0.5)  # one device: torch's, as before
    assert torch.equal(p.grad, torch.full((3,), 0.5))
