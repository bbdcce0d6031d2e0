"""The training loop: loader -> ``model(batch)["loss"]`` -> AdamW -> log, eval, checkpoint.

The trainer knows little about models: ``forward(batch)`` returns ``{"loss", "losses"}``, and
for accumulation with cached features (`vlp.models.base`) ``features`` / ``loss`` split it.
Every optimizer step gets one JSONL record in ``output_dir/log.jsonl``; checkpoints hold
everything needed (weights, optimizer, schedule, grad scaler, every rank's RNG, loader
position) for a resumed run to reproduce an uninterrupted one step for step. Under
``torchrun`` the same loop runs data-parallel (`vlp.train.distributed`).
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
from vlp.errors import ConfigError, VlpError
from vlp.fileio import atomic_write_text
from vlp.models import build_model
from vlp.models.base import Accumulated
from vlp.tokenizers import load_tokenizer, train_tokenizer
from vlp.train.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    full_model_state,
    full_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
)
from vlp.train.distributed import (
    STRATEGIES,
    DistEnv,
    GatherExchange,
    all_reduce_min,
    barrier,
    broadcast_object,
    full_tensor,
    gather_objects,
    init_distributed,
    is_fsdp,
    no_grad_sync,
    sync_replicated_grads,
    wrap_model,
)
from vlp.train.optim import WarmupCosine, build_optimizer
from vlp.train.runlog import EpochStream, RunLog, is_finite, nonfinite_message

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOG_FILE = "log.jsonl"
CONFIG_SNAPSHOT = "train_config.json"

EvalFn = Callable[[nn.Module, Any, int], dict[str, Any]]  # (model, tokenizer, step)
AfterBackward = Callable[[nn.Module, int], None]  # (model, step about to be taken)


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


# ---------------------------------------------------------------------------------------------
# setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(dtype: torch.dtype | None, device: torch.device
              ) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot: tuple[Tensor, Tensor | None], device: torch.device) -> None:
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


def _model_and_tokenizer(cfg: TrainConfig, source: Any, output_dir: Path, env: DistEnv
                         ) -> tuple[nn.Module, Any]:
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
    else:  # a BPE on the captions; distributed, rank 0 trains it and every rank loads it
        shared = output_dir / "tokenizer"
        if env.is_main:
            tokenizer = train_tokenizer(_captions(source, cfg.train_data),
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
# the loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def _batch_size(batch: dict[str, Any]) -> int:
    return next(value.shape[0] for value in batch.values() if isinstance(value, Tensor))


class _Trainer:
    """One run, fresh or resumed: owns the model, optimizer, loader, log and step counter."""

    def __init__(self, cfg: TrainConfig, eval_fn: EvalFn | None,
                 after_backward: AfterBackward | None) -> None:
        self.cfg = cfg
        self.eval_fn = eval_fn
        self.after_backward = after_backward
        self.env, self.device = init_distributed(cfg.device)
        self.output_dir = Path(cfg.output_dir)
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        seed_everything(cfg.seed)
        resume_dir = _resume_dir(cfg, self.output_dir)
        train_source = _source(cfg.train_kind, cfg.train_data, cfg)
        if resume_dir is None:
            model, tokenizer = _model_and_tokenizer(cfg, train_source, self.output_dir,
                                                    self.env)
        else:  # the checkpoint's own config and tokenizer, whatever cfg.model says
            model = build_model(load_config(resume_dir / CONFIG_FILE))
            tokenizer = load_tokenizer(resume_dir,
                                       context_length=model.config.text.context_length)
        self.raw_model, self.tokenizer = model, tokenizer
        model.to(self.device)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.env.distributed:
            model.exchange = GatherExchange(local_loss=cfg.local_loss,
                                            with_grad=cfg.gather_with_grad)
        self.model = wrap_model(model, cfg.strategy, self.env, self.device)
        rank, world = self.env.rank, self.env.world_size
        self.loader = make_loader(train_source, transform=image_transform(model.config, True),
                                  tokenizer=tokenizer, batch_size=cfg.batch_size, train=True,
                                  seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                                  world_size=world, pin_memory=self.device.type == "cuda")
        self.val_loader = None
        if cfg.val_data is not None and self.env.is_main:
            self.val_loader = make_loader(_source(cfg.val_kind, cfg.val_data, cfg),
                                          transform=image_transform(model.config, train=False),
                                          tokenizer=tokenizer, batch_size=cfg.batch_size,
                                          train=False, seed=cfg.seed,
                                          num_workers=cfg.num_workers)
        self.total_steps = _total_steps(cfg, len(self.loader))
        self.optimizer = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay,
                                         tuple(cfg.betas), cfg.eps)
        self.scheduler = WarmupCosine(self.optimizer, cfg.warmup_steps, self.total_steps,
                                      cfg.min_lr_ratio)
        dtype = _autocast_dtype(cfg.precision, self.device)
        self.autocast = functools.partial(_autocast, dtype, self.device)
        self.scaler = (torch.amp.GradScaler(self.device.type) if dtype == torch.float16
                       else None)
        self.step = epoch = 0
        self.nonfinite_total = 0
        self.resumed_from = resume_dir
        if resume_dir is not None:  # last: restores the RNG states the steps ahead will draw
            state = load_checkpoint(resume_dir, self.model, self.optimizer, self.scheduler,
                                    rank=rank)
            self.step, epoch = state["step"], state["epoch"]
            self.nonfinite_total = state["extra"].get("nonfinite_steps", 0)
            if self.scaler is not None and state["extra"].get("grad_scaler"):
                self.scaler.load_state_dict(state["extra"]["grad_scaler"])
            self.loader.load_state_dict(_rank_data_state(state["data"], rank, world))
        self.batches = EpochStream(self.loader, epoch, self.env)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.checkpoint_path = str(resume_dir) if resume_dir else None
        self.metrics: dict[str, Any] = {}
        if self.env.is_main:
            atomic_write_text(self.output_dir / CONFIG_SNAPSHOT,
                              json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.log = RunLog(self.output_dir / LOG_FILE, self.step if resume_dir else None,
                          self.env)

    # -- one optimizer step ------------------------------------------------------------------

    def _micro_batches(self) -> tuple[int, list[dict[str, Any]]]:
        taken = [self.batches.next() for _ in range(self.cfg.grad_accum)]
        return taken[-1][0], [_to_device(batch, self.device) for _, batch in taken]

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _accumulate(self, micro: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Forward and backward over the micro-batches; returns the step's loss terms."""
        last = len(micro) - 1
        if self.cfg.accum_features and last > 0:
            # features of every micro-batch without grad, then each recomputed with grad
            # under the RNG state it first saw, so dropout masks match the cached features
            snapshots, cached = [], []
            with torch.no_grad(), self.autocast():
                for batch in micro:
                    snapshots.append(_rng_snapshot(self.device))
                    cached.append(self.model_features(batch))
            after = _rng_snapshot(self.device)
            for index, batch in enumerate(micro):
                _rng_restore(snapshots[index], self.device)
                with no_grad_sync(self.model, index < last), self.autocast():
                    out = self.forward(batch, Accumulated(cached, index))
                self._backward(out["loss"])  # each pass: d(batch loss)/d(its own rows)
            _rng_restore(after, self.device)
            return self._terms(out, 1)
        sums: dict[str, Tensor] = {}
        for index, batch in enumerate(micro):
            with no_grad_sync(self.model, index < last), self.autocast():
                out = self.forward(batch)
            self._backward(out["loss"] / len(micro))
            for name, value in self._terms(out, len(micro)).items():
                sums[name] = sums[name] + value if name in sums else value
        return sums

    def model_features(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        model = self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) \
            else self.model
        return model.features(batch)

    @staticmethod
    def _terms(out: dict[str, Any], parts: int) -> dict[str, Tensor]:
        terms = {"loss": out["loss"].detach()}
        terms.update((f"loss_{name}", value.detach()) for name, value in out["losses"].items())
        return {name: value / parts for name, value in terms.items()}

    def train_step(self) -> None:
        started = time.perf_counter()
        batch_epoch, micro = self._micro_batches()
        try:
            values = self._accumulate(micro)
            sync_replicated_grads(self.model, self.env)
            if self.after_backward is not None:
                self.after_backward(self.raw_model, self.step + 1)
        except torch.OutOfMemoryError as error:
            raise VlpError(oom_message(self.cfg, error)) from error
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else math.inf
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = torch.isfinite(grad_norm) & torch.isfinite(values["loss"])
        finite = bool(all_reduce_min(finite.float(), self.env).item())  # one sync per step
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()  # an overflow lowers the scale
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still spends its batch and its schedule slot
        self.step += 1
        record: dict[str, Any] = {"step": self.step, "epoch": batch_epoch, "lr": lr}
        if not finite:
            self.nonfinite_total += 1
            record["skipped"] = "nonfinite"
        values["grad_norm"] = grad_norm
        values["samples"] = torch.tensor(float(sum(_batch_size(b) for b in micro)))
        values["index_sum"] = torch.stack([b["index"].sum() for b in micro]).sum()
        values["samples_per_s"] = values["samples"] / max(time.perf_counter() - started, 1e-9)
        self.log.add_step(record, values, summed=("samples", "index_sum", "samples_per_s"))
        self._consecutive = 0 if finite else getattr(self, "_consecutive", 0) + 1
        if not finite:
            self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        self.log.flush()
        if self._consecutive >= self.cfg.max_nonfinite:
            last = self.last_finite_loss()
            raise VlpError(nonfinite_message(self._consecutive, self.step - self._consecutive + 1,
                                             self.step, last))

    def last_finite_loss(self) -> float | None:
        path = self.output_dir / LOG_FILE
        if not self.env.is_main or not path.is_file():
            return None
        last = None
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                loss = json.loads(line).get("loss")
                if is_finite(loss):
                    last = loss
        return last

    # -- evaluation and checkpoints ----------------------------------------------------------

    def _eval_model(self) -> nn.Module | None:
        """What rank 0 evaluates: the plain model, or under FSDP a gathered full copy."""
        if not is_fsdp(self.model):
            return self.raw_model
        state = full_model_state(self.model)  # collective
        if not self.env.is_main:
            return None
        copy = build_model(self.raw_model.config)
        copy.load_state_dict(state)
        return copy.to(self.device)

    def evaluate(self) -> None:
        model = self._eval_model()
        metrics: dict[str, Any] = {}
        if self.env.is_main and model is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                if self.val_loader is not None:
                    metrics["val_loss"] = self._val_loss(model)
                if self.eval_fn is not None:
                    metrics.update(self.eval_fn(model, self.tokenizer, self.step))
            model.train(was_training)
        self.metrics = metrics
        self.log.write({"step": self.step, "epoch": self.batches.epoch, "eval": metrics})
        barrier(self.env)

    def _val_loss(self, model: nn.Module) -> float:
        total, count = torch.zeros((), device=self.device), 0
        for batch in self.val_loader:
            batch = _to_device(batch, self.device)
            with self.autocast():
                loss = model(batch)["loss"]
            size = _batch_size(batch)
            total += loss.float() * size
            count += size
        return (total / max(count, 1)).item()

    def save(self) -> None:
        self.log.flush()
        model_state = full_model_state(self.model)  # collectives first, on every rank
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        rng_states = gather_objects(rng_state(), self.env)
        data_states = gather_objects(self.loader.state_dict(), self.env)
        if self.env.is_main:
            extra = {"nonfinite_steps": self.nonfinite_total,
                     "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                     "world_size": self.env.world_size}
            self.checkpoint_path = str(save_checkpoint(
                self.output_dir, self.step, model=self.raw_model, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler,
                data_state={"ranks": data_states}, epoch=self.batches.epoch, extra=extra,
                keep_last=self.cfg.keep_last, model_state=model_state,
                optimizer_state=optimizer_state, rng_states=rng_states))
        self.checkpoint_path = broadcast_object(self.checkpoint_path, self.env)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        progress = tqdm(total=self.total_steps, initial=self.step, unit="step",
                        dynamic_ncols=True, desc="train",
                        disable=None if cfg.progress and self.env.is_main else True)
        print_lines = cfg.progress and self.env.is_main and progress.disable
        self.model.train()
        try:
            while self.step < self.total_steps:
                self.train_step()
                for record in self.batches.ended:  # epochs whose last batch this step took
                    self.log.write({"step": self.step, "end_of_epoch": True, **record})
                self.batches.ended.clear()
                progress.update(1)
                step = self.step
                if step % cfg.log_every == 0 or step == self.total_steps:
                    self.log.flush()
                    last = self.log.last
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                         refresh=False)
                    if print_lines:
                        print(f"step {step}/{self.total_steps} loss {last['loss']:.4f} "
                              f"lr {last['lr']:.3g} {last['samples_per_s']:.1f} samples/s",
                              file=sys.stderr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    self.evaluate()
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                        and step < self.total_steps):
                    self.save()
            self.log.flush()
            if self.eval_fn is not None or self.cfg.val_data is not None:  # every rank
                self.evaluate()
            if (self.checkpoint_path is None
                    or Path(self.checkpoint_path).name != f"checkpoint-{self.step:07d}"):
                self.save()
        finally:
            progress.close()
            self.batches.close()
            self.log.close()
        return {"step": self.step, "epoch": self.batches.epoch, "loss": self.log.last.get("loss"),
                "checkpoint": self.checkpoint_path, "eval": self.metrics,
                "nonfinite_steps": self.nonfinite_total, "output_dir": str(self.output_dir)}


def _rank_data_state(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
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


def train(cfg: TrainConfig, eval_fn: EvalFn | None = None, *,
          after_backward: AfterBackward | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns ``{"step", "epoch", "loss", "checkpoint", "eval",
    "nonfinite_steps", "output_dir"}`` (``eval``: the last evaluation's metrics, {} when none
    ran).

    `eval_fn(model, tokenizer, step) -> metrics` runs on rank 0 in eval mode under no_grad
    every `eval_every` steps and at the end. `after_backward(model, step)` is called once the
    step's gradients are complete, before clipping (to inspect or edit gradients). A step
    whose loss or gradient is not finite is skipped and logged (``"skipped": "nonfinite"``);
    `max_nonfinite` in a row stop the run. On CPU a resumed run repeats an uninterrupted one
    exactly. Under ``torchrun`` every rank calls this.
    """
    _check_config(cfg)
    return _Trainer(cfg, eval_fn, after_backward).run()
