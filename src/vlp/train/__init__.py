"""Training: it receives a built model (`fit`) and never builds one; optimizer and schedule,
atomic resumable checkpoints, the loop. `vlp.run.train` builds the model a config names and calls
`fit`."""

from vlp.contract import unwrap_model
from vlp.store import find_checkpoint, list_checkpoints
from vlp.train.checkpoint import load_checkpoint, save_checkpoint
from vlp.train.config import TrainConfig
from vlp.train.optim import WarmupCosine, build_optimizer, param_groups
from vlp.train.trainer import fit

__all__ = [
    "TrainConfig",
    "WarmupCosine",
    "build_optimizer",
    "find_checkpoint",
    "fit",
    "list_checkpoints",
    "load_checkpoint",
    "param_groups",
    "save_checkpoint",
    "unwrap_model",
]
