"""Training: the loop, optimizer and schedule, atomic checkpoints, and data parallelism."""

from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .config import TrainConfig
from .loop import RunDirError, TrainingDiverged, TrainResult, train

__all__ = [
    "CheckpointError",
    "RunDirError",
    "TrainConfig",
    "TrainingDiverged",
    "TrainResult",
    "load_model",
    "resolve_checkpoint",
    "train",
]
