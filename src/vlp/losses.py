"""Training losses as plain functions of features; no model knowledge.

Contrastive losses are written local x global: each rank scores its own rows against the
gathered batch, with targets offset by ``rank * local_batch`` (memory linear in world size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    rank: int = 0,
) -> ContrastiveOutput:
    """Symmetric InfoNCE of CLIP (arXiv 2103.00020, Fig. 3). Features are L2-normalised;
    ``logit_scale`` is the multiplier (already exponentiated). Without gathered features the
    batch is the local one."""
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    batch = image_features.shape[0]
    targets = torch.arange(batch, device=image_features.device) + rank * batch
    loss = 0.5 * (F.cross_entropy(logits_per_image, targets)
                  + F.cross_entropy(logits_per_text, targets))
    return ContrastiveOutput(loss, logits_per_image, logits_per_text)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    all_text_features: Tensor | None = None,
    rank: int = 0,
) -> ContrastiveOutput:
    """Pairwise sigmoid loss of SigLIP (arXiv 2303.15343): every image-text pair is a binary
    problem, positives on the (offset) diagonal; summed over texts, averaged over images."""
    all_text = text_features if all_text_features is None else all_text_features
    logits = logit_scale * image_features @ all_text.T + logit_bias  # (B_local, B_global)
    batch = image_features.shape[0]
    labels = -torch.ones_like(logits)
    index = torch.arange(batch, device=logits.device)
    labels[index, index + rank * batch] = 1.0
    loss = -F.logsigmoid(labels * logits).sum() / batch
    return ContrastiveOutput(loss, logits, logits.T)
