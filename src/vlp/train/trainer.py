"""The training loop: loader -> ``model(batch)["loss"]`` -> AdamW -> log, eval, checkpoint.

The trainer knows one thing about models: ``forward(batch)`` returns ``{"loss", "losses"}``.
Every optimizer step gets one JSONL record in ``output_dir/log.jsonl``; checkpoints hold
everything needed (weights, optimizer, schedule, RNG, loader position) for a resumed run to
reproduce an uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlp.config import config_from_dict, config_to_dict, get_preset, load_config
from vlp.data import build_source, image_transform, make_loader
from vlp.errors import ConfigError, DataError, VlpError
from vlp.fileio import atomic_write_text
from vlp.models import build_model
from vlp.tokenizers import load_tokenizer, train_tokenizer
from vlp.train.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from vlp.train.optim import WarmupCosine, build_optimizer

PRECISIONS = ("auto", "fp32", "bf16")
LOG_FILE = "log.jsonl"
CONFIG_SNAPSHOT = "train_config.json"

EvalFn = Callable[[nn.Module, Any, int], dict[str, Any]]  # (model, tokenizer, step)


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
    # optimisation
    batch_size: int = 64  # per optimizer micro-step; an update sees batch_size * grad_accum
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_steps: int | None = None  # with epochs too, whichever ends first
    epochs: int | None = None
    grad_clip: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    # run
    output_dir: str = "runs/train"
    eval_every: int = 0  # optimizer steps; evaluation also runs at the end
    checkpoint_every: int = 0  # optimizer steps; a checkpoint is also written at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    log_every: int = 10  # steps between progress updates (every step is still logged)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"  # "auto": CUDA when available
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False
    grad_checkpointing: bool = False
    resume: str | None = None  # "latest" (of output_dir; fresh start when none) or a path
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"train config: unknown field(s) {unknown}; expected some of "
                              f"{sorted(names)}")
        values = dict(data)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def _check_config(cfg: TrainConfig) -> None:
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "log_every": cfg.log_every}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train config {name}={value!r}: expected an int >= 1")
    for name in ("eval_every", "checkpoint_every", "keep_last", "warmup_steps", "num_workers"):
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
    if not cfg.train_data:
        raise ConfigError("train config train_data is empty; expected a data file or directory")


# ---------------------------------------------------------------------------------------------
# setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _source(kind: str, path: str, cfg: TrainConfig) -> Any:
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


def _model_and_tokenizer(cfg: TrainConfig, source: Any) -> tuple[nn.Module, Any]:
    """A fresh model (preset or init directory) and the tokenizer its text tower reads."""
    init_dir = Path(cfg.model) if Path(cfg.model).is_dir() else None
    if init_dir is not None:
        config = load_config(init_dir / CONFIG_FILE)
    else:
        config = get_preset(cfg.model)
    if cfg.model_overrides:
        config = config_from_dict(_merge(config_to_dict(config), cfg.model_overrides),
                                  where="train config model_overrides")
    text = config.text
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer, context_length=text.context_length)
    elif init_dir is not None and (init_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(init_dir, context_length=text.context_length)
    else:
        tokenizer = train_tokenizer(_captions(source, cfg.train_data), vocab_size=text.vocab_size,
                                    context_length=text.context_length)
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"text.vocab_size is {text.vocab_size}")
    text.pad_id, text.bos_id, text.eos_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    model = build_model(config)
    if init_dir is not None:  # strict: overrides may change options, not shapes
        load_weights(model, init_dir / WEIGHTS_FILE)
    return model, tokenizer


def _resume_dir(cfg: TrainConfig, output_dir: Path) -> Path | None:
    if cfg.resume is None:
        if list_checkpoints(output_dir):
            raise ConfigError(f"{output_dir}: already holds checkpoints; pass resume='latest' "
                              "to continue that run or choose a new output_dir")
        return None
    if cfg.resume == "latest":
        return find_checkpoint(output_dir) if list_checkpoints(output_dir) else None
    return find_checkpoint(cfg.resume)


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"train data gives {batches_per_epoch} batch(es) per epoch, fewer than "
                          f"grad_accum={cfg.grad_accum}; lower batch_size or grad_accum")
    candidates = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.epochs is not None:
        candidates.append(cfg.epochs * batches_per_epoch // cfg.grad_accum)
    return min(candidates)


# ---------------------------------------------------------------------------------------------
# logging


def _plain(value: Any) -> Any:
    """JSON form of metric values an eval_fn may return: tensors and numpy numbers."""
    if isinstance(value, Tensor | np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a log record is not JSON serialisable")


class RunLog:
    """``log.jsonl``: step records are buffered as device tensors and turned into numbers in
    one transfer per flush, so logging every step costs no per-step GPU sync."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.last: dict[str, Any] = {}  # the newest step record
        if resume_step is None:
            path.write_text("")
        else:  # drop records from after the checkpoint: they are about to be redone
            kept = []
            if path.is_file():
                for line in path.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):
                        record = json.loads(line)
                        if record.get("step", 0) <= resume_step:
                            kept.append(line + "\n")
                            if "loss" in record:
                                self.last = record
            atomic_write_text(path, "".join(kept))
        self._file = path.open("a")
        self._pending: list[tuple[dict[str, Any], list[str], Tensor]] = []

    def add_step(self, record: dict[str, Any], values: dict[str, Tensor]) -> None:
        names = list(values)
        self._pending.append((record, names, torch.stack([values[n].float() for n in names])))

    def write(self, record: dict[str, Any]) -> None:
        self.flush()
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        numbers = torch.stack([values for _, _, values in self._pending]).tolist()
        for (record, names, _), row in zip(self._pending, numbers, strict=True):
            record.update(zip(names, row, strict=True))
            self._file.write(json.dumps(record) + "\n")
            self.last = record
        self._pending.clear()
        self._file.flush()
        if not math.isfinite(self.last["loss"]):
            raise VlpError(f"training diverged: loss is {self.last['loss']} at step "
                           f"{self.last['step']} (lr {self.last['lr']:.3g}); lower lr or use "
                           "precision='fp32'")

    def close(self) -> None:
        with contextlib.suppress(VlpError):
            self.flush()
        self._file.close()


