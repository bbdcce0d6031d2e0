"""`CapfiltConfig`: every CapFilt stage's settings in one JSON-ready dataclass, and the checks
that name the field at fault."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.config import check_fields
from vlp.errors import ConfigError
from vlp.fileio import atomic_write_text

STAGES = ("finetune", "caption", "filter", "write", "pretrain")
SAMPLINGS = ("nucleus", "beam")
BACKENDS = ("local", "ray")


@dataclass
class CapfiltConfig:
    """BLIP's dataset bootstrapping (§4): captioner + filter fine-tuned on clean pairs, then
    every web image captioned and every caption (web and synthetic) filtered by ITM."""

    out: str = "runs/capfilt"  # stage outputs: models/, captions/, filtered/, dataset/
    # web data to bootstrap (kinds: csv, tsv, jsonl, coco, wds, auto); WebDataset shards are
    # the work units, CSV/JSONL/COCO images are split into units of unit_size images
    data: str = ""
    kind: str = "auto"
    image_key: str | None = None  # source options; None keeps each source's default
    caption_key: str | None = None
    separator: str | None = None
    image_root: str | None = None
    unit_size: int = 1000
    # stage 1: captioner (LM) and filter (ITC + ITM) fine-tuned from one BLIP checkpoint on
    # clean pairs; share=True trains one model on all three for both (the paper's ablation)
    pretrained: str | None = None
    clean_data: str | None = None
    share: bool = False
    finetune_steps: int = 100
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-4
    # stages 2-3 models; None: the stage-1 outputs under out/models
    captioner: str | None = None
    filter: str | None = None
    # stage 2: synthetic captions per image (nucleus sampling, as BLIP; or beam search)
    sampling: str = "nucleus"
    top_p: float = 0.9
    num_beams: int = 3
    num_captions: int = 1
    max_new_tokens: int = 20
    prompt: str | None = None  # BLIP: "a picture of " (left out of the written caption)
    caption_batch_size: int = 32  # images per generate call
    # stage 3: keep a caption when P(match) from the ITM head >= itm_threshold (and, when set,
    # its ITC cosine similarity >= itc_threshold)
    itm_threshold: float = 0.5
    itc_threshold: float | None = None
    filter_batch_size: int = 32  # images per ITM batch (each with all its captions)
    # stage 4: output WebDataset shard size (samples = kept captions), report examples
    shard_size: int = 1000
    report_examples: int = 16
    # stage 5: pretrain a new model on the bootstrapped data with the normal trainer
    pretrain_model: str = "blip-tiny"
    pretrain_steps: int = 100
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-4
    pretrain_weight_decay: float = 0.05
    pretrain_tokenizer: str | None = None  # None: the trainer's (a BPE on the captions)
    # execution of stages 2-3: "local" (this process) or "ray" (Ray Data actors)
    backend: str = "local"
    ray_address: str | None = None  # None: the running Ray, else a new local cluster
    ray_actors: int = 2  # actors per stage
    ray_cpus_per_actor: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available
    num_workers: int = 0  # trainer data workers (stages 1 and 5)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CapfiltConfig:
        check_fields(cls, data, "capfilt config")
        return cls(**data)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_config(cfg: CapfiltConfig) -> None:
    """Raise ConfigError naming the first field whose value no stage can use."""
    for name in ("unit_size", "finetune_steps", "finetune_batch_size", "num_beams",
                 "num_captions", "max_new_tokens", "caption_batch_size", "filter_batch_size",
                 "shard_size", "pretrain_steps", "pretrain_batch_size", "ray_actors"):
        if not _is_int(getattr(cfg, name), 1):
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected an int >= 1")
    for name in ("report_examples", "seed", "num_workers"):
        if not _is_int(getattr(cfg, name), 0):
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected an int >= 0")
    if not isinstance(cfg.itm_threshold, int | float) or not 0.0 <= cfg.itm_threshold <= 1.0:
        raise ConfigError(f"capfilt itm_threshold={cfg.itm_threshold!r}: expected a "
                          "probability in [0, 1]")
    if cfg.itc_threshold is not None and (not isinstance(cfg.itc_threshold, int | float)
                                          or not -1.0 <= cfg.itc_threshold <= 1.0):
        raise ConfigError(f"capfilt itc_threshold={cfg.itc_threshold!r}: expected None or a "
                          "cosine similarity in [-1, 1]")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"capfilt top_p={cfg.top_p!r}: expected a value in (0, 1]")
    if cfg.sampling not in SAMPLINGS:
        raise ConfigError(f"capfilt sampling={cfg.sampling!r}; expected one of {list(SAMPLINGS)}")
    if cfg.sampling == "beam" and cfg.num_captions > 1:
        raise ConfigError(f"capfilt num_captions={cfg.num_captions} with sampling='beam' would "
                          "repeat one caption; use sampling='nucleus' for several")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"capfilt backend={cfg.backend!r}; expected one of {list(BACKENDS)}")
    if not isinstance(cfg.pretrain_weight_decay, int | float) or cfg.pretrain_weight_decay < 0:
        raise ConfigError(f"capfilt pretrain_weight_decay={cfg.pretrain_weight_decay!r}: "
                          "expected a value >= 0")
    for name in ("finetune_lr", "pretrain_lr", "ray_cpus_per_actor"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected a value > 0")
    if not cfg.out:
        raise ConfigError("capfilt out is empty; expected an output directory")


def guard_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record the settings a stage's outputs depend on, or refuse to mix outputs made with
    other settings into the same directory (a resumed run must repeat the first one)."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = None
        if isinstance(previous, dict):
            changed = sorted(k for k in set(settings) | set(previous)
                             if settings.get(k) != previous.get(k))
            if changed:
                details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
                                    for k in changed)
                raise ConfigError(f"{path.parent}: holds outputs made with other settings "
                                  f"({details}); use a new out directory or delete "
                                  f"{path.parent} to redo the stage")
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
