"""Examples for a run report: the run's latest checkpoint captions images of its data (or
answers its questions, for a VQA run) through the library's own inference, shown beside the
references the data holds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp import factory
from vlp.contract import CAPTION, VQA
from vlp.data import build_source
from vlp.data.images import group_images, image_identity, open_image
from vlp.data.qa import read_qa_jsonl
from vlp.errors import VlpError
from vlp.eval.captioning import generate_captions
from vlp.eval.vqa import answer_questions
from vlp.htmlpage import thumbnail_uri
from vlp.store import model_dir

MAX_NEW_TOKENS = 24
MAX_SCANNED = 20_000  # records read for the references of the examples' images
SOURCE_OPTIONS = ("image_key", "caption_key", "separator", "image_root")


@dataclass
class Example:
    image: str  # the image's path or key, as the data names it
    thumbnail: str | None  # data URI; None when the image cannot be read
    generated: str | None  # caption or answer; None when the image could not be read
    references: list[str]
    question: str | None = None  # VQA examples


@dataclass
class Examples:
    kind: str  # "caption" or "vqa"
    data: str  # the file the examples come from
    split: str  # "val_data" (held out) or "train_data"
    checkpoint: str  # the checkpoint's directory name
    rows: list[Example]


def _data(config: dict[str, Any]) -> tuple[str, str, str] | None:
    """(field, path, kind) of the data examples come from: the validation data, else the
    training data."""
    for name in ("val_data", "train_data"):
        path = config.get(name)
        if path:
            return name, str(path), str(config.get(name.replace("data", "kind")) or "auto")
    return None


def _thumbnail(image: str | bytes) -> str | None:
    opened = open_image(image)
    return None if isinstance(opened, str) else thumbnail_uri(opened)


def _first_images(records: Any, count: int) -> Iterator[Any]:
    """The records of the first ``count`` distinct images, among the first `MAX_SCANNED`
    records (an image's captions need not follow one another)."""
    chosen: set[Any] = set()
    for record in itertools.islice(records, MAX_SCANNED):
        identity = image_identity(record.image)
        if identity not in chosen and len(chosen) < count:
            chosen.add(identity)
        if identity in chosen:
            yield record


def run_examples(run_dir: Path, config: dict[str, Any], count: int,
                 device: str = "cpu") -> Examples | None:
    """Up to ``count`` examples from the run's latest checkpoint, or None when the run has no
    checkpoint, its model neither captions nor answers, or its data holds no images."""
    chosen = _data(config)
    if count < 1 or chosen is None:
        return None
    split, path, kind = chosen
    try:
        model, tokenizer, _ = factory.load_model_and_transforms(run_dir, map_location=device)
    except VlpError:
        return None  # no complete checkpoint (yet)
    tasks = model.tasks()
    checkpoint = model_dir(run_dir).name
    options = {k: config[k] for k in SOURCE_OPTIONS if config.get(k) is not None}
    if tokenizer is None:
        return None
    if kind == "qa":
        if VQA not in tasks:
            return None
        records = read_qa_jsonl(path, options.get("image_root"))[:count]
        answers = answer_questions(model, tokenizer, records, batch_size=count, num_beams=1,
                                   progress=False)
        rows = [Example(r.image, _thumbnail(r.image), answer, list(r.answers), r.question)
                for r, answer in zip(records, answers)]
        return Examples("vqa", path, split, checkpoint, rows)
    if CAPTION not in tasks:
        return None
    source = build_source(kind, path, **options)
    if not source.has_images or not source.has_text:
        return None
    groups = group_images(_first_images(iter(source), count)).captioned()
    if not groups.images:
        return None
    longest = min(MAX_NEW_TOKENS, model.config.text.context_length - 1)
    result = generate_captions(model, tokenizer, groups.images, groups.ids,
                               batch_size=len(groups.images), max_new_tokens=longest,
                               num_beams=1, progress=False)
    captions = {index: text for index, (_, text) in zip(result.indices, result.pairs)}
    references = groups.references()
    rows = [Example(groups.ids[i], _thumbnail(image), captions.get(i), references[i])
            for i, image in enumerate(groups.images)]
    return Examples("caption", path, split, checkpoint, rows)
