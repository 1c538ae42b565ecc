"""Training telemetry: how fast megatrain goes and what bounds it, through Lightning's loggers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import psutil
import torch
from torchmetrics.aggregation import RunningMean

# dense bf16 tensor-core peak (TFLOPS) of common GPUs, for MFU when the user gives none
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _tokens(batch: Any) -> int:
    """Tokens in a batch: the elements of its first integer tensor (input ids)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if not item.is_floating_point():
                return item.numel()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 0


class MegaTrainMonitor(pl.Callback):
    """Logs, per training step: tokens/s, model TFLOPS (6·N·tokens / step time, N = all parameters),
    MFU against ``peak_tflops`` (or the GPU's known bf16 peak), H2D and D2H GB/s, the time the GPU
    waited on weight copies, the time training waited for the host optimizer, host optimizer time,
    host RSS and GPU memory. A few go to the progress bar.

    Add it to the Trainer: ``Trainer(strategy="megatrain", callbacks=[MegaTrainMonitor()])``.

    Args:
        peak_tflops: the device's peak for MFU; default: looked up for known GPUs, no MFU otherwise.
        tokens_per_batch: how to count tokens in a batch; default: elements of its first integer tensor.
        window: steps in the running mean shown in the progress bar.
    """

    def __init__(
        self,
        peak_tflops: Optional[float] = None,
        tokens_per_batch: Optional[Callable[[Any], int]] = None,
        window: int = 10,
        prog_bar: bool = True,
    ) -> None:
        self.peak_tflops = peak_tflops
        self.tokens_per_batch = tokens_per_batch or _tokens
        self.prog_bar = prog_bar
        self._tps = RunningMean(window=window)
        self._start = 0.0
        self._tokens = 0
        self._n_params = 0
        self.last: dict[str, float] = {}

    def _runtime(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.strategy, "runtime", None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._n_params = sum(p.numel() for p in {id(p): p for p in pl_module.parameters()}.values())
        if self.peak_tflops is None:
            self.peak_tflops = _peak_tflops(trainer.strategy.root_device)
        runtime = self._runtime(trainer)
        if runtime is not None and runtime.slots is not None:
            runtime.slots.time_stalls = True
            runtime.stats()  # start counting from here

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start == 0.0:
            self._start = time.perf_counter()
        self._tokens += self.tokens_per_batch(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        elapsed = now - self._start
        if elapsed <= 0:
            return
        tokens, self._tokens, self._start = self._tokens, 0, now
        metrics: dict[str, float] = {"perf/step_s": elapsed, "perf/tokens_per_s": tokens / elapsed}
        tflops = 6 * self._n_params * tokens / elapsed / 1e12
        metrics["perf/model_tflops"] = tflops
        if self.peak_tflops:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        runtime = self._runtime(trainer)
        if runtime is not None:
            s = runtime.stats()
            metrics.update({
                "perf/h2d_GBps": s.h2d_bytes / elapsed / 1e9,
                "perf/d2h_GBps": s.d2h_bytes / elapsed / 1e9,
                "perf/gpu_wait_transfer_s": s.transfer_wait_s,
                "perf/wait_host_optimizer_s": s.host_wait_s,
                "perf/host_optimizer_s": s.optimizer_s,
                "perf/host_grad_accumulate_s": s.accumulate_s,
                # units whose optimizer update started during backward (0: the step runs after it)
                "perf/host_updates_during_backward": float(s.early_updates),
            })
        metrics["mem/host_rss_GiB"] = psutil.Process().memory_info().rss / 2**30
        device = trainer.strategy.root_device
        if device.type == "cuda":
            metrics["mem/gpu_max_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        self._tps.update(metrics["perf/tokens_per_s"])
        self.last = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.prog_bar:
            bar = {"tok/s": self._tps.compute()}
            if "perf/mfu" in metrics:
                bar["mfu"] = metrics["perf/mfu"]
            pl_module.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)
