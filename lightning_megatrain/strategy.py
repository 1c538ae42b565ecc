"""Lightning glue: device resolution, setup, the step, checkpoint waits, teardown. The work is in ``engine``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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


class MegaTrainStrategy(SingleDeviceStrategy):
    """Train models larger than GPU memory on one GPU: host memory holds fp32 masters, gradients and
    optimizer state; each layer's weights stream to the device just in time and are recomputed in
    backward; the optimizer runs on the host, overlapped with the next forward.

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
        self._device_given = device is not None
        if isinstance(device, int):
            device = torch.device("cuda", device)
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
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
        return [self.root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(
                f"strategy='megatrain' trains on one device, but {len(devices)} were requested ({devices}). "
                "Pass devices=1 (or devices=[k] for GPU k)."
            )
        self._root_device = torch.device(devices[0])
        self._device_given = True

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

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
            for optimizer in self.optimizers:
                check_optimizer(optimizer)
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
            self.memory_plan = plan_memory(
                self.model, layers, precision.compute_dtype, self.root_device, self.config.prefetch, self.optimizers,
                fitting, batch_tokens=self.plan_batch_tokens, host_memory=self.config.host_memory,
                host_memory_reason=host_memory_reason, grad_channels=self.config.grad_channels,
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
            super().teardown()

    def _detach(self) -> None:
        if self.runtime is not None:
            self.runtime.detach()
            self.runtime = None
            self.precision_plugin.runtime = None
            self.optimizers = self.optimizers  # re-wrap the restored optimizer classes

    # ------------------------------------------------------------------ steps
    def _bound(self) -> Any:
        return self.runtime.bound() if self.runtime is not None else contextlib.nullcontext()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._check_save()
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
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Optimizer state stays on the host (Lightning's default moves it to the root device).
        self._wait()
        states = checkpoint["optimizer_states"]
        for optimizer, state in zip(self.optimizers, states):
            check_optimizer_state(optimizer, state)
        if self.runtime is not None and getattr(self.config, "collective", None) is not None:
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
        collective = getattr(self.config, "collective", None) if self.runtime is not None else None
        if collective is not None:
            # data parallel: every rank writes its share into one directory (each rank holds only its
            # elements of the optimizer state); rank 0 writes the indexes and publishes it
            runtime: Any = self.runtime
            if "optimizer_states" in checkpoint:
                checkpoint = {**checkpoint, "optimizer_states": [runtime.shard_optimizer_state(o) for o in self.optimizers]}
            owned = [[(*runtime.owned(p), tuple(p.shape)) for g in o.param_groups for p in g["params"]] for o in self.optimizers]
            runtime.sync_node("a checkpoint save")  # the other ranks' updates of the shared weights are done
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
        try:
            self._finish_save()  # a checkpoint already being written is completed, not lost
        except Exception as err:  # noqa: BLE001 - do not hide the exception being handled
            log.error("%s", err)
        finally:
            self._detach()
        super().on_exception(exception)
