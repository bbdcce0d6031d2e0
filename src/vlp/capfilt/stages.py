"""Stages 2 and 3, one work unit at a time: caption its images, then score every caption.

A unit's output is one JSONL file per stage (``captions/unit-000003.jsonl``,
``filtered/unit-000003.jsonl``), written atomically and skipped when present, so a killed job
resumes where it stopped. Every random draw of a unit comes from a generator seeded by
(seed, unit index) and its batches are fixed, so a unit's output does not depend on which
process runs it or when: the local and Ray backends write the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp import factory
from vlp.capfilt.config import BLIP_MAX_LENGTH, BLIP_MIN_LENGTH, CapfiltConfig
from vlp.capfilt.units import WorkUnit, load_items
from vlp.config import load_config
from vlp.data.images import read_images
from vlp.data.pipeline import derive_seed
from vlp.data.transforms import image_transform
from vlp.errors import CheckpointError, ConfigError, DataError
from vlp.eval.captioning import generate_captions
from vlp.eval.embed import inference
from vlp.store import CONFIG_FILE, find_checkpoint
from vlp.store.files import atomic_write_text

CAPTIONS_DIR = "captions"
FILTERED_DIR = "filtered"
MODELS_DIR = "models"
SETTINGS_FILE = "settings.json"


def unit_path(cfg: CapfiltConfig, stage_dir: str, unit: WorkUnit) -> Path:
    return cfg.out_dir / stage_dir / f"{unit.name}.jsonl"


def read_unit(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable CapFilt unit file ({error}); delete it to "
                        "redo the unit") from error


def _write_unit(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# -- models -------------------------------------------------------------------------------------

def model_path(cfg: CapfiltConfig, role: str) -> Path:
    """The captioner's or filter's checkpoint directory (a run directory resolves to its latest
    checkpoint): ``cfg.<role>``, else stage 1's output; its config is checked for the role."""
    given = getattr(cfg, role)
    if given is not None:
        path = Path(given)
        if not path.exists():
            raise CheckpointError(f"capfilt {role}={given}: checkpoint not found")
    else:
        path = cfg.out_dir / MODELS_DIR / ("shared" if cfg.share else role)
        if not path.exists():
            raise ConfigError(f"capfilt {role}: none given and {path} does not exist; run the "
                              f"finetune stage first or pass {role}=<a BLIP checkpoint>")
    if not (path / CONFIG_FILE).is_file():
        path = find_checkpoint(path, "latest")
    check_role(load_config(path / CONFIG_FILE), role, path)
    return path


def check_role(config: Any, role: str, path: Any) -> None:
    """The captioner needs a BLIP text decoder, the filter BLIP's ITM head."""
    family = getattr(config, "family", None)
    if family != "blip":
        raise ConfigError(f"capfilt {role}={path}: a {family} model; expected a BLIP checkpoint")
    if role == "captioner" and not config.text_decoder:
        raise ConfigError(f"capfilt captioner={path}: this BLIP has no text decoder "
                          "(config.text_decoder=False); expected one that generates captions")
    if role == "filter" and not (config.retrieval_heads and config.text_encoder):
        raise ConfigError(f"capfilt filter={path}: this BLIP has no ITM head "
                          "(config.retrieval_heads=False); expected a model with ITC/ITM heads")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_role(cfg: CapfiltConfig, role: str) -> tuple[nn.Module, Any]:
    """The captioner or the filter with its tokenizer, in eval mode on ``cfg.device``."""
    path = model_path(cfg, role)
    model = factory.load(path)
    tokenizer = factory.load_tokenizer(path)
    return model.to(resolve_device(cfg.device)).eval(), tokenizer


# -- stage 2: caption -----------------------------------------------------------------------------

def caption_settings(cfg: CapfiltConfig) -> dict[str, Any]:
    return {"captioner": str(model_path(cfg, "captioner").resolve()), "seed": cfg.seed,
            "sampling": cfg.sampling, "top_p": cfg.top_p, "top_k": cfg.top_k,
            "repetition_penalty": cfg.repetition_penalty, "num_beams": cfg.num_beams,
            "num_captions": cfg.num_captions, "min_new_tokens": cfg.min_new_tokens,
            "max_new_tokens": cfg.max_new_tokens, "prompt": cfg.prompt,
            "caption_batch_size": cfg.caption_batch_size, **_decoding(cfg)}


def _decoding(cfg: CapfiltConfig) -> dict[str, Any]:
    """``fast_decode`` among a stage's settings when on (outputs made before the option
    existed resume as they were)."""
    return {"fast_decode": True} if cfg.fast_decode else {}


