"""One process of a data-parallel test run (tests/test_distributed.py launches it).

    python -m torch.distributed.run --standalone --nproc_per_node=K tests/dist_worker.py SCENARIOS OUTDIR

SCENARIOS is a comma-separated list (see ``SCENARIOS`` below). For each, the process trains the same model,
data and seed with plain ``strategy="ddp"`` and with ``strategy="megatrain"`` (fp32, ``devices=K`` on the
CPU, gloo) and writes what it saw to ``OUTDIR/<scenario>-rank<r>.pt``: per strategy the losses of its
micro-batches, the gradient norm seen in ``on_before_optimizer_step``, the first token of every sample it
got, the final parameters, the elements of optimizer state it holds, and facts about the launch. The
``fault`` scenario has rank 1 raise in ``training_step`` at step 3; every rank writes its error to
``OUTDIR/fault-rank<r>.err``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/models.py

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import lightning_megatrain  # noqa: E402,F401  (registers "megatrain")
from lightning_megatrain import MegaTrainStrategy  # noqa: E402
from lightning_megatrain import checkpoint as ck  # noqa: E402
from models import HFLM, BlockLM, SameKernel, data, is_megatrain  # noqa: E402


class ManualBlockLM(BlockLM):
    """Manual optimization: accumulate two micro-batches, clip by norm, step, schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        loss = self.loss(batch)
        self.losses.append(loss.item())
        self.manual_backward(loss / 2)
        if (batch_idx + 1) % 2 == 0:
            self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
            sched.step()
        return loss


