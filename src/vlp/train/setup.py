"""What a run needs before its first step: the model and
tokenizer (fresh or from a directory), precision, and where a resumed run picks up."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlp.config import config_from_dict, config_to_dict, get_preset, load_config
from vlp.data import build_source
from vlp.errors import ConfigError
from vlp.models import build_model
from vlp.tokenizers import load_tokenizer, train_tokenizer
from vlp.train.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    list_checkpoints,
    load_weights,
)
from vlp.train.config import TrainConfig
from vlp.train.distributed import DistEnv, barrier

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


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_run_source(kind: str, path: str, cfg: TrainConfig) -> Any:
    options = {name: getattr(cfg, name) for name in ("image_key", "caption_key", "separator",
                                                     "image_root")}
    return build_source(kind, path, **{k: v for k, v in options.items() if v is not None})


def _captions(source: Any, where: str) -> Iterator[str]:
    if not getattr(source, "has_text", True):
        raise ConfigError(f"{where}: has no captions to train a tokenizer on; pass "
                          "tokenizer=<a tokenizer directory>")
    for record in source:
        if record.text:
            yield record.text
        if record.answer:  # VQA rows: the answers are text the model reads too
            yield record.answer


def model_and_tokenizer(cfg: TrainConfig, source: Any, output_dir: Path, env: DistEnv,
                        text_corpus: Iterable[str] = ()) -> tuple[nn.Module, Any]:
    """A fresh model (preset or init directory) and the tokenizer its text tower reads (a new
    BPE learns the captions and ``text_corpus``)."""
    init_dir = Path(cfg.model) if Path(cfg.model).is_dir() else None
    if init_dir is not None:
        config = load_config(init_dir / CONFIG_FILE)
    else:
        config = get_preset(cfg.model)
    if cfg.model_overrides:
        config = config_from_dict(_merge(config_to_dict(config), cfg.model_overrides),
                                  where="train config model_overrides")
    feed = batch_text(config)
    if feed is not None:  # batches carry another model's text (BLIP-2 stage 2: the LLM's)
        path = cfg.tokenizer or feed[0]
        if path is None:
            raise ConfigError("train config: this model's batches are tokenised for its LLM; "
                              "pass tokenizer=<the LLM's tokenizer directory>")
        tokenizer = load_tokenizer(path, context_length=feed[1])
        model = build_model(config)
        check = getattr(model, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)
        if init_dir is not None:
            _load_init(model, init_dir)
        return model, tokenizer
    text = config.text
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer, context_length=text.context_length)
    elif init_dir is not None and (init_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(init_dir, context_length=text.context_length)
    else:  # a BPE on the captions; distributed, rank 0 trains it and every rank loads it
        shared = output_dir / "tokenizer"
        if env.is_main:
            tokenizer = train_tokenizer(itertools.chain(_captions(source, cfg.train_data),
                                                        text_corpus),
                                        vocab_size=text.vocab_size,
                                        context_length=text.context_length)
            if env.distributed:
                tokenizer.save(shared)
        barrier(env)
        if not env.is_main:
            tokenizer = load_tokenizer(shared, context_length=text.context_length)
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"text.vocab_size is {text.vocab_size}")
    text.pad_id, text.bos_id, text.eos_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    model = build_model(config)
    if init_dir is not None:
        _load_init(model, init_dir)
    return model, tokenizer


def batch_text(config: Any) -> tuple[str | None, int] | None:
    """(tokenizer directory, context length) when a model's batches hold text for another
    model than its own text tower (its config's ``batch_text()``); None for the usual case."""
    feed = getattr(config, "batch_text", None)
    return feed() if callable(feed) else None


def batch_context_length(config: Any) -> int:
    """Context length of the text in the model's batches."""
    feed = batch_text(config)
    return feed[1] if feed is not None else config.text.context_length


def _load_init(model: nn.Module, init_dir: Path) -> None:
    """Strict (overrides may change options, not shapes), unless the model has its own rules
    for starting from another stage's checkpoint (``init_from``: BLIP-2 stage 1 -> 2)."""
    init_from = getattr(model, "init_from", None)
    if init_from is not None:
        init_from(init_dir / WEIGHTS_FILE)
    else:
        load_weights(model, init_dir / WEIGHTS_FILE)


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
