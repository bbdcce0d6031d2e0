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


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    exchange: FeatureExchange | None = None,
) -> ContrastiveOutput:
    """Symmetric InfoNCE of CLIP (arXiv 2103.00020, Fig. 3). Features are L2-normalised;
    ``logit_scale`` is the multiplier (already exponentiated). Without an exchange the batch
    is the local one."""
    all_image, all_text, offset = image_features, text_features, 0
    if exchange is not None:
        (all_image, all_text), offset = exchange.gather(image_features, text_features)
        if not exchange.local_loss:
            image_features, text_features, offset = all_image, all_text, 0
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
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