class BatchNormLM(BlockLM):
    """A BatchNorm on the embeddings: under DDP every rank starts each step from rank 0's running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        # gain after the norm: BatchNorm(gain * x) does not depend on gain, whose gradient is then rounding
        # noise that Adam scales up to lr-sized steps (a comparison of noise: 5e-5 off with the fused kernel)
        x = self.bn(self.emb(idx).transpose(1, 2)).transpose(1, 2) * self.gain
        mask = torch.ones(idx.shape, device=idx.device)
        for block in self.blocks:
            x = block(x, scale=0.5, mask=mask)
        return self.head(self.norm(x))


class FailingBlockLM(BlockLM):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 3 and self.trainer.global_rank == 1:
            raise RuntimeError("rank 1 fails on purpose at step 3")
        return super().training_step(batch, batch_idx)


class KilledBlockLM(BlockLM):
    """Rank 1 is killed (SIGKILL: no exception, no cleanup) at step 3."""

    out: Path = Path(".")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 3 and self.trainer.global_rank == 1:
            (self.out / "rank1.pid").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)


class SaveAtEnd(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class Probe(Callback):
    """What each rank saw: its samples, its optimizer state, the launch."""

    def __init__(self) -> None:
        self.samples: list[list[int]] = []
        self.facts: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        self.facts.update(
            dist_initialized=dist.is_initialized(),
            dist_world=dist.get_world_size() if dist.is_initialized() else 1,
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            sampler=type(getattr(loader, "sampler", None)).__name__,
            pid=os.getpid(),
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.samples.append(batch[0][:, 0].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        runtime = getattr(strategy, "runtime", None)
        state_numel = 0
        for opt in trainer.optimizers:
            if runtime is not None and hasattr(runtime, "shard_optimizer_state"):
                state = runtime.shard_optimizer_state(opt)["state"]
                values = [(k, v) for s in state.values() for k, v in s.items()]
                self.facts["shard_api"] = True
            else:  # before the engine shards: what this rank's optimizer holds
                values = [(k, v) for s in opt.state.values() for k, v in s.items()]
                self.facts["shard_api"] = False
            state_numel += sum(v.numel() for k, v in values if isinstance(v, torch.Tensor) and k != "step")
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        collective = getattr(strategy, "collective", None)
        self.facts.update(
            state_numel=state_numel,
            trainable_numel=trainable,
            collective=(collective.rank, collective.size) if collective is not None else None,
            launcher=type(strategy.launcher).__name__ if strategy.launcher is not None else None,
        )


def fit(make: Callable[[], BlockLM], strategy: Any, k: int, **kwargs: Any) -> dict[str, Any]:
    L.seed_everything(0)
    model = make()
    probe = Probe()
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=k, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[probe],
    )
    validate = kwargs.pop("validate", False)
    save_at_end = kwargs.pop("save_at_end", None)
    if save_at_end is not None:  # a checkpoint written in on_train_end, named after the strategy
        options["callbacks"] = [probe, SaveAtEnd(Path(save_at_end) / ("mega" if not isinstance(strategy, str) or strategy == "megatrain" else "ddp.ckpt"))]
    options.update(kwargs)
    if not is_megatrain(strategy):  # DDP steps with the fused CPU kernel megatrain picks: like with like
        options["callbacks"] = [*options["callbacks"], SameKernel()]
    trainer = L.Trainer(strategy=strategy, **options)
    # validation at the end of each epoch (an epoch is 6 / k steps): forwards on every rank, in the fit
    trainer.fit(model, data(n=24, batch_size=4), data(n=8 * k, batch_size=4, seed=7) if validate else None)
    val = trainer.callback_metrics.get("val_loss")
    return {
        "val_loss": None if val is None else float(val),
        "losses": model.losses,
        "norms": model.norms,
        "samples": probe.samples,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "facts": {**probe.facts, "dist_initialized_after": dist.is_initialized()},
    }


def llama() -> HFLM:
    return HFLM("llama", layers=2)


def sgd_blocks() -> BlockLM:
    model = BlockLM(d=32)
    model.opt_name = "sgd"
    return model


# scenario -> (model, megatrain first?, Trainer options); megatrain runs first in "auto" so that it starts the
# process group itself (and ends it); later scenarios find the group "ddp" left and must leave it.
SCENARIOS: dict[str, tuple[Callable[[], Any], bool, dict[str, Any]]] = {
    "auto": (llama, True, dict(accumulate_grad_batches=2, gradient_clip_val=0.5, max_steps=3)),
    "clip_value": (sgd_blocks, False, dict(gradient_clip_val=0.02, gradient_clip_algorithm="value", validate=True)),
    "manual": (ManualBlockLM, False, dict(max_steps=6)),
    "batchnorm": (BatchNormLM, False, dict(max_steps=3)),
}


def run_pair(name: str, k: int, out: Path) -> None:
    make, mega_first, kwargs = SCENARIOS[name]
    results: dict[str, Any] = {}
    order = ("megatrain", "ddp") if mega_first else ("ddp", "megatrain")
    for strategy in order:
        # the registry name once (as users write it), an instance otherwise
        strat: Any = strategy if strategy == "ddp" or name == "auto" else MegaTrainStrategy()
        start = time.perf_counter()
        extra = {"save_at_end": out} if name == "batchnorm" else {}
        results[strategy] = fit(make, strat, k, **kwargs, **extra)
        results[strategy]["seconds"] = time.perf_counter() - start
    torch.save(results, out / f"{name}-rank{dist.get_rank()}.pt")


def run_fault(k: int, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    try:
        L.seed_everything(0)
        model = FailingBlockLM()
        ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_top_k=-1)
        L.Trainer(
            strategy=MegaTrainStrategy(timeout=timedelta(seconds=30)), accelerator="cpu", devices=k, max_steps=8,
            logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt],
        ).fit(model, data(n=24, batch_size=2))
    except BaseException as err:
        (out / f"fault-rank{rank}.err").write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise
    (out / f"fault-rank{rank}.err").write_text("no error\n")


def run_refusals(k: int, out: Path) -> None:
    """A training checkpoint after fit (written from each rank's share of the optimizer state; weights only
    too), and what data parallel refuses at run time, with a message: a predict loader that gives ranks
    different numbers of batches."""
    seen = []
    L.seed_everything(0)
    model = BlockLM()
    trainer = L.Trainer(strategy=MegaTrainStrategy(), accelerator="cpu", devices=k, max_steps=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, data(n=24, batch_size=4))
    try:
        trainer.save_checkpoint(out / "after-fit")
        states = ck.load_sharded(out / "after-fit")["optimizer_states"][0]["state"]
        seen.append(f"after-fit: saved, optimizer state of {len(states)} parameters")
    except RuntimeError as err:
        seen.append(f"after-fit: {err}")
    trainer.save_checkpoint(out / "after-fit-weights", weights_only=True)
    seen.append(f"weights-only: {(out / 'after-fit-weights').exists()}")
    try:
        trainer.predict(model, data(n=k * 4 + 1, batch_size=4))  # one more sample than the ranks can share
        seen.append("predict: ran")
    except ValueError as err:
        seen.append(f"predict: {type(err).__name__}: {err}")
    # a refusal is no failure: the process group is still there and works, and the same Trainer predicts
    # on a loader the ranks can share (the other ranks were not stopped)
    try:
        alive = dist.is_initialized()
        total = torch.tensor([dist.get_rank() + 1]) if alive else torch.zeros(1)
        if alive:
            dist.all_reduce(total)
        seen.append(f"after the refusal: group {alive}, all_reduce {int(total.item())}")
        if alive:  # (without a group no new one can be made under torchrun: it would wait for good)
            batches = trainer.predict(model, data(n=k * 4, batch_size=4))
            seen.append(f"predict after the refusal: {len(batches)} batches")
    except Exception as err:  # noqa: BLE001 - recorded for the test to show
        seen.append(f"after the refusal: {type(err).__name__}: {err}")
    (out / f"refusals-rank{os.environ['RANK']}.txt").write_text("\n".join(seen))


def run_kill(k: int, out: Path) -> None:
    """Launched without torchrun (Lightning's own launcher starts the other ranks): rank 1 is killed."""
    L.seed_everything(0)
    model = KilledBlockLM()
    KilledBlockLM.out = out
    trainer = L.Trainer(
        strategy=MegaTrainStrategy(timeout=timedelta(seconds=30)), accelerator="cpu", devices=k, max_steps=8,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    try:
        trainer.fit(model, data(n=24, batch_size=2))
    except BaseException as err:
        (out / f"kill-rank{trainer.global_rank}.err").write_text(f"{type(err).__name__}: {err}")
        raise


def main() -> None:
    names, out = sys.argv[1].split(","), Path(sys.argv[2])
    k = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "2")))
    for name in names:
        if name == "fault":
            run_fault(k, out)
        elif name == "kill":
            run_kill(k, out)
        elif name == "refusals":
            run_refusals(k, out)
        else:
            run_pair(name, k, out)
    # leave together: a rank whose process exits while a peer is still finishing a collective with it can
    # make gloo abort that peer
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
