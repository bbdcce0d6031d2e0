"""What a run needs besides its model: seeding, precision, the data source, where a resumed run
picks up and how a checkpoint's loader state maps onto this run's ranks."""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlp.contract import IMAGE_TEXT, TEXT, PretrainModel
from vlp.data import WebDatasetSource, build_source, infer_source_kind
from vlp.data.shardio import is_stream_url
from vlp.errors import ConfigError, VlpError
from vlp.store import find_checkpoint, list_checkpoints
from vlp.train.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device
              ) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def rng_restore(snapshot: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def oom_message(cfg: TrainConfig, error: BaseException) -> str:
    levers = []
    if not cfg.grad_checkpointing:
        levers.append("--grad-checkpointing (recompute activations in backward)")
    levers.append(f"a smaller micro-batch with accumulation (e.g. --batch-size "
                  f"{max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2}; the "
                  "contrastive loss still covers the whole accumulated batch)")
    if cfg.precision in ("auto", "fp32"):
        levers.append("--precision bf16")
    levers.append("--strategy fsdp under torchrun (shards parameters and optimizer state)")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
    return ("out of memory at batch_size " + str(cfg.batch_size) + f" ({first_line}). Try "
            + "; ".join(levers))


def build_run_source(kind: str, path: str, cfg: TrainConfig, split: str = "train") -> Any:
    """The `split` ("train" or "val") source the config names, with its WebDataset options."""
    options = {name: getattr(cfg, name) for name in ("image_key", "caption_key", "separator",
                                                     "image_root")}
    shards = {"num_samples": getattr(cfg, f"{split}_num_samples")}
    if split == "train":
        shards["resampled"] = cfg.dataset_resampled
        shards["weights"] = _weights(cfg.train_data_weights)
    shards = {name: value for name, value in shards.items() if value not in (None, False)}
    if shards and (infer_source_kind(path) if kind == "auto" else kind) != "wds":
        flags = {"num_samples": f"--{split}-num-samples", "resampled": "--dataset-resampled",
                 "weights": "--train-data-weights"}
        raise ConfigError(f"{', '.join(flags[name] for name in shards)}: for WebDataset "
                          f"shards; {split}_data {path} is not")
    source = build_source(kind, path, **shards,
                          **{k: v for k, v in options.items() if v is not None})
    if (isinstance(source, WebDatasetSource) and not source.num_samples_given
            and any(is_stream_url(shard) for shard in source.shards)):
        source.shard_sizes  # noqa: B018 - shard URLs: their _stats.json, or one line now
    return source


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split("::")]
    except ValueError:
        raise ConfigError(f"train config train_data_weights={text!r}: expected '::'-joined "
                          "numbers, one per '::'-joined train_data pattern") from None


def check_batch_kind(model: PretrainModel, source: Any, field: str, path: str) -> None:
    """ConfigError unless ``model`` trains on the batches ``source`` gives: text-only documents
    (kind "text") for a family with ``"text"`` batches (a language model), images for the
    others."""
    name = type(model).__name__
    if not source.has_images and TEXT not in model.batch_kinds:
        raise ConfigError(f"train config {field}: {path} holds text-only documents but {name} "
                          "trains on images and text; text-only rows join its batches through "
                          "text_data (simvlm)")
    if source.has_images and IMAGE_TEXT not in model.batch_kinds:
        raise ConfigError(f"train config {field}: {path} holds images but {name} trains on "
                          "text alone; expected a text corpus (kind text: .txt or JSONL)")
    if source.has_images and not source.has_text and not source.has_answers:
        raise ConfigError(f"train config {field}: {path} holds images without captions (an "
                          f"image folder's classes are for zero-shot evaluation) but {name} "
                          "trains on images with text; expected captioned data (CSV/TSV, "
                          "JSONL, COCO or WebDataset shards)")


def find_resume_dir(cfg: TrainConfig, output_dir: Path) -> Path | None:
    if cfg.resume is None:
        if list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir}: already holds checkpoints; pass resume='latest' "
                              "to continue that run or choose a new output_dir")
        return None
    if cfg.resume == "latest":
        return find_checkpoint(output_dir) if list_checkpoints(output_dir) else None
    return find_checkpoint(cfg.resume)


