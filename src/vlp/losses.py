"""Training losses as plain functions of features; no model knowledge.

Contrastive losses are written local x global: each rank scores its own rows against the
gathered batch, with targets offset by where its rows start (memory linear in world size).
How features cross ranks is a `FeatureExchange`; ``vlp.train.distributed`` makes one per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class FeatureExchange(Protocol):
    """How contrastive features cross ranks.

    ``gather(*features)`` returns every rank's rows of each tensor, concatenated in rank order,
    and the row where this rank's own rows start. With ``local_loss`` each rank scores only its
    rows against the gathered batch; otherwise every rank computes the whole-batch loss. Either
    way the gradient equals one process on the concatenated batch when the gather carries
    gradients (data-parallel averaging divides the world size back out).
    """

    local_loss: bool

    def gather(self, *features: Tensor) -> tuple[list[Tensor], int]: ...


@dataclass
class ContrastiveOutput:
    loss: Tensor
    logits_per_image: Tensor  # (B_local, B_global)
    logits_per_text: Tensor  # (B_local, B_global)


def same_image_targets(row_ids: Tensor | None, column_ids: Tensor | None) -> Tensor | None:
    """Contrastive targets by image id (BLIP retrieval fine-tuning, LAVIS BLIP-2): row ``i``'s
    positives are every column with its id, each ``1 / count``. None when there are no ids or
    no row has a positive besides its own column (one caption per image): callers then keep
    their one-hot targets, so such batches compute exactly what they did without ids. Ids are
    the rows' `vlp.data.images.image_group_id`; a negative id (a queue slot not yet written)
    matches nothing."""
    if row_ids is None or column_ids is None:
        return None
    same = (row_ids[:, None] == column_ids[None, :]) & (row_ids[:, None] >= 0)
    if int(same.sum()) <= row_ids.shape[0]:
        return None
    same = same.float()
    return same / same.sum(dim=1, keepdim=True).clamp(min=1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))``."""
    return -(logits.log_softmax(dim=1) * targets).sum(dim=1).mean()


def _gather_ids(exchange: FeatureExchange | None, image_ids: Tensor | None
                ) -> Tensor | None:
    if image_ids is None or exchange is None:
        return image_ids
    return exchange.gather(image_ids)[0][0]


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    exchange: FeatureExchange | None = None,
    image_ids: Tensor | None = None,
) -> ContrastiveOutput:
    """Symmetric InfoNCE of CLIP (arXiv 2103.00020, Fig. 3). Features are L2-normalised;
    ``logit_scale`` is the multiplier (already exponentiated). Without an exchange the batch
    is the local one. With ``image_ids`` (B,) the captions of one image are all positives
    (`same_image_targets`, gathered with the features); CLIP and CoCa pass none (open_clip)."""
    all_image, all_text, offset = image_features, text_features, 0
    all_ids = _gather_ids(exchange, image_ids)
    if exchange is not None:
        (all_image, all_text), offset = exchange.gather(image_features, text_features)
        if not exchange.local_loss:
            image_features, text_features, offset, image_ids = all_image, all_text, 0, all_ids
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    soft = same_image_targets(image_ids, all_ids)
    if soft is not None:
        loss = 0.5 * (soft_cross_entropy(logits_per_image, soft)
                      + soft_cross_entropy(logits_per_text, soft))
        return ContrastiveOutput(loss, logits_per_image, logits_per_text)
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = 0.5 * (F.cross_entropy(logits_per_image, targets)
                  + F.cross_entropy(logits_per_text, targets))
    return ContrastiveOutput(loss, logits_per_image, logits_per_text)


