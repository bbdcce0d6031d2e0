"""Image-text retrieval: recall@k and ranks in both directions, and the model-level eval.

Ranks count ties with a wrong candidate against the model (rank = 1 + number of wrong
candidates scoring >= the best right one), so collapsed features score chance, never perfect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlp.data.images import ImageGroups, group_images
from vlp.errors import DataError
from vlp.eval.embed import embed_images, embed_texts, model_device

# (image features (n, ...), text features (m, D)) -> (n, m) scores
Similarity = Callable[[Tensor, Tensor], Tensor]


def cosine(images: Tensor, texts: Tensor) -> Tensor:
    """Scores of L2-normalised ``[N, D]`` and ``[M, D]`` features: their dot products."""
    return images @ texts.T


def _check_features(image_features: Tensor, text_features: Tensor, text_to_image: Tensor) -> None:
    # images: [N, D], or [N, Q, D] for families that score several vectors per image (BLIP-2)
    if image_features.ndim not in (2, 3) or text_features.ndim != 2:
        raise ValueError(
            f"features must be [N, D] (or [N, Q, D]) and [M, D]; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[-1] != text_features.shape[1]:
        raise ValueError(
            f"image and text features differ in width: {image_features.shape[-1]} vs "
            f"{text_features.shape[1]}"
        )
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_to_image must be [M] = [{text_features.shape[0]}]; "
            f"got {tuple(text_to_image.shape)}"
        )
    num_images = image_features.shape[0]
    if num_images == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise ValueError(f"text_to_image has indices outside [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image.cpu(), minlength=num_images)
    if bool((captions_per_image == 0).any()):
        missing = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"image {missing} has no caption in text_to_image; every image needs one")


@torch.no_grad()
def image_to_text_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int = 1024,
    similarity: Similarity = cosine,
) -> Tensor:
    """[N] rank (1 = best) of each image's best-scoring own caption among all M texts."""
    text_to_image = text_to_image.to(image_features.device)
    text_features = text_features.float()
    ranks = []
    for start in range(0, image_features.shape[0], chunk_size):
        image_chunk = image_features[start : start + chunk_size].float()
        scores = similarity(image_chunk, text_features)  # (c, M)
        ranks.append(_image_ranks(scores, text_to_image, start))
    return torch.cat(ranks).cpu()


def _image_ranks(scores: Tensor, text_to_image: Tensor, start: int) -> Tensor:
    """Ranks of images ``start .. start + c`` from their ``(c, M)`` scores of every text."""
    image_index = torch.arange(start, start + scores.shape[0], device=scores.device)
    is_own_caption = text_to_image[None, :] == image_index[:, None]  # (c, M)
    best_own = scores.masked_fill(~is_own_caption, float("-inf")).amax(dim=1)  # (c,)
    beaten_by = (scores >= best_own[:, None]) & ~is_own_caption
    return 1 + beaten_by.sum(dim=1)


def _text_ranks(scores: Tensor, own_image: Tensor) -> Tensor:
    """Ranks of texts from their ``(c, N)`` scores of every image and ``(c, 1)`` own image."""
    own_score = scores.gather(1, own_image)  # (c, 1)
    # >= counts the own image once, so this is 1 + number of wrong images at or above it
    return (scores >= own_score).sum(dim=1)


@torch.no_grad()
def text_to_image_ranks(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, chunk_size: int = 1024,
    similarity: Similarity = cosine,
) -> Tensor:
    """[M] rank (1 = best) of each caption's own image among all N images."""
    text_to_image = text_to_image.to(text_features.device)
    image_features = image_features.float()
    ranks = []
    for start in range(0, text_features.shape[0], chunk_size):
        text_chunk = text_features[start : start + chunk_size].float()
        scores = similarity(image_features, text_chunk).T  # (c, N)
        own_image = text_to_image[start : start + text_chunk.shape[0], None]  # (c, 1)
        ranks.append(_text_ranks(scores, own_image))
    return torch.cat(ranks).cpu()


