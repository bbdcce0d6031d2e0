"""Zero-shot classification: class prompts become a linear classifier over image embeddings.

Prompt ensembling follows CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020, sec. 3.1.4):
each class embedding is the renormalised mean of its normalised template embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.data.sources import ImageFolderSource
from vlp.errors import ConfigError, DataError
from vlp.eval.embed import embed_images, embed_texts

GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
)


def default_templates() -> list[str]:
    """Prompts for any photo collection; a dataset that ships its own (an image folder's
    ``templates.txt``, as the synthetic world writes) uses those instead."""
    return list(GENERIC_TEMPLATES)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits, as ``{"top1", "top5", ...}``.

    A wrong class tied with the right one counts against it, so constant logits score 0, not 1.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [N, C] and labels [N]; "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one row")
    labels = labels.to(logits.device).long()
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    ranks = label_ranks(logits, labels)
    return {f"top{k}": int((ranks <= k).sum()) / len(ranks) for k in ks}


def label_ranks(logits: Tensor, labels: Tensor) -> Tensor:
    """[N] rank of each label (1 = best): 1 + number of wrong classes scoring >= it."""
    label_logit = logits.gather(1, labels[:, None].to(logits.device).long())  # (N, 1)
    return (logits >= label_logit).sum(dim=1)  # >= counts the label itself once


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise ConfigError("zero-shot templates: need at least one, e.g. 'a photo of a {}.'")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(f"zero-shot template {template!r}: expected exactly one '{{}}'")


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    *,
    progress: bool = True,
) -> Tensor:
    """``[D, C]`` weights: image_features @ weights gives class logits (cosine similarities)."""
    templates = list(templates) if templates is not None else default_templates()
    _check_templates(templates)
    if not classnames:
        raise ConfigError("zero-shot classnames: need at least one class")
    prompts = [template.format(name) for name in classnames for template in templates]
    prompt_features = embed_texts(model, tokenizer, prompts, batch_size=batch_size,
                                  progress=progress)
    per_class = prompt_features.view(len(classnames), len(templates), -1)  # (C, T, D)
    class_features = F.normalize(per_class.mean(dim=1), dim=-1)  # (C, D)
    return class_features.T.contiguous()


def _label_map(source_classnames: Sequence[str] | None, classnames: Sequence[str],
               records: Sequence[Any]) -> list[int]:
    """Source label -> column of ``classnames``, matched by name when the source names its classes.

    An image folder of one split may hold only some classes; given the full class list, its
    labels must still land on the right prompts.
    """
    if source_classnames is None:
        num_labels = 1 + max(record.label for record in records)
        if num_labels > len(classnames):
            raise ConfigError(f"zero-shot eval: labels go up to {num_labels - 1} but only "
                              f"{len(classnames)} classnames were given")
        return list(range(len(classnames)))
    column = {name: i for i, name in enumerate(classnames)}
    missing = [name for name in source_classnames if name not in column]
    if missing:
        raise ConfigError(f"zero-shot eval: classes {missing[:5]} of the data are not among the "
                          f"{len(classnames)} classnames given")
    return [column[name] for name in source_classnames]


def zeroshot_eval(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    source_or_path: Any,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    *,
    progress: bool = True,
    fast_decode: bool = False,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 accuracy on an image-folder dataset (its root, or any labelled source).
    ``templates`` default to the dataset's own (an image folder's ``templates.txt``), else
    `default_templates`. ``fast_decode``: large JPEGs decode at a reduced scale
    (`vlp.eval.embed_images`).

    Returns ``zeroshot_top1``, ``zeroshot_top5``, ``zeroshot_mean_per_class_top1`` (balanced
    accuracy), ``num_images`` (evaluated), ``num_classes`` and ``num_skipped`` (unreadable).
    """
    is_path = isinstance(source_or_path, str | os.PathLike)
    source = ImageFolderSource(source_or_path) if is_path else source_or_path
    records = list(source)
    if not records:
        raise DataError(f"zero-shot eval: no images in {source_or_path}")
    if any(record.label is None for record in records):
        raise DataError(f"zero-shot eval: {source_or_path} has images without a class label")
    source_classnames = getattr(source, "classnames", None)
    if classnames is None:
        if source_classnames is None:
            raise ConfigError(f"zero-shot eval: {source!r} names no classes; pass classnames=")
        classnames = list(source_classnames)
    label_map = _label_map(source_classnames, classnames, records)
    if templates is None:
        templates = source.templates  # the dataset's own, else (None) the generic ones
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, batch_size,
                                      progress=progress)
    images = embed_images(model, [r.image for r in records], batch_size=batch_size,
                          num_workers=num_workers, progress=progress, fast_decode=fast_decode)
    labels = torch.tensor([label_map[records[i].label] for i in images.indices.tolist()],
                          dtype=torch.long)
    logits = images.embeddings @ classifier  # (N, C)
    accuracy = topk_accuracy(logits, labels, ks=(1, 5))
    correct = (label_ranks(logits, labels) == 1).double()
    present = labels.unique()
    per_class = torch.stack([correct[labels == c].mean() for c in present])
    return {
        "zeroshot_top1": accuracy["top1"],
        "zeroshot_top5": accuracy["top5"],
        "zeroshot_mean_per_class_top1": float(per_class.mean()),
        "num_images": len(labels),
        "num_classes": len(classnames),
        "num_skipped": len(images.skipped),
    }