def _sigmoid_block(image: Tensor, texts: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                   positive_from: int) -> Tensor:
    """Sum of -log sigmoid(label * logit) over one block of texts; ``positive_from`` is the
    column of image row 0's positive (out of range: the block holds no positives)."""
    logits = logit_scale * image @ texts.T + logit_bias
    rows = torch.arange(image.shape[0], device=image.device)
    positive = (rows + positive_from)[:, None] == torch.arange(texts.shape[0],
                                                               device=image.device)[None]
    labels = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    exchange: FeatureExchange | None = None,
) -> ContrastiveOutput:
    """Pairwise sigmoid loss of SigLIP (arXiv 2303.15343): every image-text pair is a binary
    problem, positives on the (offset) diagonal; summed over texts, averaged over images.

    Distributed, the local images meet the gathered texts one rank-sized block at a time, each
    block recomputed in backward, so the live logits are (B_local, B_local), not
    (B_local, B_global). The returned logits are the local block's.
    """
    batch = image_features.shape[0]
    if exchange is None:
        loss = _sigmoid_block(image_features, text_features, logit_scale, logit_bias, 0) / batch
    else:
        (all_text,), offset = exchange.gather(text_features)
        loss = image_features.new_zeros(())
        for start in range(0, all_text.shape[0], batch):
            block = all_text[start:start + batch]
            shift = offset - start
            if torch.is_grad_enabled():
                loss = loss + checkpoint(_sigmoid_block, image_features, block, logit_scale,
                                         logit_bias, shift, use_reentrant=False)
            else:
                loss = loss + _sigmoid_block(image_features, block, logit_scale, logit_bias,
                                             shift)
        loss = loss / batch
    logits = logit_scale * image_features @ text_features.T + logit_bias
    return ContrastiveOutput(loss, logits, logits.T)


def caption_nll(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0
                ) -> tuple[Tensor, Tensor]:
    """Per-sequence summed token cross-entropy of ``(B, L, V)`` logits against ``(B, L)``
    labels, in fp32, and the number of counted tokens (labels other than IGNORE_INDEX:
    padding, prompts). The caption loss of a batch is ``nll.sum() / tokens.sum()``; kept per
    row so accumulated micro-batches can be merged before averaging."""
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX,
                          label_smoothing=label_smoothing, reduction="none")
    return nll.sum(1), (labels != IGNORE_INDEX).sum(1)


def distilled_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    image_bank: Tensor,
    text_bank: Tensor,
    logit_scale: Tensor,
    alpha: float,
    image_ids: Tensor | None = None,
    bank_ids: Tensor | None = None,
) -> ContrastiveOutput:
    """ITC with momentum distillation (ALBEF arXiv 2107.07651 §3.3, BLIP §3.2). The banks'
    first B rows are the momentum encoders' features of this batch (the positives, on the
    diagonal), the rest a queue. Targets are ``alpha * softmax(momentum similarities) +
    (1 - alpha) * one-hot``; the loss is their soft cross-entropy, averaged over both
    directions. Logits are ``(B, B + queue)``. With ``image_ids`` (B,) and ``bank_ids``
    (B + queue,) the one-hot becomes `same_image_targets` (BLIP/LAVIS retrieval fine-tuning:
    every bank row of the same image, queued ones included, is a positive)."""
    batch = image_features.shape[0]
    logits_per_image = logit_scale * image_features @ text_bank.T
    logits_per_text = logit_scale * text_features @ image_bank.T
    with torch.no_grad():
        one_hot = same_image_targets(image_ids, bank_ids)
        if one_hot is None:
            one_hot = torch.zeros_like(logits_per_image)
            one_hot[:, :batch] = torch.eye(batch, device=one_hot.device, dtype=one_hot.dtype)
        scale = logit_scale.detach()
        targets_i2t = (alpha * (scale * image_bank[:batch] @ text_bank.T).softmax(dim=1)
                       + (1 - alpha) * one_hot)
        targets_t2i = (alpha * (scale * text_bank[:batch] @ image_bank.T).softmax(dim=1)
                       + (1 - alpha) * one_hot)
    loss_i2t = soft_cross_entropy(logits_per_image, targets_i2t)
    loss_t2i = soft_cross_entropy(logits_per_text, targets_t2i)
    return ContrastiveOutput(0.5 * (loss_i2t + loss_t2i), logits_per_image, logits_per_text)