def caption_lengths(cfg: CapfiltConfig, tokenizer: Any) -> tuple[int, int]:
    """(min, max) new caption tokens: the config's, else BLIP's lengths less the tokens of
    [DEC] and the prompt (which BLIP counts)."""
    used = 1 + (len(tokenizer.encode(cfg.prompt.rstrip())) if cfg.prompt else 0)
    min_new = (cfg.min_new_tokens if cfg.min_new_tokens is not None
               else max(0, BLIP_MIN_LENGTH - used))
    max_new = (cfg.max_new_tokens if cfg.max_new_tokens is not None
               else max(1, BLIP_MAX_LENGTH - used))
    return min(min_new, max_new), max_new


def caption_unit(cfg: CapfiltConfig, unit: WorkUnit, model: nn.Module, tokenizer: Any
                 ) -> list[dict[str, Any]]:
    """``num_captions`` synthetic captions per image of the unit, drawn with the unit's own
    generator (nucleus: top-k, top-p, repetition penalty, as BLIP) or by beam search, after
    ``cfg.prompt``; unreadable images get none and a reason."""
    items = load_items(cfg, unit)
    rows = [{"key": item.key, "image": item.image_ref, "original": item.captions,
             "noisy": item.noisy, "synthetic": []} for item in items]
    if not items:
        return rows
    n = cfg.num_captions
    images = [item.image for item in items for _ in range(n)]
    min_new, max_new = caption_lengths(cfg, tokenizer)
    if cfg.sampling == "nucleus":
        generator = torch.Generator(device=resolve_device(cfg.device))
        generator.manual_seed(derive_seed(cfg.seed, unit.index))
        options = {"num_beams": 1, "do_sample": True, "top_p": cfg.top_p,
                   "top_k": cfg.top_k or None, "repetition_penalty": cfg.repetition_penalty,
                   "generator": generator}
    else:
        options = {"num_beams": cfg.num_beams}
    # generate_captions reads the images (vlp.data.images): an unreadable one is skipped
    result = generate_captions(model, tokenizer, images, [str(i) for i in range(len(images))],
                               batch_size=cfg.caption_batch_size * n,
                               min_new_tokens=min_new, max_new_tokens=max_new,
                               prompt=cfg.prompt or None,
                               num_workers=0, progress=False, fast_decode=cfg.fast_decode,
                               **options)
    for index, reason in zip(result.skipped, result.reasons):
        rows[int(index) // n]["skipped"] = reason
    for index, text in result.pairs:
        rows[int(index) // n]["synthetic"].append(text)
    return rows


# -- stage 3: filter ------------------------------------------------------------------------------

def filter_settings(cfg: CapfiltConfig) -> dict[str, Any]:
    return {"filter": str(model_path(cfg, "filter").resolve()),
            "itm_threshold": cfg.itm_threshold, "itc_threshold": cfg.itc_threshold,
            "filter_batch_size": cfg.filter_batch_size, **_decoding(cfg)}


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer: Any, images: list[str | bytes],
                texts: list[list[str]], fast_decode: bool = False
                ) -> list[list[tuple[float, float]]]:
    """(ITM P(match), ITC cosine) of each text with its image: ``texts[i]`` are image i's.
    Images must be readable (`filter_unit` sets the others aside); ``fast_decode``: large
    JPEGs decode at a reduced scale (`vlp.data.transforms.ImageTransform.draft_size`)."""
    if not any(texts):
        return [[] for _ in texts]
    read = read_images(images, image_transform(model, train=False, fast_decode=fast_decode))
    if read.unreadable:
        raise DataError(f"{images[read.unreadable[0]]!r}: {read.reasons[0]}; score_pairs needs "
                        "readable images")
    return score_pixels(model, tokenizer, read.pixels, texts)


@torch.no_grad()
def score_pixels(model: nn.Module, tokenizer: Any, pixels: torch.Tensor,
                 texts: list[list[str]]) -> list[list[tuple[float, float]]]:
    """`score_pairs` of images already decoded: ``pixels[i]`` is image i."""
    flat = [text for group in texts for text in group]
    if not flat:
        return [[] for _ in texts]
    with inference(model) as device:
        image_tokens = model.image_tokens(pixels.to(device))  # shared by ITC and every ITM pair
        image_features = F.normalize(model.vision_proj(image_tokens[:, 0]).float(), dim=-1)
        rows = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=device)
        input_ids = tokenizer(flat, context_length=model.config.text.context_length).to(device)
        mask = input_ids != model.config.text.pad_id
        itm = model.itm_logits_from_tokens(image_tokens[rows], input_ids, mask).float()
        match = itm.softmax(dim=-1)[:, 1]
        text_features = model.encode_text(input_ids, mask).float()
        cosine = (image_features[rows] * text_features).sum(-1)
    scores = list(zip(match.tolist(), cosine.tolist()))
    out, start = [], 0
    for group in texts:
        out.append(scores[start:start + len(group)])
        start += len(group)
    return out


