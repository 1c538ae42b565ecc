"""Engine options and counters: what every part of the engine reads, below all of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .layers import LayerClasses


@dataclass
class RuntimeConfig:
    """Engine options; see :class:`lightning_megatrain.MegaTrainStrategy` for their meaning."""

    layer_cls: LayerClasses | None = None
    prefetch: int = 1
    pin_memory: bool = True
    fused_optimizer: bool = True
    grads: bool = True  # False for validate/test/predict: no gradient memory at all
    offload_activations: bool = False
    # "fast": a compute-dtype copy of each layer on the host, streamed (half the PCIe bytes);
    # "compact": the fp32 masters are streamed and autocast casts them on the device (no host copy);
    # "lean": "compact" plus floating optimizer state held in bf16 between steps (engine/state.py)
    host_memory: str = "fast"
    grad_channels: int = 2  # layers' gradients in flight to the host before backward waits for the host
    host_threads: int | None = None  # intra-op threads of the host worker; None: all cores but one
    collective: object = None  # data parallel: an ``engine.collective.Collective``; None: one device
    # what fills parameters built on the meta device or given by a weights file: an
    # ``engine.materialize.Materializer``; None: meta tensors are initialised by their modules
    materialize: object = None

    def check(self) -> None:
        """Refuse bad options before anything is allocated."""
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (layers copied ahead of the one computing), got {self.prefetch}")
        if self.grad_channels < 1:
            raise ValueError(f"grad_channels must be >= 1 (layers' gradients in flight to the host), got {self.grad_channels}")
        if self.host_threads is not None and self.host_threads < 1:
            raise ValueError(f"host_threads must be >= 1 or None (all cores but one), got {self.host_threads}")
        if self.host_memory not in ("fast", "compact", "lean"):
            raise ValueError(f"host_memory must be 'fast', 'compact' or 'lean', got {self.host_memory!r}")


@dataclass
class Stats:
    """Counters since the last ``Runtime.stats()``; read by the telemetry callback. One object for the
    runtime's life (every part adds to it); ``take`` hands out the counts and starts again from zero."""

    h2d_bytes: int = 0  # weights copied to the device (layer slots and non-layer parameters)
    d2h_bytes: int = 0  # gradients copied to the host
    host_wait_s: float = 0.0  # training thread blocked on the host worker (the previous step's update)
    optimizer_s: float = 0.0  # host worker time in optimizer updates
    accumulate_s: float = 0.0  # host worker time adding gradients into the fp32 .grad
    transfer_wait_s: float = 0.0  # device time the compute stream waited for weight copies (CUDA only)
    offload_bytes: int = 0  # saved layer inputs copied to host memory (offload_activations)
    early_updates: int = 0  # units whose optimizer update started during backward (the step's schedule)

    def take(self, reset: bool = True) -> Stats:
        out = dataclasses.replace(self)
        if reset:
            for f in dataclasses.fields(self):
                setattr(self, f.name, type(getattr(self, f.name))())
        return out