def count_total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"train data gives {batches_per_epoch} batch(es) per epoch, fewer than "
                          f"grad_accum={cfg.grad_accum}; lower batch_size or grad_accum")
    candidates = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.epochs is not None:
        candidates.append(cfg.epochs * batches_per_epoch // cfg.grad_accum)
    return min(candidates)


def rank_data_state(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's loader state from a checkpoint's per-rank states. On another world size,
    every rank takes rank 0's position and rank 0 carries the epoch's skip counts."""
    ranks = saved["ranks"]
    if len(ranks) == world_size:
        return ranks[rank]
    state = dict(ranks[0])
    skipped: dict[str, int] = {}
    for other in ranks:
        for reason, count in other.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    state["skipped"] = skipped if rank == 0 else {}
    if "skipped_items" in state:
        state["skipped_items"] = ([item for other in ranks for item in other["skipped_items"]]
                                  if rank == 0 else [])
    return state


# ---------------------------------------------------------------------------------------------
# what a resumed run must share with its checkpoint

# the checkpoint holds these (its model, tokenizer, optimizer state and schedule): a resumed
# run continues with the checkpoint's whatever the config says
CHECKPOINT_SETTINGS = ("model", "model_overrides", "tokenizer", "lr", "weight_decay", "betas",
                       "eps", "warmup_steps", "min_lr_ratio")
# these the config sets, and a change alters the run from here on
# (the batch as every rank's together: a run resumes on another world size with the same one)
RUN_SETTINGS = ("grad_clip", "global_batch_size", "grad_accum", "accum_features",
                "train_data", "train_kind", "text_data", "text_ratio", "image_key", "caption_key",
                "separator", "image_root", "seed", "precision", "lock_image",
                "lock_image_unlocked_groups", "lock_text", "lock_text_unlocked_groups",
                "layer_decay", "ema_decay", "lora_rank", "lora_alpha", "lora_targets",
                "lora_dropout", "augment", "hflip", "schedule", "cooldown_steps",
                "cooldown_power", "train_num_samples", "dataset_resampled", "train_data_weights")
FINGERPRINT_READ = 64 << 20  # bytes hashed from each end of a larger file


def data_fingerprint(path: str) -> str:
    """A hash of the training data behind `path`: a file's bytes (its first and last 64 MiB
    and its size when larger), a directory's relative file names and sizes, a shard pattern's
    shards' names and sizes."""
    digest = hashlib.sha256()
    target = Path(path)
    if target.is_file():
        size = target.stat().st_size
        digest.update(str(size).encode())
        with target.open("rb") as f:
            digest.update(f.read(FINGERPRINT_READ))
            if size > 2 * FINGERPRINT_READ:
                f.seek(size - FINGERPRINT_READ)
            digest.update(f.read())
    else:
        files = (sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir()
                 else [Path(url) for url in _shard_files(path)])
        for file in files:
            size = file.stat().st_size if file.is_file() else -1
            digest.update(f"{file.relative_to(target) if target.is_dir() else file}\0{size}\n"
                          .encode())
    return digest.hexdigest()[:32]


def _shard_files(path: str) -> list[str]:
    from vlp.data.shardio import expand_urls

    try:
        return expand_urls(path)
    except VlpError:  # an unreadable pattern is refused when the source is built
        return [path]


def run_settings(cfg: TrainConfig, fingerprint: str, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it."""
    values = cfg.to_dict()
    values["global_batch_size"] = cfg.batch_size * world_size
    settings = {name: values[name] for name in CHECKPOINT_SETTINGS + RUN_SETTINGS}
    settings["betas"] = list(settings["betas"])
    settings["data_fingerprint"] = fingerprint
    return settings


def resume_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``name: checkpoint's -> now`` for every setting that differs (none for a checkpoint
    that recorded no settings)."""
    if not saved:
        return []
    return [f"{name}: {saved[name]!r} -> {now[name]!r}" for name in now
            if name in saved and saved[name] != now[name]]


def settings_that_ran(cfg: TrainConfig, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The config a resumed run trains with: the checkpoint's model, tokenizer and optimizer
    settings (what it restores), the config's for the rest."""
    values = cfg.to_dict()
    for name in CHECKPOINT_SETTINGS:
        if saved and name in saved:
            values[name] = saved[name]
    return values
