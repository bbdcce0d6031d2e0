"""BLIP and BLIP-2 retrieval: ITC ranks every candidate, ITM re-scores the top ``k_test``
(BLIP §5.1; BLIP-2 ranks by its best query first). The model contract says how
(`PretrainModel.similarity`, ``itm_image``, ``itm_match``).

The re-ranked score of a candidate in the ITC top-k is its ITM match logit plus its ITC score
(``itm_logits[:, 1] + cosine``, no temperature, as BLIP's ``evaluation`` in
``train_retrieval.py``); candidates outside the top-k score ``-inf``, so R@k for k <= k_test
is exact and the rest of the ranking only says "not found".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vlp.contract import ITM, PretrainModel
from vlp.data.images import image_batches
from vlp.data.transforms import image_transform
from vlp.errors import ConfigError, DataError
from vlp.eval.embed import inference, model_device
from vlp.eval.retrieval import keep_readable, retrieval_groups, score_retrieval_metrics

# (image_tokens (P, S, D), input_ids (P, L), attention_mask (P, L)) -> (P,) match logits
MatchFn = Callable[[Tensor, Tensor, Tensor], Tensor]
NOT_RANKED = float("-inf")


@torch.no_grad()
def itm_rerank_scores(itc_similarity: Tensor, image_tokens: Tensor, input_ids: Tensor,
                      attention_mask: Tensor, match_fn: MatchFn, k_test: int,
                      batch_size: int = 128, progress: bool = False) -> tuple[Tensor, Tensor]:
    """``(i2t (N, M), t2i (M, N))`` re-ranked scores from ITC cosines ``(N, M)``: per image its
    top-``k_test`` texts, per text its top-``k_test`` images, each pair scored
    ``match_fn(...) + cosine``; every other entry is ``-inf``."""
    if k_test < 1:
        raise ConfigError(f"k_test must be >= 1, got {k_test}")
    num_images, num_texts = itc_similarity.shape
    similarity = itc_similarity.float()
    i2t = torch.full((num_images, num_texts), NOT_RANKED)
    t2i = torch.full((num_texts, num_images), NOT_RANKED)
    # every (query, candidate) pair to score: (image, text) indices for both directions
    k_texts, k_images = min(k_test, num_texts), min(k_test, num_images)
    top_texts = similarity.topk(k_texts, dim=1).indices  # (N, k)
    top_images = similarity.T.topk(k_images, dim=1).indices  # (M, k)
    pair_images = torch.cat([torch.arange(num_images).repeat_interleave(k_texts),
                             top_images.reshape(-1).cpu()])
    pair_texts = torch.cat([top_texts.reshape(-1).cpu(),
                            torch.arange(num_texts).repeat_interleave(k_images)])
    device = image_tokens.device
    logits = []
    starts = range(0, len(pair_images), batch_size)
    for start in tqdm(starts, desc="itm re-rank", leave=False, disable=not progress):
        images = pair_images[start:start + batch_size].to(device)
        texts = pair_texts[start:start + batch_size].to(input_ids.device)
        logits.append(match_fn(image_tokens[images], input_ids[texts],
                               attention_mask[texts]).float().cpu())
    scores = torch.cat(logits) + similarity.cpu()[pair_images, pair_texts]
    split = num_images * k_texts
    i2t[pair_images[:split], pair_texts[:split]] = scores[:split]
    t2i[pair_texts[split:], pair_images[split:]] = scores[split:]
    return i2t, t2i


def _encode_images(model: PretrainModel, images: list, batch_size: int, num_workers: int,
                   progress: bool, fast_decode: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """(ITC embeddings (K, ...), ITM features (K, ...), kept indices (K,), unreadable
    positions) of the images, read through `vlp.data.images.image_batches`, as the model's
    `itm_image` gives them."""
    loader = image_batches(images, image_transform(model, train=False, fast_decode=fast_decode),
                           batch_size=batch_size,
                           num_workers=num_workers,
                           pin_memory=model_device(model).type == "cuda")
    embeddings, tokens, kept, unreadable = [], [], [], []
    with inference(model) as device:
        for batch in tqdm(loader, desc="images", leave=False, disable=not progress):
            unreadable.extend(batch.unreadable)
            if batch.pixels is None:
                continue
            embedding, features = model.itm_image(batch.pixels.to(device, non_blocking=True))
            embeddings.append(embedding.float())
            tokens.append(features.float())
            kept.append(batch.indices)
    if not kept:
        raise DataError(f"retrieval eval: none of the {len(images)} images could be read")
    return torch.cat(embeddings), torch.cat(tokens), torch.cat(kept), unreadable


def itm_rerank_eval(model: nn.Module, tokenizer: Any, source: Any, *, k_test: int = 128,
                    batch_size: int = 128, num_workers: int = 0,
                    ks: Sequence[int] = (1, 5, 10), progress: bool = True,
                    fast_decode: bool = False) -> dict[str, Any]:
    """Retrieval of a BLIP model over a caption source, ITC alone (``i2t_r1``, ... as
    `retrieval_eval`) and ITC + ITM re-ranking of the top ``k_test`` (``itm_i2t_r1``, ...).
    Every image's tokens are held in memory, as BLIP's own evaluation does. Unreadable images
    are skipped with their captions: ``num_skipped`` and ``skipped`` (their ids).
    ``fast_decode``: large JPEGs decode at a reduced scale (`vlp.eval.embed_images`)."""
    model.require(ITM, "ITM re-ranking")
    groups = retrieval_groups(source)
    if not groups.texts:
        raise DataError(f"retrieval eval: {source!r} has no captioned images")
    image_embeddings, image_tokens, kept, unreadable = _encode_images(
        model, groups.images, batch_size, num_workers, progress, fast_decode)
    captions, text_to_image = keep_readable(groups, kept)
    pad_id = model.config.text.pad_id
    with inference(model) as device:
        input_ids = tokenizer(captions, context_length=model.config.text.context_length)
        input_ids = input_ids.to(device)
        attention_mask = input_ids != pad_id
        text_embeddings = torch.cat([
            model.encode_text(input_ids[s:s + batch_size], attention_mask[s:s + batch_size])
            for s in range(0, len(captions), batch_size)]).float()
        similarity = model.similarity(image_embeddings, text_embeddings)  # (N, M) ITC
        metrics: dict[str, Any] = score_retrieval_metrics(similarity, similarity.T,
                                                          text_to_image, ks)
        i2t, t2i = itm_rerank_scores(
            similarity, image_tokens, input_ids, attention_mask,
            model.itm_match,
            k_test, batch_size=batch_size, progress=progress)
    reranked = score_retrieval_metrics(i2t, t2i, text_to_image, ks)
    metrics.update({f"itm_{k}": v for k, v in reranked.items()
                    if k not in ("num_images", "num_texts")})
    metrics["k_test"] = k_test
    metrics["num_skipped"] = len(unreadable)
    metrics["skipped"] = [groups.ids[i] for i in unreadable]
    return metrics