def _set_aside(row: dict[str, Any], reason: str) -> None:
    """An image that cannot be scored: every caption dropped, unscored, with the reason."""
    row.setdefault("skipped", reason)
    for caption in row["captions"]:
        caption.update(itm=None, itc=None, kept=False)


def filter_unit(cfg: CapfiltConfig, unit: WorkUnit, model: nn.Module, tokenizer: Any,
                caption_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every original and synthetic caption of the unit with its ITM score, ITC similarity
    and decision; captions of an unreadable image are dropped with its reason (images are read
    through `vlp.data.images`, so one that cannot be read is set aside, never raised)."""
    images = {item.key: item.image for item in load_items(cfg, unit)}
    rows = []
    for row in caption_rows:
        captions = ([{"text": t, "source": "original", "noisy": noisy}
                     for t, noisy in zip(row["original"], row["noisy"])]
                    + [{"text": t, "source": "synthetic", "noisy": None}
                       for t in row["synthetic"]])
        rows.append({"key": row["key"], "image": row["image"], "captions": captions,
                     **({"skipped": row["skipped"]} if "skipped" in row else {})})
    scored = []
    for row in rows:
        if "skipped" not in row and row["key"] in images:
            scored.append(row)
        else:
            _set_aside(row, "missing_image")
    transform = image_transform(model, train=False, fast_decode=cfg.fast_decode)
    for start in range(0, len(scored), cfg.filter_batch_size):
        batch = scored[start:start + cfg.filter_batch_size]
        for row in batch:  # an empty caption (a captioner may stop at once) is dropped
            for caption in row["captions"]:
                if not caption["text"].strip():
                    caption.update(itm=None, itc=None, kept=False)
        read = read_images([images[row["key"]] for row in batch], transform)
        for position, reason in zip(read.unreadable, read.reasons):
            _set_aside(batch[position], reason)
        readable = [batch[i] for i in read.indices.tolist()]
        if not readable:
            continue
        scores = score_pixels(model, tokenizer, read.pixels,
                              [[c["text"] for c in row["captions"] if "kept" not in c]
                               for row in readable])
        for row, row_scores in zip(readable, scores):
            to_score = [c for c in row["captions"] if "kept" not in c]
            for caption, (itm, itc) in zip(to_score, row_scores, strict=True):
                kept = itm >= cfg.itm_threshold
                if cfg.itc_threshold is not None:
                    kept = kept and itc >= cfg.itc_threshold
                caption.update(itm=itm, itc=itc, kept=kept)
    return rows


# -- per-unit workers, shared by both backends ------------------------------------------------

class _UnitWorker:
    """Holds one role's model; ``run(unit)`` writes the unit's rows (`rows`) into
    ``stage_dir`` unless that file is already there, and returns how many it wrote."""

    role: str
    stage_dir: str

    def __init__(self, cfg: CapfiltConfig) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = load_role(cfg, self.role)

    def rows(self, unit: WorkUnit) -> list[dict[str, Any]]:
        raise NotImplementedError

    def run(self, unit: WorkUnit) -> int:
        path = unit_path(self.cfg, self.stage_dir, unit)
        if path.is_file():
            return 0
        rows = self.rows(unit)
        _write_unit(path, rows)
        return len(rows)


class CaptionWorker(_UnitWorker):
    """The captioner: synthetic captions of the unit's images."""

    role, stage_dir = "captioner", CAPTIONS_DIR

    def rows(self, unit: WorkUnit) -> list[dict[str, Any]]:
        return caption_unit(self.cfg, unit, self.model, self.tokenizer)


class FilterWorker(_UnitWorker):
    """The filter: ITM (and ITC) scores and decisions for the unit's captions."""

    role, stage_dir = "filter", FILTERED_DIR

    def rows(self, unit: WorkUnit) -> list[dict[str, Any]]:
        source = unit_path(self.cfg, CAPTIONS_DIR, unit)
        if not source.is_file():
            raise DataError(f"{source}: no captions for {unit.name}; run the caption stage "
                            "first")
        return filter_unit(self.cfg, unit, self.model, self.tokenizer, read_unit(source))


WORKERS: dict[str, Callable[[CapfiltConfig], Any]] = {"caption": CaptionWorker,
                                                      "filter": FilterWorker}
