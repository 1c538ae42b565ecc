"""lightning-megatrain: ``Trainer(strategy="megatrain")`` trains models larger than GPU memory on one GPU."""

from lightning.pytorch.strategies import StrategyRegistry

from .callbacks import MegaTrainMonitor
from .checkpoint import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError
from .memory import MemoryPlan, MemoryPlanError, plan_memory
from .precision import MegaTrainPrecision
from .strategy import MegaTrainStrategy

__version__ = "0.1.0"
__all__ = [
    "CheckpointCorruptError", "CheckpointMismatchError", "CheckpointWriteError",
    "MegaTrainMonitor", "MegaTrainPrecision", "MegaTrainStrategy", "MemoryPlan", "MemoryPlanError", "plan_memory",
]

# Lightning has no entry point for strategies: importing this package registers the name.
if "megatrain" not in StrategyRegistry:
    StrategyRegistry.register(
        "megatrain",
        MegaTrainStrategy,
        description="Host-resident training with per-layer weight streaming (lightning-megatrain)",
    )