# ---------------------------------------------------------------------------------------------
# the loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def _batch_size(batch: dict[str, Any]) -> int:
    return next(value.shape[0] for value in batch.values() if isinstance(value, Tensor))


@torch.no_grad()
def _val_loss(model: nn.Module, loader: Any, device: torch.device, autocast: Callable) -> float:
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in loader:
        batch = _to_device(batch, device)
        with autocast():
            loss = model(batch)["loss"]
        size = _batch_size(batch)
        total += loss.float() * size
        count += size
    model.train(was_training)
    return (total / max(count, 1)).item()


class _Batches:
    """An endless stream of ``(epoch, batch)`` over successive epochs of `loader`.

    An epoch ends eagerly, with its last batch, so a checkpoint taken right after it resumes
    at the next epoch; `ended` collects ``{"epoch", "skipped"}`` for each finished epoch.
    """

    def __init__(self, loader: Any, epoch: int) -> None:
        self.loader = loader
        self.epoch = epoch
        self.ended: list[dict[str, Any]] = []
        self._iterator: Iterator | None = None
        self._whole_epoch_empty = False

    def next(self) -> tuple[int, dict[str, Any]]:
        while True:
            if self._iterator is None:
                self.loader.set_epoch(self.epoch)  # kept as loaded right after a resume
                self._whole_epoch_empty = self.loader.batches_done == 0
                self._iterator = iter(self.loader)
            epoch = self.epoch
            batch = next(self._iterator, None)
            if batch is None:  # the last batches held only skipped samples
                if self._whole_epoch_empty:
                    raise DataError(f"epoch {epoch} gave no batch: every sample was skipped "
                                    f"({self.loader.skipped_report()})")
                self._finish_epoch()
                continue
            self._whole_epoch_empty = False
            if self.loader.batches_done >= len(self.loader):
                self._finish_epoch()
            return epoch, batch

    def _finish_epoch(self) -> None:
        self.ended.append({"epoch": self.epoch, "skipped": self.loader.skipped_report()})
        self.epoch += 1
        self.close()

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()  # stops DataLoader workers now, not at garbage collection
        self._iterator = None


@dataclass
class _Run:
    """Everything a run owns once set up (fresh or resumed)."""

    model: nn.Module
    tokenizer: Any
    loader: Any
    val_loader: Any | None
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    total_steps: int
    step: int
    epoch: int
    resumed_from: Path | None


