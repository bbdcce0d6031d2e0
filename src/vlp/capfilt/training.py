"""Stages 1 and 5 through the normal trainer: fine-tune the captioner (LM) and the filter
(ITC + ITM) from one pretrained BLIP on clean pairs, and pretrain a new model on the
bootstrapped dataset. Runs resume from their latest checkpoint when repeated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlp.capfilt.config import CapfiltConfig
from vlp.capfilt.output import dataset_csv
from vlp.capfilt.stages import MODELS_DIR, check_role
from vlp.config import load_config
from vlp.errors import CheckpointError, ConfigError
from vlp.run import train
from vlp.store import CONFIG_FILE, find_checkpoint
from vlp.train import TrainConfig

# role -> BLIP objectives it is fine-tuned on (§4: captioner = LM, filter = ITC + ITM)
ROLE_OBJECTIVES = {"captioner": ("lm",), "filter": ("itc", "itm"),
                   "shared": ("itc", "itm", "lm")}


def _pretrained_dir(cfg: CapfiltConfig) -> Path:
    if cfg.pretrained is None:
        raise ConfigError("capfilt pretrained is not set; expected the BLIP checkpoint the "
                          "captioner and filter start from")
    path = Path(cfg.pretrained)
    if not path.exists():
        raise CheckpointError(f"capfilt pretrained={cfg.pretrained}: checkpoint not found")
    if not (path / CONFIG_FILE).is_file():
        path = find_checkpoint(path, "latest")
    config = load_config(path / CONFIG_FILE)
    for role in ("captioner", "filter"):
        check_role(config, role, f"{path} (pretrained)")
    return path


def _train(cfg: CapfiltConfig, **fields: Any) -> dict[str, Any]:

    fields.setdefault("weight_decay", 0.05)
    return train(TrainConfig(seed=cfg.seed, num_workers=cfg.num_workers, device=cfg.device,
                             progress=cfg.progress, resume="latest", **fields))


def finetune(cfg: CapfiltConfig) -> dict[str, str]:
    """Fine-tune the captioner and the filter separately (or one shared model when
    ``cfg.share``) under ``out/models``; returns each role's final checkpoint. The captioner
    (and a shared model) learns ``cfg.prompt`` + caption with the prompt's tokens out of the
    loss, as it will caption; the distillation weight ramps over each run's first epoch (as
    BLIP's fine-tuning), whatever the pretrained checkpoint set."""
    pretrained = _pretrained_dir(cfg)
    if not cfg.clean_data:
        raise ConfigError("capfilt clean_data is not set; expected human-annotated pairs "
                          "(CSV/TSV/JSONL/COCO/WDS) to fine-tune the captioner and filter on")
    roles = ("shared",) if cfg.share else ("captioner", "filter")
    checkpoints = {}
    for role in roles:
        result = _train(
            cfg, model=str(pretrained),
            model_overrides={"objectives": list(ROLE_OBJECTIVES[role]),
                             "alpha_warmup_steps": None},
            lm_prompt=(cfg.prompt or None) if role != "filter" else None,
            train_data=cfg.clean_data, output_dir=str(cfg.out_dir / MODELS_DIR / role),
            batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
            warmup_steps=max(1, cfg.finetune_steps // 10), max_steps=cfg.finetune_steps,
            log_every=max(1, cfg.finetune_steps // 10))
        checkpoints[role] = result["checkpoint"]
    if cfg.share:
        checkpoints = {"captioner": checkpoints["shared"], "filter": checkpoints["shared"]}
    return checkpoints


def pretrain(cfg: CapfiltConfig, train_data: str | None = None,
             output_dir: str | None = None) -> dict[str, Any]:
    """Pretrain ``cfg.pretrain_model`` (a preset or checkpoint) with the normal trainer on the
    bootstrapped dataset into ``out/pretrain``, or on ``train_data`` into ``output_dir`` with
    the same settings (the baselines a bootstrapped dataset is compared with); returns the
    trainer's result."""
    steps = cfg.pretrain_steps
    return _train(cfg, model=cfg.pretrain_model, tokenizer=cfg.pretrain_tokenizer,
                  train_data=train_data or dataset_csv(cfg),
                  output_dir=output_dir or str(cfg.out_dir / "pretrain"),
                  batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr,
                  weight_decay=cfg.pretrain_weight_decay, warmup_steps=max(1, steps // 10),
                  max_steps=steps, log_every=max(1, steps // 10))
