"""The megatrain engine: host-resident parameters streamed through one device. No Lightning imports here."""

from .layers import find_layers
from .runtime import Runtime, RuntimeConfig
from .stepper import WorkerError, check_optimizer

__all__ = ["Runtime", "RuntimeConfig", "WorkerError", "check_optimizer", "find_layers"]
