"""A training run from its config alone: the model and tokenizer it starts from (made by the
factory), then the trainer (`vlp.train.fit`), which receives them built.

``train(cfg)`` is what ``vlp train``, the recipes and CapFilt call. A fresh run starts from
``cfg.model`` (a preset, or a model directory whose weights start the run) with
``cfg.model_overrides`` merged, then ``cfg.init_vision`` / ``cfg.init_text`` load one tower
each from another checkpoint (`vlp.interop.towers`; what was loaded and what stayed fresh is
the first record of ``log.jsonl``); a resumed run from its checkpoint's own config and
tokenizer, whatever ``cfg.model`` says.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import load_config
from vlp.data.text import TextCorpus
from vlp.errors import ConfigError, DataError
from vlp.factory import is_model_path, model_config, text_context_length, with_overrides
from vlp.interop.towers import init_text_, init_vision_
from vlp.models import build_model
from vlp.store import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, model_dir
from vlp.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from vlp.train.config import TrainConfig, check_config
from vlp.train.distributed import DistEnv, barrier, init_distributed
from vlp.train.setup import build_run_source, find_resume_dir, seed_everything
from vlp.train.trainer import AfterBackward, EvalFn, fit, run_directory
from vlp.vocabularies import standard_tokenizer


def train(cfg: TrainConfig, eval_fn: EvalFn | None = None, *,
          after_backward: AfterBackward | None = None) -> dict[str, Any]:
    """Build the model and tokenizer `cfg` names (or its checkpoint holds, when resuming) and
    train them; returns what `vlp.train.fit` returns. Under ``torchrun`` every rank calls it."""
    check_config(cfg)
    env, _ = init_distributed(cfg.device)
    with run_directory(cfg.output_dir, env):  # held from before the tokenizer is trained
        return _train(cfg, env, eval_fn, after_backward)


def _train(cfg: TrainConfig, env: DistEnv, eval_fn: EvalFn | None,
           after_backward: AfterBackward | None) -> dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    barrier(env)
    seed_everything(cfg.seed)  # before the model's random init
    resume_dir = find_resume_dir(cfg, output_dir)
    reports: list[dict[str, Any]] = []
    if resume_dir is None:
        model, tokenizer = model_and_tokenizer(cfg, output_dir, env)
        reports = init_towers(cfg, model)
        for report in reports if env.is_main and cfg.progress else ():
            print(f"init {report['tower']} from {report['source']}: {len(report['loaded'])} "
                  f"tensors loaded, {len(report['fresh'])} left fresh "
                  f"({', '.join(report['fresh'][:4])}{', ...' if len(report['fresh']) > 4 else ''})"
                  + "".join(f"; {note}" for note in report["notes"]), file=sys.stderr)
    else:  # the checkpoint's own config and tokenizer, whatever cfg.model says
        model = build_model(load_config(resume_dir / CONFIG_FILE))
        tokenizer = load_tokenizer(resume_dir, context_length=text_context_length(model.config))
    return fit(cfg, model, tokenizer, eval_fn, after_backward=after_backward,
               build_model=build_model, first_records=[{"init": r} for r in reports])


def init_towers(cfg: TrainConfig, model: nn.Module) -> list[dict[str, Any]]:
    """Load ``cfg.init_vision`` / ``cfg.init_text`` into the fresh `model`'s towers; one
    report (tower, source, loaded and fresh tensor names, notes) per tower loaded."""
    reports = []
    if cfg.init_vision is not None:
        reports.append(init_vision_(model, cfg.init_vision))
    if cfg.init_text is not None:
        reports.append(init_text_(model, cfg.init_text))
    return reports


def _captions(source: Any, where: str) -> Iterator[str]:
    if not source.has_text:
        raise ConfigError(f"{where}: has no captions to train a tokenizer on; pass "
                          "tokenizer=<a tokenizer directory>")
    found = False
    for record in source:
        texts = [*(record.segments or [record.text]), record.answer]
        for text in texts:  # a document's segments, a caption, a VQA row's answer
            if text:
                found = True
                yield text
    if not found:
        raise DataError(f"{where}: the training data holds no captions (no samples, or only "
                        "empty ones); nothing to train a tokenizer or a model on")


def model_and_tokenizer(cfg: TrainConfig, output_dir: Path, env: DistEnv
                        ) -> tuple[nn.Module, Tokenizer]:
    """A fresh model (preset or init directory) and the tokenizer its text tower reads (a new
    BPE learns the training captions and the text corpus)."""
    init_dir = model_dir(cfg.model) if is_model_path(cfg.model) else None
    config = model_config(cfg.model)
    if init_dir is not None:  # fine-tuning: the family's layout for this data (BLIP VQA)
        config = config.for_train_kind(cfg.train_kind)
    config = with_overrides(config, cfg.model_overrides)
    feed = config.batch_text()
    if feed is not None:  # batches carry another model's text (BLIP-2 stage 2: the LLM's)
        path = cfg.tokenizer or feed[0]
        if path is None:
            raise ConfigError("train config: this model's batches are tokenised for its LLM; "
                              "pass tokenizer=<the LLM's tokenizer directory>")
        tokenizer = load_tokenizer(path, context_length=feed[1])
        model = build_model(config)
        model.check_tokenizer(tokenizer)
    else:
        text = config.text
        tokenizer = _text_tokenizer(cfg, init_dir, text.vocab_size, text.context_length,
                                    output_dir, env)
        if tokenizer.vocab_size > text.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"text.vocab_size is {text.vocab_size}")
        text.pad_id, text.bos_id, text.eos_id = (tokenizer.pad_id, tokenizer.bos_id,
                                                 tokenizer.eos_id)
        model = build_model(config)
    if init_dir is not None:
        # strict (overrides may change options, not shapes) unless the family has its own
        # rules for starting from another stage's checkpoint (BLIP-2 stage 1 -> 2, BLIP VQA)
        model.init_from(init_dir / WEIGHTS_FILE)
    return model, tokenizer


def _text_tokenizer(cfg: TrainConfig, init_dir: Path | None, vocab_size: int,
                    context_length: int, output_dir: Path, env: DistEnv) -> Tokenizer:
    """The given tokenizer, else the init directory's or the text tower's (``init_text``), else
    a standard vocabulary at hand that fits the text tower, else a BPE trained on at most
    ``cfg.tokenizer_train_samples`` captions (and as many text_data texts): rank 0 trains it
    once and writes it to the run directory, every other rank waits and reads that file."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer, context_length=context_length)
    for directory in (init_dir, cfg.init_text and Path(cfg.init_text)):
        if directory and (directory / TOKENIZER_FILE).is_file():
            return load_tokenizer(directory, context_length=context_length)
    standard = standard_tokenizer(vocab_size, context_length)
    if standard is not None:
        if env.is_main:
            print(f"vlp: tokenizer: {standard[1]}", file=sys.stderr, flush=True)
        return standard[0]
    shared = output_dir / "tokenizer"
    if env.is_main:
        limit = cfg.tokenizer_train_samples
        source = build_run_source(cfg.train_kind, cfg.train_data, cfg)
        corpus: Iterable[str] = (TextCorpus(cfg.text_data, cfg.caption_key)
                                 if cfg.text_data is not None else ())
        texts = itertools.chain(itertools.islice(_captions(source, cfg.train_data), limit),
                                itertools.islice(corpus, limit))
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size, context_length=context_length)
        if env.distributed:
            tokenizer.save(shared)
    barrier(env)
    if not env.is_main:
        tokenizer = load_tokenizer(shared, context_length=context_length)
    return tokenizer
