"""`CapfiltConfig`: every CapFilt stage's settings in one JSON-ready dataclass, and the checks
that name the field at fault."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.cliargs import fast_decode_option, option
from vlp.config import check_fields
from vlp.data.sources import source_option
from vlp.errors import ConfigError
from vlp.store.files import atomic_write_text
from vlp.train.config import TrainConfig

STAGES = ("finetune", "caption", "filter", "write", "pretrain")
# BLIP's sampled caption lengths (its generate's min_length, max_length): [DEC], the prompt's
# tokens and the caption's, as transformers counts them
BLIP_MIN_LENGTH, BLIP_MAX_LENGTH = 10, 30
SAMPLINGS = ("nucleus", "beam")
BACKENDS = ("local", "ray")
DATA_KINDS = ("auto", "csv", "tsv", "jsonl", "coco", "wds")


@dataclass
class CapfiltConfig:
    """BLIP's dataset bootstrapping (§4): captioner + filter fine-tuned on clean pairs, then
    every web image captioned and every caption (web and synthetic) filtered by ITM. Each field
    is also a ``vlp capfilt`` flag (``--kebab-case``) with the field's default and help
    (`vlp.cliargs`)."""

    out: str = option("runs/capfilt", "directory of every stage's output: models/, captions/, "
                      "filtered/, dataset/")
    data: str = option("", "web data to bootstrap: CSV/TSV/JSONL/COCO, or WebDataset shards "
                       "(each shard is a work unit)", section="web data")
    kind: str = option("auto", "format of the web data; auto: from the path",
                       choices=DATA_KINDS)
    image_key: str | None = source_option("image_key")
    caption_key: str | None = source_option("caption_key")
    separator: str | None = source_option("separator")
    image_root: str | None = source_option("image_root")
    unit_size: int = option(1000, "images per work unit of a CSV/JSONL/COCO source")
    pretrained: str | None = option(
        None, "BLIP checkpoint the captioner (LM) and the filter (ITC + ITM) are fine-tuned "
        "from", section="stage 1: finetune")
    clean_data: str | None = option(None, "human-annotated pairs to fine-tune on")
    share: bool = option(False, "one model trained on ITC + ITM + LM as both captioner and "
                         "filter (the paper's ablation)")
    finetune_steps: int = option(100, "optimizer steps of each fine-tuning")
    finetune_batch_size: int = option(32, "fine-tuning batch size")
    finetune_lr: float = option(1e-4, "fine-tuning peak learning rate")
    captioner: str | None = option(None, "captioner checkpoint (default: OUT/models/captioner, "
                                   "stage 1's)", section="stages 2-3: models")
    filter: str | None = option(None, "filter checkpoint (default: OUT/models/filter, stage "
                                "1's)")
    sampling: str = option("nucleus", "nucleus sampling (as BLIP) or beam search",
                           choices=SAMPLINGS, section="stage 2: caption")
    top_p: float = option(0.9, "nucleus sampling probability mass (BLIP's)")
    top_k: int = option(50, "nucleus sampling draws among the top_k most likely tokens only, "
                        "before top_p (BLIP's, transformers' default); 0: no top-k")
    repetition_penalty: float = option(1.1, "nucleus sampling's repetition penalty (BLIP's; 1: "
                                       "none): logits of tokens already in the caption or "
                                       "prompt are divided by it (multiplied when negative)")
    num_beams: int = option(3, "beams with sampling=beam")
    num_captions: int = option(1, "synthetic captions per image")
    min_new_tokens: int | None = option(None, "no eos before this many caption tokens; "
                                        "default: BLIP's min_length 10, which counts [DEC] "
                                        "and the prompt's tokens too")
    max_new_tokens: int | None = option(None, "caption length limit in tokens; default: "
                                        "BLIP's max_length 30, which counts [DEC] and the "
                                        "prompt's tokens too")
    prompt: str | None = option("a picture of ", "text every caption starts from, left out of "
                                "the written caption; the captioner is fine-tuned on it before "
                                "each caption, its tokens without loss (BLIP's); '' for none")
    caption_batch_size: int = option(32, "images per generate call")
    itm_threshold: float = option(0.5, "keep a caption when its ITM P(match) is at least this",
                                  section="stage 3: filter")
    itc_threshold: float | None = option(None, "also require this ITC cosine similarity "
                                         "(default: none)")
    filter_batch_size: int = option(32, "images per ITM batch (each with all its captions)")
    shard_size: int = option(1000, "samples (kept captions) per output WebDataset shard",
                             section="stage 4: write")
    report_examples: int = option(16, "examples shown in the report")
    pretrain_model: str = option("blip-tiny", "preset or checkpoint pretrained on the "
                                 "bootstrapped data with the normal trainer",
                                 section="stage 5: pretrain")
    pretrain_steps: int = option(100, "pretraining optimizer steps")
    pretrain_batch_size: int = option(32, "pretraining batch size")
    pretrain_lr: float = option(3e-4, "pretraining peak learning rate (BLIP's)")
    pretrain_weight_decay: float = option(0.05, "pretraining AdamW weight decay (BLIP's)")
    pretrain_tokenizer: str | None = option(None, "tokenizer directory (default: the "
                                            "trainer's, a BPE trained on the captions)")
    backend: str = option("local", "how stages 2-3 run: local (this process) or ray (Ray Data "
                          "actors; pip install 'vlp[ray]')", choices=BACKENDS,
                          section="execution")
    ray_address: str | None = option(None, "Ray cluster address (default: the running Ray, "
                                     "else a new local cluster)")
    ray_actors: int = option(2, "Ray actors per stage")
    ray_cpus_per_actor: float = option(1.0, "CPUs each Ray actor reserves")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda")
    fast_decode: bool = fast_decode_option()  # stages 2-3 (captioning and filtering)
    # the trainer's own default: stages 1 and 5 are training runs
    num_workers: int = option(TrainConfig.num_workers, "data loader worker processes of the "
                              "trainer (stages 1 and 5)")
    progress: bool = option(True, "show progress bars")

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
                 "num_captions", "caption_batch_size", "filter_batch_size",
                 "shard_size", "pretrain_steps", "pretrain_batch_size", "ray_actors"):
        if not _is_int(getattr(cfg, name), 1):
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected an int >= 1")
    for name in ("report_examples", "seed", "num_workers", "top_k"):
        if not _is_int(getattr(cfg, name), 0):
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected an int >= 0")
    for name, low in (("min_new_tokens", 0), ("max_new_tokens", 1)):
        if getattr(cfg, name) is not None and not _is_int(getattr(cfg, name), low):
            raise ConfigError(f"capfilt {name}={getattr(cfg, name)!r}: expected None (BLIP's "
                              f"length) or an int >= {low}")
    if not isinstance(cfg.itm_threshold, int | float) or not 0.0 <= cfg.itm_threshold <= 1.0:
        raise ConfigError(f"capfilt itm_threshold={cfg.itm_threshold!r}: expected a "
                          "probability in [0, 1]")
    if cfg.itc_threshold is not None and (not isinstance(cfg.itc_threshold, int | float)
                                          or not -1.0 <= cfg.itc_threshold <= 1.0):
        raise ConfigError(f"capfilt itc_threshold={cfg.itc_threshold!r}: expected None or a "
                          "cosine similarity in [-1, 1]")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"capfilt top_p={cfg.top_p!r}: expected a value in (0, 1]")
    if None not in (cfg.min_new_tokens, cfg.max_new_tokens) \
            and cfg.min_new_tokens > cfg.max_new_tokens:
        raise ConfigError(f"capfilt min_new_tokens={cfg.min_new_tokens} exceeds max_new_tokens="
                          f"{cfg.max_new_tokens}")
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
    for name in ("finetune_lr", "pretrain_lr", "ray_cpus_per_actor", "repetition_penalty"):
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
