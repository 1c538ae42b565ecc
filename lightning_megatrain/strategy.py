"""Lightning glue: device resolution, setup, the step, checkpoint waits, teardown. The work is in ``engine``."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Generator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, Strategy

# The launchers Lightning's own DDPStrategy uses (``devices=N`` starts N-1 more processes, or spawns
# N). Lightning exports them only under these private names and has no public alternative.
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from .checkpoint import (
    DEFAULT_SHARD_BYTES,
    FROZEN_KEY,
    CheckpointMismatchError,
    Pieces,
    weights_source,
    ShardedSave,
    check_optimizer_state,
    check_state_dict,
    load_sharded,
    save_sharded_distributed,
)
from .checkpoint import remove_checkpoint as remove_checkpoint_dir
from .engine import Runtime, RuntimeConfig, check_optimizer
from .memory import HOST_MEMORY_MODES, choose_host_memory, plan_memory
from .placement import place_states
from .precision import MegaTrainPrecision

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


class MegaTrainStrategy(ParallelStrategy):
    """Train models larger than GPU memory on one GPU: host memory holds fp32 masters, gradients and
    optimizer state; each layer's weights stream to the device just in time and are recomputed in
    backward; the optimizer runs on the host, overlapped with the next forward.

    With ``Trainer(devices=N, num_nodes=M)`` it trains data parallel on torch.distributed (NCCL on
    GPUs, gloo on the CPU): the ranks of a node share one copy of the host state, each owning 1/N of
    every layer (see docs/distributed.md). With one device nothing of this runs: no process group, no
    launcher, no environment variables.

    Args:
        layer_cls: the classes (or class names, or ``"module.Class"`` paths) of the layers to stream.
            Default: the largest list of same-class child modules, e.g. a transformer's decoder layers.
        prefetch: how many layers are copied ahead of the one being computed (device slots = prefetch + 1).
        pin_memory: page-lock the host buffers when a GPU is used (needed for asynchronous copies).
        fused_optimizer: switch Adam/AdamW/SGD to torch's fused CPU kernel when the user did not choose
            an implementation (same update, ~10x faster on the host).
        check_memory: refuse to start, before allocating, when the memory plan does not fit this machine.
        offload_activations: keep each streamed layer's saved input in (pinned) host memory between
            forward and backward, copied out on the D2H stream and prefetched back one layer ahead of its
            backward: for long sequences, where the saved inputs rather than the weights fill the GPU.
        plan_batch_tokens: tokens per micro-batch, so the memory plan includes the saved layer inputs and
            one layer's working set on the device (otherwise it covers weights, gradients and buffers only).
        checkpoint_format: ``"sharded"`` writes a directory of safetensors shards streamed from host memory
            (see :mod:`lightning_megatrain.checkpoint`); ``"single_file"`` is Lightning's usual ``torch.save``.
        checkpoint_shard_bytes: the largest shard file of a sharded checkpoint.
        overlap_optimizer: run the host optimizer step in the background, overlapped with the next
            forward. ``False`` makes ``optimizer_step`` return only when the update is done.
        async_checkpoint: write sharded checkpoints on a background thread while training goes on; each
            layer's next update waits until that layer's tensors are written, so the checkpoint is one step.
            Older checkpoints that ``ModelCheckpoint`` removes are deleted only once the new one is
            published; a failed write is raised at the next training step.
        checkpoint_checksums: record a CRC-32 of each shard in a sharded checkpoint's index, verified
            when it is loaded (catches silent corruption; costs a pass over the data on save and load).
        host_memory: how training state is held on the host (bytes per trainable parameter with AdamW and
            ``bf16-mixed``). ``"fast"`` (18 B): a bf16 copy of each layer is kept and streamed (2 B/param
            over PCIe per pass). ``"compact"`` (16 B, same numbers): the fp32 masters are streamed and
            autocast casts them on the device, as in plain training (4 B/param per pass). ``"lean"``
            (12 B): ``"compact"`` plus every floating optimizer state tensor held in bf16 between steps
            (rounded to nearest; see docs/host-memory.md for the numerics). ``"auto"``: ``"compact"`` where
            the extra transfer costs no time (the CPU; ``plan_batch_tokens`` at or above the tokens that
            hide it), else ``"fast"``; the memory plan says which and why.
        checkpoint_frozen: whether checkpoints of a fit hold the frozen parameters. ``None`` (default): not
            when most parameters are frozen (adapter fine-tuning: a checkpoint holds what changes, plus a
            reference to where the base weights came from; resume rebuilds the base as the module does);
            ``True``: always the full model; ``False``: never.
        grad_channels: layers' gradient buffers in flight to the host (device + pinned host, each the
            largest layer's gradients in the compute dtype); backward waits for the host only when all
            are still being accumulated.
        host_threads: intra-op threads of the host worker (optimizer step, gradient accumulation).
            Default: all cores but one, so the thread that launches the GPU's kernels keeps a core; with
            several ranks per node, each rank takes its share of the cores less one.
        device: the one device to train on (``int``: that CUDA device). Lightning sets the devices from
            ``Trainer(devices=...)`` otherwise.
        parallel_devices: the devices of this node, one process each (Lightning sets them from
            ``Trainer(devices=N)``).
        cluster_environment: how ranks and the main address are found (Lightning picks torchrun,
            SLURM, ... or its own launcher's).
        process_group_backend: the torch.distributed backend; default ``"nccl"`` on CUDA, ``"gloo"`` on the CPU.
        timeout: how long a collective may wait for the other ranks before it fails.
        start_method: ``"popen"`` starts the script again for each extra device (as ``strategy="ddp"``);
            ``"spawn"``, ``"fork"``, ``"forkserver"`` start processes with multiprocessing.
    """

    strategy_name = "megatrain"

    def __init__(
        self,
        layer_cls: Optional[Sequence[Union[str, type]]] = None,
        prefetch: int = 1,
        pin_memory: bool = True,
        fused_optimizer: bool = True,
        check_memory: bool = True,
        plan_batch_tokens: Optional[int] = None,
        offload_activations: bool = False,
        checkpoint_format: Literal["sharded", "single_file"] = "sharded",
        checkpoint_shard_bytes: int = DEFAULT_SHARD_BYTES,
        async_checkpoint: bool = False,
        checkpoint_checksums: bool = False,
        overlap_optimizer: bool = True,
        host_memory: Literal["auto", "fast", "compact", "lean"] = "auto",
        checkpoint_frozen: Optional[bool] = None,
        grad_channels: int = 2,
        host_threads: Optional[int] = None,
        device: Optional[Union[str, int, torch.device]] = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = timedelta(minutes=30),
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1 (layers copied ahead), got {prefetch!r}")
        if not isinstance(grad_channels, int) or grad_channels < 1:
            raise ValueError(f"grad_channels must be an integer >= 1 (gradient buffers in flight), got {grad_channels!r}")
        if host_threads is not None and (not isinstance(host_threads, int) or host_threads < 1):
            raise ValueError(f"host_threads must be an integer >= 1 or None (all cores but one), got {host_threads!r}")
        if checkpoint_format not in ("sharded", "single_file"):
            raise ValueError(f"checkpoint_format must be 'sharded' or 'single_file', got {checkpoint_format!r}")
        if not isinstance(checkpoint_shard_bytes, int) or checkpoint_shard_bytes <= 0:
            raise ValueError(f"checkpoint_shard_bytes must be a positive number of bytes, got {checkpoint_shard_bytes!r}")
        if host_memory not in HOST_MEMORY_MODES:
            raise ValueError(
                f"host_memory must be one of {', '.join(repr(m) for m in HOST_MEMORY_MODES)}, got {host_memory!r}"
            )
        if async_checkpoint and checkpoint_format != "sharded":
            raise ValueError("async_checkpoint=True needs checkpoint_format='sharded'")
        if device is not None and parallel_devices:
            raise ValueError("pass either device (one device) or parallel_devices, not both")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}")
        if isinstance(device, int):
            device = torch.device("cuda", device)
        self._devices: Optional[list[torch.device]] = [torch.device(device)] if device is not None else None
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method = start_method
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.config = RuntimeConfig(
            layer_cls=list(layer_cls) if layer_cls else None,
            prefetch=prefetch,
            pin_memory=pin_memory,
            fused_optimizer=fused_optimizer,
            offload_activations=offload_activations,
            grad_channels=grad_channels,
            host_threads=host_threads,
        )
        self.check_memory = check_memory
        self.plan_batch_tokens = plan_batch_tokens
        self.checkpoint_format = checkpoint_format
        self.checkpoint_shard_bytes = checkpoint_shard_bytes
        self.async_checkpoint = async_checkpoint
        self.checkpoint_checksums = checkpoint_checksums
        self.overlap_optimizer = overlap_optimizer
        self.host_memory = host_memory
        self.checkpoint_frozen = checkpoint_frozen
        self._saving: Optional[ShardedSave] = None
        self.runtime: Optional[Runtime] = None
        self.memory_plan: Any = None

    # ------------------------------------------------------------------ devices and precision
    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        # Lightning hands a strategy built from a registry name its devices through this attribute.
        return self._devices

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        if not devices:
            return
        self._devices = [torch.device(d) for d in devices]

    @property
    def root_device(self) -> torch.device:
        if not self._devices:
            return torch.device("cpu")
        if len(self._devices) == 1:
            return self._devices[0]
        return self._devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Processes (devices) on each node."""
        return len(self._devices) if self._devices else 1

    @property
    def is_distributed(self) -> bool:
        """More than one process trains (Lightning then gives each rank its share of the data)."""
        return self.num_nodes * self.num_processes > 1

    # One process: rank 0 of 1, whatever a cluster environment around it says (as a single-device strategy).
    @property
    def global_rank(self) -> int:
        return super().global_rank if self.is_distributed else 0

    @property
    def local_rank(self) -> int:
        return super().local_rank if self.is_distributed else 0

    @property
    def node_rank(self) -> int:
        return super().node_rank if self.is_distributed else 0

    @property
    def world_size(self) -> int:
        return super().world_size if self.is_distributed else 1

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    def collective(self) -> Any:
        """The engine's :class:`~lightning_megatrain.engine.collective.Collective` (None on one device)."""
        return self.config.collective

    @property
    def precision_plugin(self) -> MegaTrainPrecision:
        plugin = self._precision_plugin
        if plugin is None:
            plugin = self._precision_plugin = MegaTrainPrecision("32-true")
        return plugin  # type: ignore[return-value]

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        self._precision_plugin = MegaTrainPrecision.from_plugin(plugin) if plugin is not None else None

    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # The model is built in host memory: that is where it lives.
        with torch.device("cpu"):
            yield

    def model_to_device(self) -> None:
        # Parameters stay on the host (the runtime streams them); buffers, metric states and the
        # LightningModule's ``device`` go to the root device, as user code expects of ``self.device``.
        assert self.model is not None
        place_states(self.model, self.root_device)

    # ------------------------------------------------------------------ processes (data parallel only)
    def _configure_launcher(self) -> None:
        if not self.is_distributed:
            self._launcher = None
            return
        # Lightning calls this once it knows the devices and nodes: the earliest point to refuse options
        # data parallel does not support, before any process starts or anything is allocated.
        if self.async_checkpoint:
            raise ValueError(
                "async_checkpoint=True is not supported with several devices: every rank writes its shards of a "
                "checkpoint while training waits. Use async_checkpoint=False, or train on one device."
            )
        if self.checkpoint_format != "sharded":
            raise ValueError(
                "checkpoint_format='single_file' is not supported with several devices: each rank holds only its "
                "share of the optimizer state, which a single file written by rank 0 would lose. Use the default "
                "checkpoint_format='sharded' (convert it to one file afterwards: python -m lightning_megatrain.checkpoint convert DIR OUT.ckpt)."
            )
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        """Tell the cluster environment (and ``rank_zero_only``) this process's rank, as ``strategy="ddp"`` does."""
        if not self.is_distributed:
            return
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    def setup_environment(self) -> None:
        if self.is_distributed and self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        super().setup_environment()
        if self.is_distributed:
            self._setup_distributed()

    def _setup_distributed(self) -> None:
        """Join (or start) the process group, then build the engine's node and replica groups."""
        from .engine.collective import Collective

        reset_seed()  # as strategy="ddp": every rank restarts from the global seed (same dropout streams)
        self.set_world_ranks()
        if not dist.is_initialized():
            assert self.cluster_environment is not None
            backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
            os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
            os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
            kwargs: dict[str, Any] = {"timeout": self._timeout} if self._timeout is not None else {}
            if self.root_device.type == "cuda":
                kwargs["device_id"] = self.root_device
            log.info("megatrain: initializing torch.distributed (%s), rank %d of %d", backend, self.global_rank, self.world_size)
            dist.init_process_group(backend, rank=self.global_rank, world_size=self.world_size, **kwargs)
            if backend == "nccl":
                atexit.register(_destroy_process_group)  # as Lightning does: torch warns about NCCL groups left
        self._process_group_backend = dist.get_backend()
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"torch.distributed has {dist.get_world_size()} ranks, but Trainer(devices={self.num_processes}, "
                f"num_nodes={self.num_nodes}) makes {self.world_size}; launch one process per device."
            )
        self.config.collective = Collective.from_world(ranks_per_node=self.num_processes, timeout=self._timeout)

    def _end_distributed(self) -> None:
        """Release the node groups. The process group stays, as with ``strategy="ddp"``: a later
        ``trainer.test()`` or Trainer in this process uses it (under torchrun a destroyed default group
        cannot be created again: the launcher's store still holds the old group's addresses)."""
        collective = self.collective
        if collective is not None:
            self.config.collective = None
            collective.close()

    # ------------------------------------------------------------------ communication (identity on one device)
    def barrier(self, name: Optional[str] = None) -> None:
        if not self.is_distributed or not dist.is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self.is_distributed or not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        """Sum or mean (default) of ``tensor`` over the ranks; other values are returned unchanged."""
        if not self.is_distributed or not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
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

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if not self.is_distributed:
            return tensor
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not self.is_distributed:
            return decision
        return super().reduce_boolean_decision(decision, all=all)

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
            for optimizer in self.optimizers:
                check_optimizer(optimizer)
                if self.is_distributed:
                    check_elementwise_optimizer(optimizer)
        precision = self.precision_plugin
        precision.device_type = self.root_device.type
        self.config.grads = fitting
        self.config.host_memory, host_memory_reason = choose_host_memory(
            self.host_memory, self.root_device, precision.compute_dtype, self.plan_batch_tokens
        )

        def plan(layers: list[torch.nn.Module]) -> None:
            if not layers:
                rank_zero_warn(
                    f"megatrain found no stack of repeated layers in {type(self.model).__name__}: nothing is streamed "
                    "and the whole model is bound on the device each step. Pass layer_cls to name the layers."
                )
            per_rank = {"ranks_per_node": self.num_processes, "nodes": self.num_nodes} if self.is_distributed else {}
            self.memory_plan = plan_memory(
                self.model, layers, precision.compute_dtype, self.root_device, self.config.prefetch, self.optimizers,
                fitting, batch_tokens=self.plan_batch_tokens, host_memory=self.config.host_memory,
                host_memory_reason=host_memory_reason, grad_channels=self.config.grad_channels, **per_rank,
            )
            rank_zero_info(str(self.memory_plan))
            if self.check_memory:
                self.memory_plan.check()

        self.runtime = Runtime(self.model, self.root_device, precision.compute_dtype, self.config, before_alloc=plan)
        self.model_to_device()  # after the plan was checked: metric states, buffers and ``device``
        for optimizer in self.optimizers:
            self.runtime.attach_optimizer(optimizer)
        self.optimizers = self.optimizers  # re-wrap: LightningOptimizer takes the (now waiting) class
        precision.runtime = self.runtime
        self.setup_precision_plugin()

    def teardown(self) -> None:
        try:
            self._finish_save()  # a failed background write is raised here at the latest
        finally:
            self._detach()
            if self.is_distributed:
                self._end_distributed()
                super().teardown()  # ParallelStrategy: the cluster environment's teardown too
            else:
                Strategy.teardown(self)  # as a single-device strategy: environment untouched

    def _detach(self) -> None:
        if self.runtime is not None:
            self.runtime.detach()
            self.runtime = None
            self.precision_plugin.runtime = None
            self.optimizers = self.optimizers  # re-wrap the restored optimizer classes

    # ------------------------------------------------------------------ steps
    def _bound(self) -> Any:
        return self.runtime.bound() if self.runtime is not None else contextlib.nullcontext()

    def process_dataloader(self, dataloader: Any) -> Any:
        """With several devices every forward all-gathers each layer, so every rank must run the same
        number of batches: refuse, before the loop, a loader that gives ranks different numbers (e.g.
        ``trainer.predict``, whose sampler does not pad)."""
        if self.is_distributed and dist.is_initialized():
            try:
                n = len(dataloader)
            except TypeError:  # an iterable dataset: its length is the user's to keep equal
                n = -1
            counts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(counts, n)
            if len(set(counts)) > 1:
                raise ValueError(
                    f"with several devices megatrain needs the same number of batches on every rank (each forward "
                    f"is a collective), but the ranks got {counts}. Make the dataset size a multiple of the world size "
                    "times the batch size (trainer.predict does not pad), or run it with devices=1."
                )
        return dataloader

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._check_save()
        if self.collective is not None:
            self._broadcast_buffers()
        with self._bound():
            return super().training_step(*args, **kwargs)

    def _broadcast_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank before each training step, as DDP's
        default ``broadcast_buffers=True`` does: the ranks then compute as DDP's do."""
        assert self.lightning_module is not None
        for b in self.lightning_module.buffers():
            dist.broadcast(b, src=0)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._bound():
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._bound():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._bound():
            return super().predict_step(*args, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        assert self.lightning_module is not None and self.runtime is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.precision_plugin.backward(closure_loss, self.lightning_module, optimizer, *args, **kwargs)
        # gradients must be complete on the host before on_after_backward and clipping see them
        self.runtime.after_backward()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Optional[Any] = None, **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        if not self.overlap_optimizer:
            self.wait()
        return result

    # ------------------------------------------------------------------ checkpoints: wait for the pending step
    def wait(self) -> None:
        """Block until the pending host optimizer step is done.

        megatrain waits by itself wherever Lightning or the LightningModule reads parameters, gradients
        or optimizer state (``zero_grad``, ``parameters()``, ``state_dict()``, checkpoints, validation). Call
        this in code that reaches into submodules' weights between ``optimizer_step`` and the next forward.
        """
        if self.runtime is not None:
            self.runtime.wait()

    _wait = wait

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._wait()
        state = super().lightning_module_state_dict()
        omit = self._frozen_to_omit()
        return {k: v for k, v in state.items() if k not in omit} if omit else state

    def _frozen_to_omit(self) -> set[str]:
        """State-dict names of frozen parameters a checkpoint leaves out (see ``checkpoint_frozen``)."""
        module = self.lightning_module
        if module is None or self.checkpoint_frozen is True or not self.config.grads:
            return set()
        params = dict(module.named_parameters(remove_duplicate=False))
        frozen = {k for k, p in params.items() if not p.requires_grad}
        if self.checkpoint_frozen is None:
            unique = {id(p): p for p in params.values()}.values()
            if 2 * sum(p.numel() for p in unique if not p.requires_grad) <= sum(p.numel() for p in unique):
                return set()
        return frozen

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        self._wait()
        return super().optimizer_state(optimizer)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # restore into the host arenas (memory-mapped shards are copied straight into them)
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        self._finish_save()
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_dir():
            # checked whole before anything is restored: a damaged one raises CheckpointCorruptError
            return load_sharded(checkpoint_path, weights_only=weights_only)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        self._wait()
        expected = self.lightning_module.state_dict()
        omitted = checkpoint.get(FROZEN_KEY)
        if omitted:
            # the checkpoint left out frozen base weights: they are the module's own (rebuilt from their source)
            params = dict(self.lightning_module.named_parameters(remove_duplicate=False))
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
            checkpoint = {**checkpoint, "state_dict": {**self.lightning_module.state_dict(), **checkpoint["state_dict"]}}
        try:
            trainer: Optional[pl.Trainer] = self.lightning_module.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and self.lightning_restore_optimizer:
            # Lightning loads the optimizer state after the weights: refuse a mismatch before either changes
            for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
                check_optimizer_state(optimizer, state)
        if self.collective is not None and self.runtime is not None:
            self._load_owned(checkpoint["state_dict"])
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    def _rank0_buffers(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """The state dict with rank 0's values of everything that is not a (shared) parameter: buffers are
        each rank's own, and whichever rank writes one must write rank 0's, as DDP's checkpoint holds. The
        ranks' live buffers are left as they are."""
        assert self.lightning_module is not None
        shared = {p.data_ptr() for p in self.lightning_module.parameters() if p.numel()}
        out = dict(state_dict)
        for name, t in state_dict.items():
            if isinstance(t, Tensor) and t.numel() and t.data_ptr() not in shared:
                # (NCCL moves device tensors only)
                t = t.detach().to(self.root_device if dist.get_backend() == "nccl" else t.device, copy=True)
                dist.broadcast(t, src=0)
                out[name] = t
        return out

    def _load_owned(self, state_dict: Mapping[str, Any]) -> None:
        """Data parallel: the parameters are the node's shared memory; each rank writes the elements it
        owns (buffers are each rank's own), then waits until the node's ranks have all written theirs."""
        assert self.lightning_module is not None and self.runtime is not None
        params = dict(self.lightning_module.named_parameters(remove_duplicate=False))
        rest = {}
        with torch.no_grad():
            for name, value in state_dict.items():
                p = params.get(name)
                if p is None:
                    rest[name] = value
                    continue
                lo, hi = self.runtime.owned(p)
                if hi > lo:
                    p.view(-1)[lo:hi].copy_(value.reshape(-1)[lo:hi])
        if rest:
            self.lightning_module.load_state_dict(rest, strict=False)
        collective = self.collective
        collective.board.barrier(collective.timeout_s, "loading the checkpoint's weights")

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Optimizer state stays on the host (Lightning's default moves it to the root device).
        self._wait()
        states = checkpoint["optimizer_states"]
        for optimizer, state in zip(self.optimizers, states):
            check_optimizer_state(optimizer, state)
        if self.runtime is not None and self.collective is not None:
            # data parallel: each rank takes the elements it owns (from Pieces or from full tensors)
            for optimizer, state in zip(self.optimizers, states):
                self.runtime.load_shard_optimizer_state(optimizer, state)  # type: ignore[union-attr]
            return
        for optimizer, state in zip(self.optimizers, states):
            # own memory for each state tensor (the shards are memory-mapped read-only files); state that
            # data-parallel ranks wrote in pieces is put together whole
            state = {**state, "state": {k: {n: v.materialize() if isinstance(v, Pieces) else v.clone() if isinstance(v, Tensor) else v for n, v in s.items()} for k, s in state["state"].items()}}
            optimizer.load_state_dict(state)
            if self.runtime is not None:
                self.runtime.refresh_fused(optimizer)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        self._wait()
        self._finish_save()
        omit = self._frozen_to_omit()
        if omit and "state_dict" in checkpoint and not any(k in checkpoint["state_dict"] for k in omit):
            checkpoint[FROZEN_KEY] = {"names": sorted(omit), "source": weights_source(self.lightning_module)}
        if self.checkpoint_format == "single_file":
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        collective = self.collective if self.runtime is not None else None
        if collective is None and self.is_distributed and "optimizer_states" in checkpoint:
            raise RuntimeError(
                "megatrain with several devices cannot save a training checkpoint after fit has ended: each rank's "
                "share of the optimizer state lived in the training run. Save during fit (ModelCheckpoint, or "
                "trainer.save_checkpoint in a hook such as on_train_end), or save weights only with "
                "trainer.save_checkpoint(path, weights_only=True)."
            )
        if collective is not None:
            # data parallel: every rank writes its share into one directory (each rank holds only its
            # elements of the optimizer state); rank 0 writes the indexes and publishes it
            runtime: Any = self.runtime
            if "state_dict" in checkpoint:
                checkpoint = {**checkpoint, "state_dict": self._rank0_buffers(checkpoint["state_dict"])}
            if "optimizer_states" in checkpoint:
                checkpoint = {**checkpoint, "optimizer_states": [runtime.shard_optimizer_state(o) for o in self.optimizers]}
            owned = [[(*runtime.owned(p), tuple(p.shape)) for g in o.param_groups for p in g["params"]] for o in self.optimizers]
            runtime.wait()  # also the node's other ranks: their updates of the shared weights are done
            save_sharded_distributed(
                checkpoint, Path(filepath), owned, local_rank=collective.rank, local_size=collective.size, node=collective.node,
                shard_bytes=self.checkpoint_shard_bytes, checksums=self.checkpoint_checksums,
            )
            return
        if not self.is_global_zero:
            return
        save = ShardedSave(
            checkpoint, Path(filepath), self.checkpoint_shard_bytes, checksums=self.checkpoint_checksums, **self._groups(checkpoint)
        )
        if self.async_checkpoint and self.runtime is not None:
            # held before the thread starts: a Ctrl-C during start() must still find it to wait for
            self._saving = save
            try:
                save.start()
            except Exception:
                self._saving = None
                raise
            self.runtime.gate = save.wait_group
        else:
            save.run()

    def _groups(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Which streamed layer each tensor belongs to, so a save can go layer by layer; buffers are
        copied now, since the next forward may change them (BatchNorm statistics)."""
        if self.runtime is None:
            return {}
        unit_of = self.runtime.unit_of()
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
        for optimizer in self.optimizers:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            optimizer_groups.append({i: unit_of.get(p.data_ptr(), 0) for i, p in enumerate(params)})
        return {"model_groups": model_groups, "optimizer_groups": optimizer_groups}

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete an older checkpoint (``ModelCheckpoint``'s top-k rotation, ``save_last``) only once the
        save in flight is published, so a complete checkpoint exists at every moment; if that save
        fails, the older checkpoint stays."""
        if not self.is_global_zero:
            return
        save = self._saving
        if save is not None:
            save.after_publish(lambda: self._remove_now(filepath))
        else:
            self._remove_now(filepath)

    def _remove_now(self, filepath: Any) -> None:
        if isinstance(filepath, (str, Path)) and Path(filepath).is_dir():
            remove_checkpoint_dir(filepath)  # renamed aside first: never seen half-deleted
        else:
            super().remove_checkpoint(filepath)

    def _check_save(self) -> None:
        """Raise the failure of a background save that has ended (with its path and cause)."""
        save = self._saving
        if save is not None and save.done:
            self._finish_save()

    def _finish_save(self) -> None:
        save = self._saving
        if save is None:
            return
        # keep the reference until the write has ended: a Ctrl-C that cuts this wait short leaves it for
        # on_exception/teardown to wait for again, instead of abandoning a half-written checkpoint
        save.join()
        self._saving = None
        if self.runtime is not None and self.runtime.gate == save.wait_group:
            self.runtime.gate = None
        save.wait()  # CheckpointWriteError naming the path and the cause

    def on_exception(self, exception: BaseException) -> None:
        if self.is_distributed:
            self._fail_distributed(exception)
        try:
            self._finish_save()  # a checkpoint already being written is completed, not lost
        except Exception as err:  # noqa: BLE001 - do not hide the exception being handled
            log.error("%s", err)
        finally:
            self._detach()
        super().on_exception(exception)

    def _fail_distributed(self, exception: BaseException) -> None:
        """Make every rank fail now, naming the first one that failed.

        A rank that fails first marks itself failed on its node's board (ranks of the node waiting on
        host work see it at once) and tears its process group down, so peers blocked in a collective get
        an error instead of waiting for the timeout. A rank that fails because of another (a collective
        broke under it) adds that rank's name to its own error instead.
        """
        collective = self.collective
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
            log.error("megatrain: rank %d stops: %s", self.global_rank, cause)
        else:
            log.error("megatrain: rank %d failed (%s: %s); stopping the other ranks", self.global_rank, type(exception).__name__, exception)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()  # peers blocked in a collective with this rank error out now
            except Exception as err:  # noqa: BLE001 - the exception being handled is the one to report
                log.debug("destroying the process group after a failure: %s", err)
        if collective is not None:
            self.config.collective = None



def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
