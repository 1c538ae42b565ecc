"""Data parallel glue for the strategy: the launcher, the process group, the collectives Lightning asks for, and making every rank fail together."""

from __future__ import annotations

import atexit
import logging
import os
import time
from datetime import timedelta
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment

# The launchers Lightning's own DDPStrategy uses (``devices=N`` starts N-1 more processes, or spawns
# N). Lightning exports them only under these private names and has no public alternative.
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from torch import Tensor
from torch.optim import Optimizer

log = logging.getLogger(__name__)


# Optimizers whose update of an element reads only that element's gradient, state and hyperparameters:
# in data parallel each rank steps only its own slice of every parameter (its shard), so an optimizer
# that looks at whole tensors (norms, factored second moments, orthogonalisation) would compute
# something else. Exact classes: a subclass may change ``step``.
ELEMENTWISE_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.RMSprop, torch.optim.Rprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.ASGD,
)


def check_elementwise_optimizer(optimizer: Optimizer) -> None:
    """Refuse, in data parallel, an optimizer whose update is not elementwise (see ``ELEMENTWISE_OPTIMIZERS``)."""
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"megatrain with several devices shards every parameter across the ranks and each rank steps only its "
            f"slice, so the optimizer must update each element from that element alone. {type(optimizer).__name__} "
            f"is not known to be elementwise; use one of {names}, or train on one device (devices=1)."
        )


# ------------------------------------------------------------------ processes
def make_launcher(strategy: pl.strategies.Strategy, checkpoint_format: str, start_method: str,
                  num_processes: int, num_nodes: int) -> Any:
    """The launcher of a data-parallel run, once Lightning knows the devices and nodes: the earliest point
    to refuse options data parallel does not support, before any process starts or anything is allocated."""
    if checkpoint_format != "sharded":
        raise ValueError(
            "checkpoint_format='single_file' is not supported with several devices: each rank holds only its "
            "share of the optimizer state, which a single file written by rank 0 would lose. Use the default "
            "checkpoint_format='sharded' (convert it to one file afterwards: python -m lightning_megatrain.checkpoint convert DIR OUT.ckpt)."
        )
    assert strategy.cluster_environment is not None
    if start_method == "popen":
        return _SubprocessScriptLauncher(strategy.cluster_environment, num_processes, num_nodes)
    return _MultiProcessingLauncher(strategy, start_method=start_method)


