"""Precision for megatrain: fp32 masters always; the flag picks what is streamed and computed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor
from torch.optim import Optimizer

from .readers import after_backward_readers, before_step_readers, early_step_blockers

if TYPE_CHECKING:
    from .engine import Runtime

_Flag = Literal["32-true", "bf16-mixed"]
SUPPORTED: tuple[str, ...] = ("32-true", "bf16-mixed")


class MegaTrainPrecision(Precision):
    """``"32-true"``: fp32 weights streamed. ``"bf16-mixed"``: bf16 weights streamed, computed under
    bf16 autocast, with fp32 master weights, gradients and optimizer state on the host."""

    def __init__(self, precision: _Flag = "32-true") -> None:
        if precision not in SUPPORTED:
            raise ValueError(
                f"megatrain supports precision {' or '.join(repr(p) for p in SUPPORTED)}, got {precision!r}. "
                "Master weights stay fp32 in host memory either way; pick 'bf16-mixed' to stream and compute in bf16."
            )
        self.precision = precision
        self.device_type = "cpu"
        self.runtime: Runtime | None = None
        self._stepping: tuple[Optimizer, dict[str, Any]] | None = None  # inside optimizer_step's closure

    @classmethod
    def from_plugin(cls, plugin: Precision) -> MegaTrainPrecision:
        """The megatrain counterpart of the plugin Lightning built from ``Trainer(precision=...)``."""
        if isinstance(plugin, MegaTrainPrecision):
            return plugin
        if type(plugin) is Precision:
            return cls("32-true")
        if isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed":
            return cls("bf16-mixed")
        flag = getattr(plugin, "precision", type(plugin).__name__)
        raise ValueError(
            f"strategy='megatrain' supports precision {' or '.join(repr(p) for p in SUPPORTED)}, got {flag!r}. "
            "fp16 needs a loss scaler and true-half training has no fp32 master; use precision='bf16-mixed'."
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.precision == "bf16-mixed":
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                yield
        else:
            yield

    # The host gradients are complete only once the host worker has added them: wait where something
    # reads them (readers.py), not after every backward, so the device goes on with the next micro-batch.
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        tensor = super().pre_backward(tensor, module)
        # the last micro-batch of a step (its backward runs inside optimizer_step): where nothing reads
        # the gradients before the step, each layer's host update starts as soon as they are final
        if self._stepping is not None and self.runtime is not None and not early_step_blockers(module):
            optimizer, kwargs = self._stepping
            self.runtime.prepare_step(optimizer, **kwargs)
        return tensor

    def post_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        if self.runtime is not None and after_backward_readers(module):
            self.runtime.wait()
        return super().post_backward(tensor, module)

    # In data parallel the gradients are views of node-shared memory that every rank of the node sees:
    # clipping them in place on each rank would scale them once per rank. The runtime clips with the
    # global norm (all-reduce of the shards' norms), each rank changing only the elements it owns, and
    # no rank changes its part while another still reads the whole (hooks) or reads it half clipped.
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        if self.runtime is not None:
            self.runtime.wait()  # also when called from user code (manual optimization)
        if self.runtime is None or self.runtime.collective is None:
            super().clip_grad_by_norm(optimizer, clip_val)
            return
        self.runtime.clip_grad_norm_(list(self.main_params(optimizer)), clip_val)

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        if self.runtime is not None:
            self.runtime.wait()
        if self.runtime is None or self.runtime.collective is None:
            super().clip_grad_by_value(optimizer, clip_val)
            return
        self.runtime.clip_grad_value_(list(self.main_params(optimizer)), clip_val)

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        # Run forward/backward, on_before_optimizer_step and clipping first, as Lightning's other
        # plugins do; then launch the host step, which returns before it is done. Those hooks and
        # clipping read the step's host gradients: wait for them only where one of them runs.
        def closure_then_wait() -> Any:
            result = closure()
            if self.runtime is not None and before_step_readers(model):
                self.runtime.wait()
            return result

        assert self.runtime is not None, "MegaTrainPrecision is used through MegaTrainStrategy"
        self._stepping = (optimizer, kwargs)
        try:
            closure_result = self._wrap_closure(model, optimizer, closure_then_wait)
        except BaseException:
            self.runtime.cancel_step()
            raise
        finally:
            self._stepping = None
        self.runtime.step(optimizer, **kwargs)
        return closure_result

