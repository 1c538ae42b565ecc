"""What ``MegaTrainStrategy`` does with checkpoints: save (one process or every rank), the background save in flight, removal, load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from .export import weights_source
from .format import FROZEN_KEY, CheckpointMismatchError
from .publish import remove_checkpoint as remove_checkpoint_dir
from .reader import Pieces, check_optimizer_state, check_state_dict
from ..engine.procs import pid_alive
from .writer import DistributedSave, ShardedSave, save_sharded_distributed

if TYPE_CHECKING:
    from ..strategy import MegaTrainStrategy


class _Progress:
    """A data-parallel background save's progress on the node's board (``DistributedSave``'s ``board``)."""

    def __init__(self, board: Any, timeout_s: float) -> None:
        self.node_board, self.timeout_s = board, timeout_s

    def publish(self, value: int) -> None:
        self.node_board.publish("ckpt", value)

    def wait(self, value: int) -> None:
        self.node_board.wait_all("ckpt", value, self.timeout_s, "writing its part of the checkpoint")

    def gone(self, ranks: list[int]) -> Optional[str]:
        dead = [r for r in ranks if not pid_alive(int(self.node_board.table[r, 0]))]
        return f"local rank(s) {dead} died before writing their part of the checkpoint" if dead else None


@dataclass
class Shares:
    """What a data-parallel rank's optimizer state covers once its fit has ended: per optimizer (by id) the
    ``(lo, hi, shape)`` of each parameter in param_groups order, ``(lo, hi)`` by parameter id, its place."""

    owned: dict[int, list[tuple[int, int, tuple[int, ...]]]]
    elements: dict[int, tuple[int, int]]
    local_rank: int
    local_size: int
    node: int
    optimizers: list[Any]


class StrategyCheckpoints:
    """The checkpoint side of a :class:`~lightning_megatrain.MegaTrainStrategy`, which owns one and calls it
    from its Lightning hooks. It reads the strategy's options (``checkpoint_format``, ``async_checkpoint``,
    ...), runtime and collective when it runs, and holds the background save in flight (``saving``)."""

    def __init__(self, strategy: MegaTrainStrategy) -> None:
        self.strategy = strategy
        self.saving: Optional[ShardedSave] = None
        self.complete: Optional[Path] = None  # the newest checkpoint known complete (saved or loaded here)
        self.shares: Optional[Shares] = None  # data parallel, after fit: what this rank's optimizer state covers
        self.seq = 0  # data-parallel background saves started (the same count on every rank)

    # ------------------------------------------------------------------ saving
    def save(self, checkpoint: dict[str, Any], filepath: Any) -> bool:
        """Write ``checkpoint`` as a sharded directory (after the save in flight is done); False if the
        strategy writes single files, which Lightning's own ``save_checkpoint`` then does."""
        s = self.strategy
        self.finish_save()
        omit = self.frozen_to_omit()
        if omit and "state_dict" in checkpoint and not any(k in checkpoint["state_dict"] for k in omit):
            checkpoint[FROZEN_KEY] = {"names": sorted(omit), "source": weights_source(s.lightning_module)}
        if s.checkpoint_format == "single_file":
            return False
        collective = s.collective if s.runtime is not None and s.config.grads else None  # a fit's live shards
        if collective is None and s.is_distributed and dist.is_initialized():
            self._save_shares(checkpoint, Path(filepath))  # after fit: each rank's share, in optimizer.state
            return True
        if collective is not None:
            # data parallel: every rank writes its share into one directory (each rank holds only its
            # elements of the optimizer state); rank 0 writes the indexes and publishes it
            runtime: Any = s.runtime
            if "state_dict" in checkpoint:
                checkpoint = {**checkpoint, "state_dict": self._rank0_buffers(checkpoint["state_dict"])}
            if "optimizer_states" in checkpoint:
                checkpoint = {**checkpoint, "optimizer_states": [runtime.shard_optimizer_state(o) for o in s.optimizers]}
            owned = [[(*runtime.owned(p), tuple(p.shape)) for g in o.param_groups for p in g["params"]] for o in s.optimizers]
            runtime.wait()  # also the node's other ranks: their updates of the shared weights are done
            if s.async_checkpoint:
                self._start_distributed(checkpoint, Path(filepath), owned)
                return True
            save_sharded_distributed(
                checkpoint, Path(filepath), owned, local_rank=collective.rank, local_size=collective.size, node=collective.node,
                shard_bytes=s.checkpoint_shard_bytes, checksums=s.checkpoint_checksums,
            )
            return True
        if not s.is_global_zero:
            return True
        save = ShardedSave(
            checkpoint, Path(filepath), s.checkpoint_shard_bytes, checksums=s.checkpoint_checksums, **self._groups(checkpoint)
        )
        if s.async_checkpoint and s.runtime is not None:
            # held before the thread starts: a Ctrl-C during start() must still find it to wait for
            self.saving = save
            try:
                save.start()
            except Exception:
                self.saving = None
                raise
            s.runtime.gate = save.wait_group
        else:
            save.run()
            self.complete = save.target
        return True

    def keep_shares(self) -> None:
        """Data parallel, before a fit's runtime is detached: which elements of each parameter this rank owns,
        so that the share of the optimizer state it leaves in ``optimizer.state`` can be saved and read after
        fit (until a new fit starts)."""
        s = self.strategy
        runtime, collective = s.runtime, s.collective
        if runtime is None or collective is None or not s.config.grads:
            return
        self.shares = Shares(
            {id(o): runtime.owned_ranges(o) for o in s.optimizers},
            {id(p): runtime.owned(p) for o in s.optimizers for g in o.param_groups for p in g["params"]},
            collective.rank, collective.size, collective.node, list(s.optimizers),
        )

    def drop_shares(self) -> None:
        """A new fit starts: the previous fit's shares of the optimizer state are not the optimizers' any more."""
        shares, self.shares = self.shares, None
        if shares is not None:
            for optimizer in shares.optimizers:
                for p in [p for p in optimizer.state if id(p) in shares.elements]:
                    del optimizer.state[p]

    def owned(self, param: Tensor) -> tuple[int, int]:
        """The flat elements ``[lo, hi)`` of ``param`` whose optimizer state this rank holds (all on one device)."""
        s = self.strategy
        if s.runtime is not None and (s.config.grads or self.shares is None):
            return s.runtime.owned(param)
        if self.shares is not None:
            return self.shares.elements.get(id(param), (0, 0))
        return (0, param.numel())

    def _save_shares(self, checkpoint: dict[str, Any], filepath: Path) -> None:
        """Data parallel outside a fit: every rank writes the share of the optimizer state the last fit left it."""
        s, shares = self.strategy, self.shares
        owned = []
        for i, optimizer in enumerate(s.optimizers):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            ranges = shares.owned.get(id(optimizer)) if shares is not None else None
            if ranges is None or len(ranges) != len(params):
                if checkpoint.get("optimizer_states", [{}] * (i + 1))[i].get("state"):
                    raise RuntimeError(
                        "megatrain with several devices cannot save this optimizer's state: it was not stepped in this "
                        "strategy's last fit, so no rank knows which part it holds. Save during or right after that fit, "
                        "or save weights only with trainer.save_checkpoint(path, weights_only=True)."
                    )
                ranges = [(0, 0, tuple(p.shape)) for p in params]
            owned.append(ranges)
        if "state_dict" in checkpoint:
            checkpoint = {**checkpoint, "state_dict": self._rank0_buffers(checkpoint["state_dict"])}
        local = (shares.local_rank, shares.local_size, shares.node) if shares is not None else (s.local_rank, s.num_processes, s.node_rank)
        save_sharded_distributed(
            checkpoint, filepath, owned, local_rank=local[0], local_size=local[1], node=local[2],
            shard_bytes=s.checkpoint_shard_bytes, checksums=s.checkpoint_checksums,
        )

    def _start_distributed(self, checkpoint: dict[str, Any], filepath: Path, owned: list[Any]) -> None:
        """Data parallel ``async_checkpoint``: every rank starts writing its share in the background (see
        ``DistributedSave``); the node's optimizer updates of a layer wait until every rank has written it."""
        s, collective, runtime = self.strategy, self.strategy.collective, self.strategy.runtime
        assert collective is not None and runtime is not None
        self.seq += 1
        groups = self._groups({"state_dict": dict(checkpoint.get("state_dict", {}))})
        save = DistributedSave(
            checkpoint, filepath, owned, local_rank=collective.rank, local_size=collective.size, node=collective.node,
            seq=self.seq, board=_Progress(collective.board, collective.timeout_s), timeout_s=collective.timeout_s,
            shard_bytes=s.checkpoint_shard_bytes, checksums=s.checkpoint_checksums, **groups,
        )
        self.saving = save
        try:
            save.start()
        except Exception:
            self.saving = None
            raise
        runtime.gate = save.wait_group

    def _groups(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Which streamed layer each tensor belongs to, so a save can go layer by layer; buffers are
        copied now, since the next forward may change them (BatchNorm statistics)."""
        runtime = self.strategy.runtime
        if runtime is None:
            return {}
        unit_of = runtime.unit_of()
        model_groups = {}
        state_dict = checkpoint.get("state_dict", {})
        for name, t in list(state_dict.items()):
            if isinstance(t, Tensor):
                group = unit_of.get(t.data_ptr()) if t.numel() else 0
                if group is None:
                    state_dict[name] = t = t.clone()
                    group = 0
                model_groups[name] = group
        optimizer_groups = []
        for optimizer in self.strategy.optimizers:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            optimizer_groups.append({i: unit_of.get(p.data_ptr(), 0) for i, p in enumerate(params)})
        return {"model_groups": model_groups, "optimizer_groups": optimizer_groups}

    def _rank0_buffers(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """The state dict with rank 0's values of everything that is not a (shared) parameter: buffers are
        each rank's own, and whichever rank writes one must write rank 0's, as DDP's checkpoint holds. The
        ranks' live buffers are left as they are."""
        module = self.strategy.lightning_module
        assert module is not None
        shared = {p.data_ptr() for p in module.parameters() if p.numel()}
        out = dict(state_dict)
        for name, t in state_dict.items():
            if isinstance(t, Tensor) and t.numel() and t.data_ptr() not in shared:
                # (NCCL moves device tensors only)
                t = t.detach().to(self.strategy.root_device if dist.get_backend() == "nccl" else t.device, copy=True)
                dist.broadcast(t, src=0)
                out[name] = t
        return out

    def frozen_to_omit(self) -> set[str]:
        """State-dict names of frozen parameters a checkpoint leaves out (see ``checkpoint_frozen``)."""
        s = self.strategy
        module = s.lightning_module
        if module is None or s.checkpoint_frozen is True or not s.config.grads:
            return set()
        params = dict(module.named_parameters(remove_duplicate=False))
        frozen = {k for k, p in params.items() if not p.requires_grad}
        if s.checkpoint_frozen is None:
            unique = {id(p): p for p in params.values()}.values()
            if 2 * sum(p.numel() for p in unique if not p.requires_grad) <= sum(p.numel() for p in unique):
                return set()
        return frozen

    def without_frozen(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` without the frozen parameters a checkpoint leaves out."""
        omit = self.frozen_to_omit()
        return {k: v for k, v in state.items() if k not in omit} if omit else state

    # ------------------------------------------------------------------ the background save in flight, removal
    def remove(self, filepath: Any, remove_file: Callable[[Any], None]) -> None:
        """Delete an older checkpoint (``ModelCheckpoint``'s top-k rotation, ``save_last``) only once the
        save in flight is published, so a complete checkpoint exists at every moment; if that save
        fails, the older checkpoint stays. ``remove_file`` removes what is not a directory."""
        if not self.strategy.is_global_zero:
            return
        save = self.saving
        if save is not None:
            save.after_publish(lambda: self._remove_now(filepath, remove_file))
        else:
            self._remove_now(filepath, remove_file)

    def _remove_now(self, filepath: Any, remove_file: Callable[[Any], None]) -> None:
        if isinstance(filepath, (str, Path)) and Path(filepath).is_dir():
            remove_checkpoint_dir(filepath)  # renamed aside first: never seen half-deleted
        else:
            remove_file(filepath)

    def check_save(self) -> None:
        """Raise the failure of a background save that has ended (with its path and cause)."""
        save = self.saving
        if save is not None and save.done:
            self.finish_save()

    def finish_save(self) -> None:
        """Wait for the background save in flight, and raise its failure."""
        save = self.saving
        if save is None:
            return
        # keep the reference until the write has ended: a Ctrl-C that cuts this wait short leaves it for
        # on_exception/teardown to wait for again, instead of abandoning a half-written checkpoint
        save.join()
        self.saving = None
        runtime = self.strategy.runtime
        if runtime is not None and runtime.gate == save.wait_group:
            runtime.gate = None
        save.wait()  # CheckpointWriteError naming the path and the cause
        self.complete = save.target

    def hold_links(self) -> None:
        """Links made to the checkpoint being written in the background (``ModelCheckpoint(save_last="link")``
        links right after ``save_checkpoint`` returns) name the newest complete checkpoint until it is published."""
        save = self.saving
        if save is not None and self.strategy.is_global_zero:
            save.hold_links(self.complete)

    def loaded(self, path: Any) -> None:
        """``path`` was loaded whole: the complete checkpoint links are held at while a save is in flight."""
        if isinstance(path, (str, Path)) and Path(path).is_dir():
            self.complete = Path(os.path.realpath(path))

    # ------------------------------------------------------------------ loading
    def load_model_state(self, checkpoint: Mapping[str, Any], strict: bool) -> Optional[Mapping[str, Any]]:
        """Check the checkpoint's weights (and, when fitting, its optimizer state) against the model before
        anything changes; in data parallel load this rank's elements and return None, else return the
        checkpoint for Lightning's own ``load_model_state_dict`` (frozen weights it left out filled in)."""
        s = self.strategy
        module = s.lightning_module
        assert module is not None
        expected = module.state_dict()
        omitted = checkpoint.get(FROZEN_KEY)
        if omitted:
            # the checkpoint left out frozen base weights: they are the module's own (rebuilt from their source)
            params = dict(module.named_parameters(remove_duplicate=False))
            bad = [n for n in omitted["names"] if n not in params or params[n].requires_grad]
            if bad:
                raise CheckpointMismatchError(
                    f"the checkpoint left out frozen parameters that are not frozen parameters of this model: {bad[:10]}. "
                    "Freeze the same parameters as the run that saved it."
                )
            expected = {k: v for k, v in expected.items() if k not in set(omitted["names"])}
            rank_zero_info(
                f"megatrain: the checkpoint holds no frozen base weights ({len(omitted['names'])} tensors); keeping the "
                f"model's own (saved from: {omitted.get('source') or 'unknown'})."
            )
        check_state_dict(expected, checkpoint["state_dict"], strict=strict)
        if omitted:
            checkpoint = {**checkpoint, "state_dict": {**module.state_dict(), **checkpoint["state_dict"]}}
        try:
            trainer: Optional[pl.Trainer] = module.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and s.lightning_restore_optimizer:
            # Lightning loads the optimizer state after the weights: refuse a mismatch before either changes
            for optimizer, state in zip(s.optimizers, checkpoint.get("optimizer_states", [])):
                check_optimizer_state(optimizer, state)
        if s.collective is not None and s.runtime is not None:
            self._load_owned(checkpoint["state_dict"])
            return None
        return checkpoint

    def _load_owned(self, state_dict: Mapping[str, Any]) -> None:
        """Data parallel: the parameters are the node's shared memory; each rank writes the elements it
        owns (buffers are each rank's own), then waits until the node's ranks have all written theirs."""
        module, runtime = self.strategy.lightning_module, self.strategy.runtime
        assert module is not None and runtime is not None
        params = dict(module.named_parameters(remove_duplicate=False))
        rest = {}
        with torch.no_grad():
            for name, value in state_dict.items():
                p = params.get(name)
                if p is None:
                    rest[name] = value
                    continue
                lo, hi = runtime.owned(p)
                if hi > lo:
                    p.view(-1)[lo:hi].copy_(value.reshape(-1)[lo:hi])
        if rest:
            module.load_state_dict(rest, strict=False)
        collective = self.strategy.collective
        collective.board.barrier(collective.timeout_s, "loading the checkpoint's weights")

    def load_optimizer_states(self, checkpoint: Mapping[str, Any]) -> None:
        """The checkpoint's optimizer state into the optimizers, on the host (data parallel: each rank its elements)."""
        s = self.strategy
        states = checkpoint["optimizer_states"]
        for optimizer, state in zip(s.optimizers, states):
            check_optimizer_state(optimizer, state)
        if s.runtime is not None and s.collective is not None:
            # data parallel: each rank takes the elements it owns (from Pieces or from full tensors)
            for optimizer, state in zip(s.optimizers, states):
                s.runtime.load_shard_optimizer_state(optimizer, state)  # type: ignore[union-attr]
            return
        for optimizer, state in zip(s.optimizers, states):
            # own memory for each state tensor (the shards are memory-mapped read-only files); state that
            # data-parallel ranks wrote in pieces is put together whole
            state = {**state, "state": {k: {n: v.materialize() if isinstance(v, Pieces) else v.clone() if isinstance(v, Tensor) else v for n, v in pstate.items()} for k, pstate in state["state"].items()}}
            optimizer.load_state_dict(state)
            if s.runtime is not None:
                s.runtime.refresh_fused(optimizer)
