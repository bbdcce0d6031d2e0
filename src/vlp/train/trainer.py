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
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlp.contract import QA, TEXT_ONLY, Accumulated, PretrainModel
from vlp.data import image_transform, make_loader
from vlp.data.qa import AnswerTokenizer
from vlp.data.text import TextBatches, TextCorpus
from vlp.errors import CheckpointError, ConfigError, VlpError
from vlp.store import TRAIN_STATE_FILE, read_json_object
from vlp.store.files import atomic_write_text, directory_lock
from vlp.train.checkpoint import load_checkpoint, save_checkpoint
from vlp.train.config import TrainConfig, check_config, text_rows
from vlp.train.dashboards import open_dashboards
from vlp.train.distributed import (
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
from vlp.train.levers import Levers
from vlp.train.optim import LrSchedule, build_optimizer
from vlp.train.runlog import EpochStream, RunLog, eval_line, is_finite, nonfinite_message
from vlp.train.setup import (
    CHECKPOINT_SETTINGS,
    autocast,
    autocast_dtype,
    build_run_source,
    check_batch_kind,
    count_total_steps,
    data_fingerprint,
    find_resume_dir,
    oom_message,
    rank_data_state,
    resume_differences,
    rng_restore,
    rng_snapshot,
    run_settings,
    settings_that_ran,
)
from vlp.train.state import full_model_state, full_optimizer_state, rng_state

LOG_FILE = "log.jsonl"
CONFIG_SNAPSHOT = "train_config.json"

EvalFn = Callable[[nn.Module, Any, int], dict[str, Any]]  # (model, tokenizer, step)
AfterBackward = Callable[[nn.Module, int], None]  # (model, step about to be taken)


# ---------------------------------------------------------------------------------------------
# the loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def _transform(model: PretrainModel, source: Any, train: bool, cfg: TrainConfig) -> Any:
    return (image_transform(model.config, train, cfg.augment, cfg.hflip) if source.has_images
            else None)


def _batch_size(batch: dict[str, Any]) -> int:
    rows = next(value.shape[0] for value in batch.values() if isinstance(value, Tensor))
    return rows + (batch["text_ids"].shape[0] if "text_ids" in batch else 0)


class _Trainer:
    """One run, fresh or resumed: owns the model, optimizer, loader, log and step counter."""

    def __init__(self, cfg: TrainConfig, model: PretrainModel, tokenizer: Any,
                 eval_fn: EvalFn | None, after_backward: AfterBackward | None,
                 build_model: Callable[[Any], PretrainModel] | None,
                 first_records: list[dict[str, Any]]) -> None:
        self.cfg = cfg
        self.eval_fn = eval_fn
        self.after_backward = after_backward
        self.build_model = build_model
        self.env, self.device = init_distributed(cfg.device)
        self.output_dir = Path(cfg.output_dir)
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.env)
        resume_dir = find_resume_dir(cfg, self.output_dir)
        self.settings, ran = self._check_resume(resume_dir)
        train_source = build_run_source(cfg.train_kind, cfg.train_data, cfg)
        corpus = (TextCorpus(cfg.text_data, cfg.caption_key) if cfg.text_data is not None
                  else None)
        self.raw_model, self.tokenizer = model, tokenizer
        model.to(self.device)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.levers = Levers(cfg, model, is_main=self.env.is_main, sharded=cfg.strategy == "fsdp")
        if self.env.distributed:
            model.exchange = GatherExchange(local_loss=cfg.local_loss,
                                            with_grad=cfg.gather_with_grad)
        self.model = wrap_model(model, cfg.strategy, self.env, self.device)
        if (is_fsdp(self.model) and build_model is None
                and (eval_fn is not None or cfg.val_data is not None)):
            raise ConfigError("train: evaluating an FSDP run needs build_model (how to make an "
                              "unsharded copy of the model from its config); vlp.run.train "
                              "passes it")
        rank, world = self.env.rank, self.env.world_size
        self.text_batches = None
        if corpus is not None:  # text-only rows join every micro-batch as "text_ids"
            if TEXT_ONLY not in model.batch_kinds:
                raise ConfigError(f"train config text_data: {type(model).__name__} does not "
                                  "train on text-only rows; a family that does is simvlm")
            self.text_batches = TextBatches(corpus, tokenizer, text_rows(cfg), seed=cfg.seed,
                                            rank=rank, world_size=world)
        check_batch_kind(model, train_source, "train_data", cfg.train_data)
        # VQA rows (kind "qa") fine-tune the answer decoder: question_ids + answer_ids batches
        answers = AnswerTokenizer(tokenizer, model.config)
        if train_source.has_answers and QA not in model.batch_kinds:
            raise ConfigError(f"train config train_data: {cfg.train_data} holds VQA rows but "
                              f"{type(model).__name__} does not train on them; families that "
                              "fine-tune VQA are blip and simvlm")
        self.loader = make_loader(train_source,
                                  transform=_transform(model, train_source, True, cfg),
                                  tokenizer=tokenizer, batch_size=cfg.batch_size - text_rows(cfg),
                                  train=True,
                                  seed=cfg.seed, num_workers=cfg.num_workers, rank=rank,
                                  world_size=world, pin_memory=self.device.type == "cuda",
                                  answer_tokenizer=answers, caption_prompt=cfg.lm_prompt)
        self.val_loader = None
        if cfg.val_data is not None and self.env.is_main:
            val_source = build_run_source(cfg.val_kind, cfg.val_data, cfg, "val")
            check_batch_kind(model, val_source, "val_data", cfg.val_data)
            self.val_loader = make_loader(val_source,
                                          transform=_transform(model, val_source, False, cfg),
                                          tokenizer=tokenizer, batch_size=cfg.batch_size,
                                          train=False, seed=cfg.seed,
                                          num_workers=cfg.num_workers, answer_tokenizer=answers,
                                          caption_prompt=cfg.lm_prompt)
        self.total_steps = count_total_steps(cfg, len(self.loader))
        self.steps_per_epoch = len(self.loader) // cfg.grad_accum
        if cfg.lm_prompt:  # the loader puts it first; its tokens carry no loss
            model.mask_caption_prompt(len(tokenizer.encode(cfg.lm_prompt.rstrip())))
        self.optimizer = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay,
                                         tuple(cfg.betas), cfg.eps,
                                         lr_scales=self.levers.lr_scales)
        self.scheduler = LrSchedule(self.optimizer, cfg.warmup_steps, self.total_steps,
                                    cfg.min_lr_ratio, cfg.schedule, cfg.cooldown_steps,
                                    cfg.cooldown_power)
        dtype = autocast_dtype(cfg.precision, self.device)
        self.autocast = functools.partial(autocast, dtype, self.device)
        self.scaler = (torch.amp.GradScaler(self.device.type) if dtype == torch.float16
                       else None)
        self.step = epoch = 0
        self.nonfinite_total = 0
        self.resumed_from = resume_dir
        if resume_dir is not None:  # last: restores the RNG states the steps ahead will draw
            state = load_checkpoint(resume_dir, self.model, self.optimizer, self.scheduler,
                                    rank=rank)
            self.step, epoch = state["step"], state["epoch"]
            self.levers.load(state["path"])
            self.nonfinite_total = state["extra"].get("nonfinite_steps", 0)
            if self.scaler is not None and state["extra"].get("grad_scaler"):
                self.scaler.load_state_dict(state["extra"]["grad_scaler"])
            self.loader.load_state_dict(rank_data_state(state["data"], rank, world))
            if self.text_batches is not None and state["data"].get("text"):
                self.text_batches.load_state_dict(state["data"]["text"][rank])
        self.batches = EpochStream(self.loader, epoch, self.env)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.checkpoint_path = str(resume_dir) if resume_dir else None
        self.metrics: dict[str, Any] = {}
        if self.env.is_main:
            atomic_write_text(self.output_dir / CONFIG_SNAPSHOT,  # what runs, resumed or not
                              json.dumps(ran, indent=2) + "\n")
        resume_step = self.step if resume_dir else None
        dashboards = (open_dashboards(cfg.report_to, self.output_dir, cfg.to_dict(), resume_step)
                      if self.env.is_main else None)
        self.log = RunLog(self.output_dir / LOG_FILE, resume_step, self.env, sink=dashboards)
        for record in first_records if resume_dir is None else ():
            self.log.write({"step": 0, **record})

    def _check_resume(self, resume_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """This run's settings (recorded in each checkpoint) and the config that runs; a
        resumed run whose settings differ from its checkpoint's is refused, listing them,
        unless cfg.resume_changes."""
        saved = None
        settings = run_settings(self.cfg, data_fingerprint(self.cfg.train_data),
                                self.env.world_size)
        if resume_dir is not None:
            state = read_json_object(resume_dir / TRAIN_STATE_FILE, CheckpointError)
            extra = state.get("extra")
            saved = extra.get("settings") if isinstance(extra, dict) else None
            differences = resume_differences(saved, settings)
            if differences and not self.cfg.resume_changes:
                raise ConfigError(f"{resume_dir}: resuming with settings that differ from the "
                                  f"checkpoint's: {'; '.join(differences)}; pass "
                                  "resume_changes=True (--resume-changes) to continue anyway")
            settings.update({name: saved[name] for name in CHECKPOINT_SETTINGS
                             if saved and name in saved})
        return settings, settings_that_ran(self.cfg, saved)

    # -- one optimizer step ------------------------------------------------------------------

    def _micro_batches(self) -> tuple[int, list[dict[str, Any]]]:
        taken = [self.batches.next() for _ in range(self.cfg.grad_accum)]
        if self.text_batches is not None:
            for _, batch in taken:
                batch["text_ids"] = self.text_batches.next()
        return taken[-1][0], [_to_device(batch, self.device) for _, batch in taken]

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _accumulate(self, micro: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Forward and backward over the micro-batches; returns the step's loss terms."""
        last = len(micro) - 1
        if self.cfg.accum_features and last > 0 and self.raw_model.accumulates_features:
            # features of every micro-batch without grad, then each recomputed with grad
            # under the RNG state it first saw, so dropout masks match the cached features
            snapshots, cached = [], []
            with torch.no_grad(), self.autocast():
                for batch in micro:
                    snapshots.append(rng_snapshot(self.device))
                    cached.append(self.model_features(batch))
            after = rng_snapshot(self.device)
            for index, batch in enumerate(micro):
                rng_restore(snapshots[index], self.device)
                with no_grad_sync(self.model, index < last), self.autocast():
                    out = self.forward(batch, Accumulated(cached, index))
                self._backward(out["loss"])  # each pass: d(batch loss)/d(its own rows)
            rng_restore(after, self.device)
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
        fed = time.perf_counter()  # the wait for this step's batches ends here
        self.raw_model.begin_step(self.step, self.steps_per_epoch)
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
                self.raw_model.after_optimizer_step()
            self.scaler.update()  # an overflow lowers the scale
        elif finite:
            self.optimizer.step()
            self.raw_model.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.levers.after_step()  # the weight average
        self.scheduler.step()  # a skipped step still spends its batch and its schedule slot
        self.step += 1
        record: dict[str, Any] = {"step": self.step, "epoch": batch_epoch, "lr": lr}
        if not finite:
            self.nonfinite_total += 1
            record["skipped"] = "nonfinite"
        values["grad_norm"] = grad_norm
        values["samples"] = torch.tensor(float(sum(_batch_size(b) for b in micro)))
        values["index_sum"] = torch.stack([b["index"].sum() for b in micro]).sum()
        ended = time.perf_counter()
        values["samples_per_s"] = values["samples"] / max(ended - started, 1e-9)
        values["data_s"] = torch.tensor(fed - started)  # waiting for the loader
        values["compute_s"] = torch.tensor(ended - fed)  # forward, backward, optimizer step
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
        copy = self.build_model(self.raw_model.config)
        copy.load_state_dict(state)
        return copy.to(self.device)

    def evaluate(self) -> None:
        with self.levers.exported():  # with ema_decay: the weight average is evaluated
            self._evaluate()

    def _evaluate(self) -> None:
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
            if self.cfg.progress:
                tqdm.write(eval_line(self.step, metrics), file=sys.stderr)
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
        text_states = (gather_objects(self.text_batches.state_dict(), self.env)
                       if self.text_batches is not None else None)
        if self.env.is_main:
            model_state, weight_files = self.levers.checkpoint_files(model_state)
            extra = {"nonfinite_steps": self.nonfinite_total,
                     "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                     "world_size": self.env.world_size, "settings": self.settings}
            self.checkpoint_path = str(save_checkpoint(
                self.output_dir, self.step, model=self.raw_model, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler,
                data_state={"ranks": data_states, "text": text_states},
                epoch=self.batches.epoch, extra=extra,
                keep_last=self.cfg.keep_last, model_state=model_state,
                optimizer_state=optimizer_state, rng_states=rng_states,
                weight_files=weight_files))
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
                    share = self.log.data_share()
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                         data=f"{share:.0%}", refresh=False)
                    if print_lines:
                        print(f"step {step}/{self.total_steps} loss {last['loss']:.4f} "
                              f"lr {last['lr']:.3g} {last['samples_per_s']:.1f} samples/s "
                              f"data {last['data_s'] * 1e3:.0f} ms compute "
                              f"{last['compute_s'] * 1e3:.0f} ms (data {share:.0%} of the "
                              "last steps)", file=sys.stderr)
                    warning = self.log.data_wait_warning(step, cfg.num_workers)
                    if warning is not None and self.env.is_main:  # once a run
                        tqdm.write(warning, file=sys.stderr)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    self.evaluate()
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                        and step < self.total_steps):
                    self.save()
            self.log.flush()
            # the final checkpoint first: a failing final evaluation never loses the run
            if (self.checkpoint_path is None
                    or Path(self.checkpoint_path).name != f"checkpoint-{self.step:07d}"):
                self.save()
            if self.eval_fn is not None or self.cfg.val_data is not None:  # every rank
                self.evaluate()
        finally:
            progress.close()
            self.batches.close()
            self.log.close()
        return {"step": self.step, "epoch": self.batches.epoch, "loss": self.log.last.get("loss"),
                "checkpoint": self.checkpoint_path, "eval": self.metrics,
                "nonfinite_steps": self.nonfinite_total, "output_dir": str(self.output_dir)}

def fit(cfg: TrainConfig, model: PretrainModel, tokenizer: Any, eval_fn: EvalFn | None = None, *,
        after_backward: AfterBackward | None = None,
        build_model: Callable[[Any], PretrainModel] | None = None,
        first_records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the built `model` (and the `tokenizer` its batches are made with) per `cfg`;
    returns ``{"step", "epoch", "loss", "checkpoint", "eval", "nonfinite_steps",
    "output_dir"}`` (``eval``: the last evaluation's metrics, {} when none ran).

    The caller makes the model (`vlp.run.train` does, through the factory) after seeding with
    ``cfg.seed``; when ``cfg.output_dir`` holds a checkpoint to resume (``cfg.resume``), `model`
    must have that checkpoint's config, and its weights, optimizer, schedule, RNG and loader
    position are restored. `build_model(config)` makes an unsharded copy for evaluating an FSDP
    run. `eval_fn(model, tokenizer, step) -> metrics` runs on rank 0 in eval mode under no_grad
    every `eval_every` steps and at the end. `after_backward(model, step)` is called once the
    step's gradients are complete, before clipping (to inspect or edit gradients). A step
    whose loss or gradient is not finite is skipped and logged (``"skipped": "nonfinite"``);
    `max_nonfinite` in a row stop the run. On CPU a resumed run repeats an uninterrupted one
    exactly. `first_records` go into ``log.jsonl`` at step 0 of a fresh run (how the model
    was initialised). Under ``torchrun`` every rank calls this.
    """
    check_config(cfg)
    env, _ = init_distributed(cfg.device)
    with run_directory(cfg.output_dir, env):
        return _Trainer(cfg, model, tokenizer, eval_fn, after_backward, build_model,
                        first_records or []).run()


def run_directory(output_dir: str, env: Any) -> contextlib.AbstractContextManager:
    """The run directory held by this run alone while it trains (rank 0 holds its lock; a
    second trainer on it gets a ConfigError naming this one's pid)."""
    return directory_lock(output_dir, "vlp train") if env.is_main else contextlib.nullcontext()
