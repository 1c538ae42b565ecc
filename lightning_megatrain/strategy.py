"""Lightning glue: device resolution, setup, the step, teardown; the hooks delegate to ``engine`` (the work), ``checkpoint.strategy_io`` (checkpoints) and ``distributed`` (data parallel)."""

from __future__ import annotations

import contextlib
import logging
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
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from .checkpoint import DEFAULT_SHARD_BYTES, load_sharded
from .checkpoint.strategy_io import StrategyCheckpoints
from .distributed import (  # noqa: F401 - ELEMENTWISE_OPTIMIZERS and _add_to_message: importable from here, as before
    ELEMENTWISE_OPTIMIZERS,
    AgreedRefusal,
    _add_to_message,
    all_reduce,
    barrier,
    broadcast_buffers,
    broadcast_object,
    check_elementwise_optimizer,
    check_same_batches,
    fail_distributed,
    join_process_group,
    make_launcher,
)
from .engine import Runtime, RuntimeConfig, check_optimizer
from .engine.materialize import has_meta
from .memory import HOST_MEMORY_MODES, choose_host_memory, plan_memory
from .placement import place_states
from .precision import MegaTrainPrecision
from .readers import schedule
from .weights import WeightsFiles, weights_materializer

log = logging.getLogger(__name__)


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
        pin_memory: page-lock what crosses PCIe (streamed images, gradient staging) when a GPU is used.
        fused_optimizer: switch Adam/AdamW/SGD to torch's fused CPU kernel when the user did not choose
            an implementation (same update, ~10x faster on the host).
        check_memory: refuse to start, before allocating, when the memory plan does not fit this machine.
        offload_activations: keep each streamed layer's saved input in (pinned) host memory between
            forward and backward, copied out on the D2H stream and prefetched back one layer ahead of its
            backward: for long sequences, where the saved inputs rather than the weights fill the GPU.
        plan_batch_tokens: tokens per micro-batch, so the memory plan includes the saved layer inputs and
            the activations of one layer's working set on the device (otherwise only its weights' share).
        checkpoint_format: ``"sharded"`` writes a directory of safetensors shards streamed from host memory
            (see :mod:`lightning_megatrain.checkpoint`); ``"single_file"`` is Lightning's usual ``torch.save``.
        checkpoint_shard_bytes: the largest shard file of a sharded checkpoint.
        overlap_optimizer: run the host optimizer step in the background, overlapped with the next
            forward. ``False`` makes ``optimizer_step`` return only when the update is done.
        async_checkpoint: write sharded checkpoints on a background thread while training goes on; each
            layer's next update waits until that layer's tensors are written, so the checkpoint is one step.
            Older checkpoints that ``ModelCheckpoint`` removes are deleted only once the new one is
            published; a failed write is raised at the next training step. Several devices: see docs/distributed.md.
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
        weights: fill the host arenas at setup from a ``save_pretrained`` directory, a ``.safetensors`` file or
            a megatrain sharded checkpoint, memory-mapped, one layer at a time (a model built on the meta
            device, ``Trainer.init_module(empty_init=True)``, is never made whole); see :mod:`lightning_megatrain.weights`.
        weights_prefix: the module name the files' names sit under (``"model."``); default: found from the names.
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
        weights: Optional[Union[str, Path]] = None,
        weights_prefix: Optional[str] = None,
    ) -> None:
        _check_options(
            prefetch, grad_channels, host_threads, checkpoint_format, checkpoint_shard_bytes, host_memory, async_checkpoint,
            device, parallel_devices, start_method,
        )
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
        self.weights, self.weights_prefix = weights, weights_prefix
        self.runtime: Optional[Runtime] = None
        self._failure: Optional[BaseException] = None  # the error on_exception saw: teardown must not hide it
        self.memory_plan: Any = None
        self._checkpoints = StrategyCheckpoints(self)  # saves, the one in flight, removal, loads

    _saving = property(lambda self: self._checkpoints.saving, doc="The background save in flight (async_checkpoint), if any.")

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
        # The model is built in host memory, where it lives; empty_init: on the meta device, materialised
        # unit by unit in the host arenas at setup (from ``weights`` or by the modules' own initialisation)
        with torch.device("meta" if empty_init else "cpu"):
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
        # refuses options data parallel does not support, before any process starts
        self._launcher = make_launcher(
            self, self.checkpoint_format, self._start_method, self.num_processes, self.num_nodes
        )

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
        self._process_group_backend = join_process_group(
            self.cluster_environment, self._process_group_backend, self.root_device, self.global_rank, self.world_size,
            self._timeout, self.num_processes, self.num_nodes,
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
        # ModelCheckpoint(save_last="link") calls this right after linking last.ckpt (see StrategyCheckpoints.hold_links)
        self._checkpoints.hold_links()
        if self.is_distributed and dist.is_initialized():
            barrier(self.root_device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return broadcast_object(obj, src) if self.is_distributed and dist.is_initialized() else obj

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        """Sum or mean (default) of ``tensor`` over the ranks; other values are returned unchanged."""
        if not self.is_distributed or not isinstance(tensor, Tensor) or not dist.is_initialized():
            return tensor
        return all_reduce(tensor, group, reduce_op)

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
            self._checkpoints.drop_shares()
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
            self.memory_plan.host_step = schedule(self.lightning_module, early_capable=not self.is_distributed)
            rank_zero_info(str(self.memory_plan))
            if self.check_memory:
                self.memory_plan.check()

        self.runtime = _make_runtime(self, precision.compute_dtype, plan)  # ``weights`` fill the arenas as made
        self.model_to_device()  # after the plan was checked: metric states, buffers and ``device``
        for optimizer in self.optimizers:
            self.runtime.attach_optimizer(optimizer)
        self.optimizers = self.optimizers  # re-wrap: LightningOptimizer takes the (now waiting) class
        precision.runtime = self.runtime
        self.setup_precision_plugin()

    def teardown(self) -> None:
        """Every step runs, even after one failed. After a failure (``on_exception``) an error of teardown
        is logged, not raised: the user's traceback ends on the error that stopped the run."""
        failure, self._failure = self._failure, None
        steps = [self._checkpoints.finish_save, self._detach]  # finish_save: a failed background write at the latest
        if self.is_distributed:
            steps += [self._end_distributed, super().teardown]  # ParallelStrategy: the cluster environment's too
        else:
            steps.append(lambda: Strategy.teardown(self))  # as a single-device strategy: environment untouched
        _run_every(steps, failure)

    def _detach(self) -> None:
        _detach(self)

    # ------------------------------------------------------------------ steps
    def _bound(self) -> Any:
        return self.runtime.bound() if self.runtime is not None else contextlib.nullcontext()

    def process_dataloader(self, dataloader: Any) -> Any:
        """With several devices every rank must run the same number of batches (each forward is a collective)."""
        if self.is_distributed and dist.is_initialized():
            check_same_batches(dataloader)
        return dataloader

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._checkpoints.check_save()  # a failed background save is raised here
        if self.collective is not None:
            # rank 0's buffers on every rank before each step, as DDP: the ranks then compute as DDP's do
            assert self.lightning_module is not None
            broadcast_buffers(self.lightning_module)
        with self._bound():
            return super().training_step(*args, **kwargs)

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
        # no wait for the host here: whoever reads the host gradients waits (precision.py, readers.py)
        self.runtime.after_backward(wait=False)
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
        """Block until the pending host optimizer step is done. megatrain waits by itself wherever Lightning or
        the module reads parameters, gradients or optimizer state; call this in code that reaches into
        submodules' weights between ``optimizer_step`` and the next forward."""
        if self.runtime is not None:
            self.runtime.wait()

    _wait = wait

    def owned(self, param: Tensor) -> tuple[int, int]:
        """The elements ``[lo, hi)`` of ``param.flatten()`` whose optimizer state this rank holds (docs/distributed.md)."""
        return self._checkpoints.owned(param)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._wait()
        return self._checkpoints.without_frozen(super().lightning_module_state_dict())

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        self._wait()
        return super().optimizer_state(optimizer)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # restore into the host arenas (memory-mapped shards are copied straight into them)
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        self._checkpoints.finish_save()
        if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_dir():
            # checked whole before anything is restored: a damaged one raises CheckpointCorruptError
            checkpoint = load_sharded(checkpoint_path, weights_only=weights_only)
            self._checkpoints.loaded(checkpoint_path)
            return checkpoint
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        self._wait()
        rest = self._checkpoints.load_model_state(checkpoint, strict)  # None: data parallel, loaded
        if rest is not None:
            super().load_model_state_dict(rest, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Optimizer state stays on the host (Lightning's default moves it to the root device).
        self._wait()
        self._checkpoints.load_optimizer_states(checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        self._wait()
        if not self._checkpoints.save(checkpoint, filepath):  # single_file: Lightning's own
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete an older checkpoint only once the save in flight is published (see ``async_checkpoint``)."""
        self._checkpoints.remove(filepath, super().remove_checkpoint)

    def on_exception(self, exception: BaseException) -> None:
        self._failure = exception
        # an AgreedRefusal is no rank's failure: tearing the group down would race peers still in its collective
        if self.is_distributed and not isinstance(exception, AgreedRefusal):
            self._fail_distributed(exception)
        for step in (self._checkpoints.finish_save, self._detach):  # finish_save: a checkpoint being written is completed
            try:
                step()
            except Exception as err:  # noqa: BLE001 - do not hide the exception being handled
                log.error("megatrain: after %s: %s: %s", type(exception).__name__, type(err).__name__, err)
        super().on_exception(exception)

    def _fail_distributed(self, exception: BaseException) -> None:
        """Make every rank fail now, naming the first one that failed (see ``distributed.fail_distributed``)."""
        collective = self.collective
        fail_distributed(collective, exception, self.global_rank)
        if collective is not None:
            self.config.collective = None


def _run_every(steps: list[Any], failure: Optional[BaseException]) -> None:
    """Run every step; raise the first error, or only log it when ``failure`` is being handled."""
    first: Optional[Exception] = None
    for step in steps:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - the first is raised (or logged) below
            if first is not None or failure is not None:
                log.error("megatrain: teardown after %s: %s: %s", type(failure or first).__name__, type(err).__name__, err)
            first = first or err
    if first is not None and failure is None:
        raise first


def _detach(strategy: MegaTrainStrategy) -> None:
    """Hand the model back from the engine once; data parallel: each rank's share of the optimizer state
    stays readable in ``optimizer.state`` (kept before the runtime goes)."""
    runtime = strategy.runtime
    if runtime is None:
        return
    try:
        strategy._checkpoints.keep_shares()
    finally:
        strategy.runtime = None
        try:
            runtime.detach()
        finally:
            strategy.precision_plugin.runtime = None
            strategy.optimizers = strategy.optimizers  # re-wrap the restored optimizer classes


def _weights_files(strategy: MegaTrainStrategy) -> Optional[WeightsFiles]:
    """Match ``weights`` to the module and hand the engine what fills it; once per module (a later fit or
    test of the same module, still holding what it learned, is not reset), unless it is on the meta device."""
    module, path = strategy.model, strategy.weights
    if path is None:
        return None
    if getattr(module, "_megatrain_weights_source", None) == str(Path(path).resolve()) and not has_meta(module):
        return None
    strategy.config.materialize, files = weights_materializer(module, path, strategy.weights_prefix)
    return files


def _make_runtime(strategy: MegaTrainStrategy, compute_dtype: torch.dtype, plan: Any) -> Runtime:
    """The engine on the module; ``weights`` (if due) fill each unit's arena as it is made."""
    files = _weights_files(strategy)
    try:
        runtime = Runtime(strategy.model, strategy.root_device, compute_dtype, strategy.config, before_alloc=plan)
    finally:
        strategy.config.materialize = None
        if files is not None:
            files.close()
    if files is not None:  # recorded in checkpoints that leave the base out (checkpoint_frozen)
        strategy.model._megatrain_weights_source = str(files.path.resolve())
    return runtime


def _check_options(
    prefetch: Any, grad_channels: Any, host_threads: Any, checkpoint_format: Any, checkpoint_shard_bytes: Any,
    host_memory: Any, async_checkpoint: bool, device: Any, parallel_devices: Any, start_method: Any,
) -> None:
    """Refuse bad options when the strategy is made, before Lightning or anything else runs."""
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