def _set_up(cfg: TrainConfig, output_dir: Path, device: torch.device) -> _Run:
    seed_everything(cfg.seed)
    resume_dir = _resume_dir(cfg, output_dir)
    train_source = _source(cfg.train_kind, cfg.train_data, cfg)
    if resume_dir is None:
        model, tokenizer = _model_and_tokenizer(cfg, train_source)
    else:  # the checkpoint's own config and tokenizer, whatever cfg.model says
        model = build_model(load_config(resume_dir / CONFIG_FILE))
        tokenizer = load_tokenizer(resume_dir, context_length=model.config.text.context_length)
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loader = make_loader(train_source, transform=image_transform(model.config, train=True),
                         tokenizer=tokenizer, batch_size=cfg.batch_size, train=True,
                         seed=cfg.seed, num_workers=cfg.num_workers)
    val_loader = None
    if cfg.val_data is not None:
        val_loader = make_loader(_source(cfg.val_kind, cfg.val_data, cfg),
                                 transform=image_transform(model.config, train=False),
                                 tokenizer=tokenizer, batch_size=cfg.batch_size, train=False,
                                 seed=cfg.seed, num_workers=cfg.num_workers)
    total_steps = _total_steps(cfg, len(loader))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps)
    scheduler = WarmupCosine(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    step = epoch = 0
    if resume_dir is not None:  # last: restores the RNG states the steps ahead will draw from
        state = load_checkpoint(resume_dir, model, optimizer, scheduler)
        step, epoch = state["step"], state["epoch"]
        loader.load_state_dict(state["data"])
    return _Run(model, tokenizer, loader, val_loader, optimizer, scheduler, total_steps, step,
                epoch, resume_dir)


def train(cfg: TrainConfig, eval_fn: EvalFn | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns ``{"step", "epoch", "loss", "checkpoint", "eval",
    "output_dir"}`` (``eval``: the last evaluation's metrics, {} when none ran).

    `eval_fn(model, tokenizer, step) -> metrics` runs in eval mode under no_grad every
    `eval_every` steps and at the end. On CPU a resumed run repeats an uninterrupted one exactly.
    """
    _check_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    run = _set_up(cfg, output_dir, device)
    model, optimizer, scheduler, loader = run.model, run.optimizer, run.scheduler, run.loader
    step, total_steps = run.step, run.total_steps
    atomic_write_text(output_dir / CONFIG_SNAPSHOT, json.dumps(cfg.to_dict(), indent=2) + "\n")

    log = RunLog(output_dir / LOG_FILE, resume_step=step if run.resumed_from else None)
    forward = torch.compile(model) if cfg.compile else model
    autocast = functools.partial(_autocast, cfg.precision, device)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
    batches = _Batches(loader, run.epoch)
    progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=None if cfg.progress else True, desc="train")
    print_lines = cfg.progress and progress.disable  # no TTY: a plain line per log_every
    checkpoint_path = str(run.resumed_from) if run.resumed_from else None
    metrics: dict[str, Any] = {}

    def evaluate() -> None:
        nonlocal metrics
        metrics = {}
        if run.val_loader is not None:
            metrics["val_loss"] = _val_loss(model, run.val_loader, device, autocast)
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                metrics.update(eval_fn(model, run.tokenizer, step))
            model.train()
        log.write({"step": step, "epoch": batches.epoch, "eval": metrics})

    def checkpoint() -> None:
        nonlocal checkpoint_path
        log.flush()
        checkpoint_path = str(save_checkpoint(
            output_dir, step, model=model, tokenizer=run.tokenizer, optimizer=optimizer,
            scheduler=scheduler, data_state=loader.state_dict(), epoch=batches.epoch,
            keep_last=cfg.keep_last))

    model.train()
    try:
        while step < total_steps:
            started = time.perf_counter()
            sums: dict[str, Tensor] = {}  # "loss" and "loss_<name>" over the micro-batches
            samples = 0
            for _ in range(cfg.grad_accum):
                batch_epoch, batch = batches.next()
                batch = _to_device(batch, device)
                with autocast():
                    out = forward(batch)
                (out["loss"] / cfg.grad_accum).backward()
                terms = {"loss": out["loss"]}
                terms.update((f"loss_{name}", value) for name, value in out["losses"].items())
                for name, value in terms.items():
                    value = value.detach()
                    sums[name] = sums[name] + value if name in sums else value
                samples += _batch_size(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - started
            values = {name: total / cfg.grad_accum for name, total in sums.items()}
            values["grad_norm"] = grad_norm
            log.add_step({"step": step, "epoch": batch_epoch, "lr": lr,
                          "samples_per_s": samples / max(seconds, 1e-9)}, values)
            for record in batches.ended:  # epochs whose last batch this step took
                log.write({"step": step, "end_of_epoch": True, **record})
            batches.ended.clear()
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                log.flush()
                progress.set_postfix(loss=f"{log.last['loss']:.4f}", lr=f"{lr:.2e}",
                                     refresh=False)
                if print_lines:
                    print(f"step {step}/{total_steps} loss {log.last['loss']:.4f} lr {lr:.3g} "
                          f"{log.last['samples_per_s']:.1f} samples/s", file=sys.stderr)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                evaluate()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
        log.flush()
        if eval_fn is not None or run.val_loader is not None:
            evaluate()
        if checkpoint_path is None or Path(checkpoint_path).name != f"checkpoint-{step:07d}":
            checkpoint()
    finally:
        progress.close()
        batches.close()
        log.close()
    return {"step": step, "epoch": batches.epoch, "loss": log.last.get("loss"),
            "checkpoint": checkpoint_path, "eval": metrics, "output_dir": str(output_dir)}