@torch.no_grad()
def sample_hard_negatives(similarity: Tensor, similarity_t2i: Tensor | None = None,
                          offset: int = 0, generator: torch.Generator | None = None,
                          image_ids: Tensor | None = None, candidate_ids: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """BLIP's ITM hard negatives (§3.2): for each text an image and for each image a text,
    drawn in proportion to softmax(similarity) + 1e-4 with the positive excluded.

    ``similarity`` ``(B, N)`` scores this batch's images against ``N`` candidate texts (every
    rank's when distributed), ``similarity_t2i`` ``(B, N)`` its texts against the candidate
    images (default: ``similarity.T``, square only); row ``i``'s positive is column
    ``offset + i``. With ``image_ids`` (B,) and ``candidate_ids`` (N,) every candidate of the
    row's image is excluded too (weight 0: another caption of the same image is no negative).
    Returns (candidate image index per text, candidate text index per image)."""
    if similarity_t2i is None:
        similarity_t2i = similarity.T
    batch, candidates = similarity.shape
    if candidates < 2:
        raise ValueError("hard negatives need at least 2 candidate pairs")
    if similarity_t2i.shape != (batch, candidates):
        raise ValueError(f"similarity_t2i {tuple(similarity_t2i.shape)} != similarity "
                         f"{tuple(similarity.shape)}")
    rows = torch.arange(batch, device=similarity.device)
    positive = torch.zeros(batch, candidates, dtype=torch.bool, device=similarity.device)
    positive[rows, rows + offset] = True
    if image_ids is not None and candidate_ids is not None:
        positive |= image_ids[:, None] == candidate_ids[None, :]
    weights_t2i = (similarity_t2i.float().softmax(dim=1) + 1e-4).masked_fill(positive, 0)
    weights_i2t = (similarity.float().softmax(dim=1) + 1e-4).masked_fill(positive, 0)
    image_per_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    text_per_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return image_per_text, text_per_image


def itm_nll(positive_logits: Tensor, negative_logits: Tensor) -> Tensor:
    """Per-row ITM cross-entropy: ``(B, 2)`` logits of matching pairs (label 1) and ``(N, 2)``
    of mismatched ones (label 0) -> ``(B + N,)``."""
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat([positive_logits.new_ones(positive_logits.shape[0], dtype=torch.long),
                        negative_logits.new_zeros(negative_logits.shape[0], dtype=torch.long)])
    return F.cross_entropy(logits.float(), labels, reduction="none")


def query_contrastive_loss(
    image_queries: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    label_smoothing: float = 0.0,
    exchange: FeatureExchange | None = None,
    image_ids: Tensor | None = None,
) -> ContrastiveOutput:
    """BLIP-2's ITC (arXiv 2301.12597 §3.2): an image is ``(B, Q, D)`` query embeddings, a text
    one ``(B, D)`` embedding (all L2-normalised); a pair's similarity is the highest over the
    queries. Symmetric cross-entropy with ``label_smoothing`` (LAVIS 0.1), local x global as
    `clip_loss`; with ``image_ids`` the targets are `same_image_targets`, smoothed alike."""
    all_image, all_text, offset = image_queries, text_features, 0
    all_ids = _gather_ids(exchange, image_ids)
    if exchange is not None:
        (all_image, all_text), offset = exchange.gather(image_queries, text_features)
        if not exchange.local_loss:
            image_queries, text_features, offset, image_ids = all_image, all_text, 0, all_ids
    sim_i2t = torch.einsum("iqd,td->itq", image_queries, all_text).amax(dim=-1)  # (B, B_all)
    sim_t2i = torch.einsum("td,iqd->tiq", text_features, all_image).amax(dim=-1)  # (B, B_all)
    logits_per_image, logits_per_text = logit_scale * sim_i2t, logit_scale * sim_t2i
    targets = same_image_targets(image_ids, all_ids)
    if targets is None:
        targets = torch.arange(image_queries.shape[0], device=image_queries.device) + offset
    loss = 0.5 * (F.cross_entropy(logits_per_image, targets, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_per_text, targets, label_smoothing=label_smoothing))
    return ContrastiveOutput(loss, logits_per_image, logits_per_text)