def _rank_summary(prefix: str, ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    summary = {f"{prefix}_r{k}": int((ranks <= k).sum()) / len(ranks) for k in ks}
    summary[f"{prefix}_mean_rank"] = float(ranks.double().mean())
    summary[f"{prefix}_median_rank"] = float(ranks.double().quantile(0.5))
    return summary


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    similarity: Similarity = cosine,
) -> dict[str, float]:
    """Recall@k, mean and median rank for image->text (``i2t_*``) and text->image (``t2i_*``).

    ``text_to_image[m]`` is the image index of caption m; an image is a hit at k when ANY of
    its captions is in its top k. Recalls are fractions in [0, 1]; ``rsum`` is their sum over
    both directions. Similarities are computed ``chunk_size`` rows at a time, so memory is
    O(chunk_size * max(N, M)), never O(N * M). `similarity` scores features as the model's
    family does (`PretrainModel.similarity`; cosine by default).
    """
    _check_features(image_features, text_features, text_to_image)
    i2t = image_to_text_ranks(image_features, text_features, text_to_image, chunk_size,
                              similarity)
    t2i = text_to_image_ranks(image_features, text_features, text_to_image, chunk_size,
                              similarity)
    metrics = {**_rank_summary("i2t", i2t, ks), **_rank_summary("t2i", t2i, ks)}
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in ks)
    metrics["num_images"] = image_features.shape[0]
    metrics["num_texts"] = text_features.shape[0]
    return metrics


def score_retrieval_metrics(
    i2t_scores: Tensor, t2i_scores: Tensor, text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """`retrieval_metrics` from score matrices instead of features: ``i2t_scores`` (N, M)
    ranks texts per image, ``t2i_scores`` (M, N) images per text (they may differ, as after
    ITM re-ranking). Candidates left unscored should hold ``-inf``."""
    num_images, num_texts = i2t_scores.shape
    if t2i_scores.shape != (num_texts, num_images):
        raise ValueError(f"t2i_scores must be [M, N] = [{num_texts}, {num_images}]; got "
                         f"{tuple(t2i_scores.shape)}")
    _check_features(torch.zeros(num_images, 1), torch.zeros(num_texts, 1), text_to_image)
    text_to_image = text_to_image.to(i2t_scores.device)
    i2t = _image_ranks(i2t_scores.float(), text_to_image, 0).cpu()
    t2i = _text_ranks(t2i_scores.float(), text_to_image[:, None].to(t2i_scores.device)).cpu()
    metrics = {**_rank_summary("i2t", i2t, ks), **_rank_summary("t2i", t2i, ks)}
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in ks)
    metrics["num_images"] = num_images
    metrics["num_texts"] = num_texts
    return metrics


def retrieval_groups(source: Any) -> ImageGroups:
    """Unique images (`vlp.data.images.group_images`: first-seen order, paths by string, encoded
    bytes by content), every non-empty caption and ``text_to_image`` of a caption source; images
    without a caption are left out. A stream such as WebDataset is read once."""
    return group_images(source).captioned()


def keep_readable(groups: ImageGroups, kept: Tensor) -> tuple[list[str], Tensor]:
    """The captions of the images at ``kept`` (positions in ``groups.images``, in the order
    their features were computed) and each one's row among them; the captions of the other
    (unreadable) images are dropped."""
    new_index = torch.full((len(groups.images),), -1, dtype=torch.long)
    new_index[kept] = torch.arange(len(kept))
    text_to_kept = new_index[torch.tensor(groups.text_to_image, dtype=torch.long)]
    captions = [c for c, i in zip(groups.texts, text_to_kept.tolist()) if i >= 0]
    return captions, text_to_kept[text_to_kept >= 0]


def retrieval_eval(
    model: nn.Module,
    tokenizer: Any,
    source: Any,
    batch_size: int = 256,
    num_workers: int = 0,
    *,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
    fast_decode: bool = False,
) -> dict[str, Any]:
    """Image<->text retrieval over a caption source: each unique image once, every caption
    (``fast_decode``: large JPEGs decode at a reduced scale, `vlp.eval.embed_images`).

    Returns the keys of ``retrieval_metrics`` plus ``num_skipped`` and ``skipped`` (the ids of
    the images that could not be read; their captions are dropped too).
    """
    groups = retrieval_groups(source)
    if not groups.texts:
        raise DataError(f"retrieval eval: {source!r} has no captioned images")
    embedded = embed_images(model, groups.images, ids=groups.ids, batch_size=batch_size,
                            num_workers=num_workers, progress=progress,
                            fast_decode=fast_decode)
    captions, text_to_image = keep_readable(groups, embedded.indices)
    text_features = embed_texts(model, tokenizer, captions, batch_size=batch_size,
                                progress=progress)
    device = model_device(model)
    metrics: dict[str, Any] = retrieval_metrics(
        embedded.embeddings.to(device),
        text_features.to(device),
        text_to_image.to(device),
        ks=ks,
        similarity=model.similarity,
    )
    skipped = [name for name, _ in groups.lost] + embedded.skipped  # lost shards' samples too
    metrics["num_skipped"] = len(skipped)
    metrics["skipped"] = skipped
    return metrics
