"""The training config: every option of a run, its defaults and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlp.config import check_fields
from vlp.errors import ConfigError
from vlp.train.distributed import STRATEGIES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # model: a preset name, or a model / checkpoint directory whose weights start the run
    model: str = "clip-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # nested config fields
    tokenizer: str | None = None  # tokenizer dir; None: the init dir's, else a BPE on captions
    # data (kinds: csv, tsv, jsonl, coco, imagefolder, wds, auto)
    train_data: str = ""
    train_kind: str = "auto"
    val_data: str | None = None  # val loss is computed at each evaluation when given
    val_kind: str = "auto"
    image_key: str | None = None  # source options; None keeps each source's default
    caption_key: str | None = None
    separator: str | None = None
    image_root: str | None = None  # COCO image dir, or the root of relative CSV/JSONL paths
    # text-only corpus mixed into every batch (models that train on text alone, e.g. SimVLM):
    # a .txt file (one text per line) or JSONL (caption_key, else "text" / "caption")
    text_data: str | None = None
    text_ratio: float = 0.5  # share of each batch's batch_size samples that are text-only
    # optimisation
    batch_size: int = 64  # per optimizer micro-step; an update sees batch_size * grad_accum
    grad_accum: int = 1
    # with grad_accum > 1: contrastive losses over the whole accumulated batch, from features
    # cached without grad (two forwards per sample); False: independent micro-batch losses
    accum_features: bool = True
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_steps: int | None = None  # with epochs too, whichever ends first
    epochs: int | None = None
    grad_clip: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    max_nonfinite: int = 10  # consecutive non-finite steps (skipped) before the run stops
    # run
    output_dir: str = "runs/train"
    eval_every: int = 0  # optimizer steps; evaluation also runs at the end
    checkpoint_every: int = 0  # optimizer steps; a checkpoint is also written at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    log_every: int = 10  # steps between progress updates (every step is still logged)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"  # "auto": CUDA when available
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; fp16 scales loss
    # torchrun (distributed) runs: "ddp" or "fsdp" (FSDP2, parameters sharded per block);
    # contrastive features are gathered with gradients, each rank scoring its own rows
    strategy: str = "ddp"
    local_loss: bool = True
    gather_with_grad: bool = True
    compile: bool = False
    grad_checkpointing: bool = False
    resume: str | None = None  # "latest" (of output_dir; fresh start when none) or a path
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        check_fields(cls, data, "train config")
        values = dict(data)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def check_config(cfg: TrainConfig) -> None:
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "log_every": cfg.log_every}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 1")
    for name in ("eval_every", "checkpoint_every", "keep_last", "warmup_steps", "num_workers",
                 "max_nonfinite"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 0")
    if cfg.max_steps is None and cfg.epochs is None:
        raise ConfigError("train config: set max_steps or epochs (or both)")
    for name in ("max_steps", "epochs"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 1 or None")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"train config precision={cfg.precision!r}; expected one of "
                          f"{list(PRECISIONS)}")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"train config strategy={cfg.strategy!r}; expected one of "
                          f"{list(STRATEGIES)}")
    if not cfg.train_data:
        raise ConfigError("train config train_data is empty; expected a data file or directory")
    if cfg.text_data is not None:
        rows = text_rows(cfg)
        if not 0 < cfg.text_ratio < 1 or not 0 < rows < cfg.batch_size:
            raise ConfigError(f"train config text_ratio={cfg.text_ratio!r} with batch_size "
                              f"{cfg.batch_size} gives {rows} text-only rows per batch; "
                              "expected a ratio in (0, 1) leaving at least one row of each")


def text_rows(cfg: TrainConfig) -> int:
    """Text-only rows of each micro-batch; the image-text loader gives the rest."""
    return round(cfg.batch_size * cfg.text_ratio) if cfg.text_data is not None else 0