def join_process_group(
    environment: Optional[ClusterEnvironment], backend: Optional[str], device: torch.device, rank: int, world_size: int,
    timeout: Optional[timedelta], num_processes: int, num_nodes: int,
) -> str:
    """Join (or start) the default process group; its backend. Refuses a group of another size."""
    if not dist.is_initialized():
        assert environment is not None
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        log.info("megatrain: initializing torch.distributed (%s), rank %d of %d", backend, rank, world_size)
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        if backend == "nccl":
            atexit.register(_destroy_process_group)  # as Lightning does: torch warns about NCCL groups left
    backend = dist.get_backend()
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"torch.distributed has {dist.get_world_size()} ranks, but Trainer(devices={num_processes}, "
            f"num_nodes={num_nodes}) makes {world_size}; launch one process per device."
        )
    return backend


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ communication (the process group is up)
def barrier(device: torch.device) -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_reduce(tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Tensor:
    """Sum or mean (default) of ``tensor`` over the ranks, in new memory."""
    mean = reduce_op is None or (isinstance(reduce_op, str) and reduce_op.lower() in ("mean", "avg"))
    if isinstance(reduce_op, str) and not mean:
        op = getattr(dist.ReduceOp, reduce_op.upper())
    elif mean or reduce_op == dist.ReduceOp.AVG:
        op, mean = dist.ReduceOp.SUM, True  # gloo has no AVG
    else:
        op = reduce_op
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    if mean:
        n = dist.get_world_size(group)
        out = out / n if not torch.is_floating_point(out) else out.div_(n)
    return out


class AgreedRefusal(ValueError):
    """A refusal every rank raises together, decided from facts a collective gave all of them alike (the
    ranks' batch counts). No rank failed, so nothing is torn down: the process group and the other ranks
    stay as they were, and the caller may catch it on every rank and go on, as with one device."""


def check_same_batches(dataloader: Any) -> None:
    """Every forward all-gathers each layer, so every rank must run the same number of batches: refuse,
    before the loop, a loader that gives ranks different numbers (e.g. ``trainer.predict``, whose sampler
    does not pad)."""
    try:
        n = len(dataloader)
    except TypeError:  # an iterable dataset: its length is the user's to keep equal
        n = -1
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    if len(set(counts)) > 1:  # every rank saw the same counts: every rank raises this, together
        raise AgreedRefusal(
            f"with several devices megatrain needs the same number of batches on every rank (each forward "
            f"is a collective), but the ranks got {counts}. Make the dataset size a multiple of the world size "
            "times the batch size (trainer.predict does not pad), or run it with devices=1."
        )


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP's default ``broadcast_buffers=True`` does."""
    for b in module.buffers():
        dist.broadcast(b, src=0)


# ------------------------------------------------------------------ failures
def fail_distributed(collective: Any, exception: BaseException, rank: int) -> None:
    """Make every rank fail now, naming the first one that failed.

    A rank that fails first marks itself failed on its node's board (ranks of the node waiting on
    host work see it at once) and tears its process group down, so peers blocked in a collective get
    an error instead of waiting for the timeout. A rank that fails because of another (a collective
    broke under it) adds that rank's name to its own error instead.
    """
    board = getattr(collective, "board", None)
    cause = None
    if board is not None:
        if _looks_collective(exception):
            # a collective broke under this rank: name the rank that failed first, which marks itself
            # before its process group goes (give it a moment)
            deadline = time.monotonic() + 2.0
            while cause is None and time.monotonic() < deadline:
                cause = _failed_peer(board, collective)
                if cause is None:
                    time.sleep(0.05)
        if cause is None and _looks_collective(exception):
            # no rank of this node failed first: the cause is elsewhere (a rank on another node, the
            # network); say so, and do not let this node's other ranks blame this one
            board.mark_failed(board.STOPPED)
            cause = (
                "a collective with the other ranks failed and no rank of this node failed first: a rank on another "
                "node may have (see its log), or the network"
            )
        elif cause is None:
            board.mark_failed(board.FAILED)  # this rank's own error: the others name it
        else:
            board.mark_failed(board.STOPPED)
    if cause is not None:
        _add_to_message(exception, f"megatrain: {cause}")
        log.error("megatrain: rank %d stops: %s", rank, cause)
    else:
        log.error("megatrain: rank %d failed (%s: %s); stopping the other ranks", rank, type(exception).__name__, exception)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()  # peers blocked in a collective with this rank error out now
        except Exception as err:  # noqa: BLE001 - the exception being handled is the one to report
            log.debug("destroying the process group after a failure: %s", err)


def _looks_collective(exception: BaseException) -> bool:
    """Whether the error came from a collective or a wait on other ranks (so another rank may be the cause)."""
    from .engine.collective import CollectiveError

    if isinstance(exception, (CollectiveError, getattr(dist, "DistError", CollectiveError))):
        return True
    text = str(exception).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))


def _failed_peer(board: Any, collective: Any) -> Optional[str]:
    """A sentence naming a rank of this node that failed or died, or None."""
    from .engine.collective import CollectiveError

    for r in range(collective.size):
        try:
            board.check([r], what="the other ranks", blame_only=True)
        except CollectiveError as err:
            return f"rank {collective.node * collective.size + r} failed first: {err}"
    return None


def _add_to_message(exception: BaseException, note: str) -> None:
    """Put ``note`` in front of the exception's message (what the user sees and logs)."""
    if exception.args and isinstance(exception.args[0], str):
        exception.args = (f"{note}\n{exception.args[0]}", *exception.args[1:])
    elif hasattr(exception, "add_note"):
        exception.add_note(note)
