"""Training: optimizer and schedule, atomic resumable checkpoints, and the training loop."""

from vlp.train.checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_pretrained,
    load_weights,
    save_checkpoint,
    save_pretrained,
)
from vlp.train.config import TrainConfig
from vlp.train.distributed import unwrap_model
from vlp.train.optim import WarmupCosine, build_optimizer, param_groups
from vlp.train.trainer import train

__all__ = [
    "TrainConfig",
    "WarmupCosine",
    "build_optimizer",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_pretrained",
    "load_weights",
    "param_groups",
    "save_checkpoint",
    "save_pretrained",
    "train",
    "unwrap_model",
]
