"""What the trainer needs from a model: a training loss split into per-sample features and a
loss over them.

``forward(batch) = loss(features(batch))``. The split lets the trainer accumulate micro-batches
while batch-level terms (the contrastive loss) still see the whole accumulated batch, as
open_clip's ``--accum-freq``: features of every micro-batch are computed once without
gradients, then each micro-batch is recomputed with gradients and its rows replace the cached
ones before the loss (two forwards per sample, memory of one micro-batch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vlp.losses import FeatureExchange


class Accumulated(NamedTuple):
    """Cached features of every micro-batch of one update, and which one is being recomputed."""

    features: list[dict[str, Tensor]]
    index: int

    def merge(self, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The accumulated batch's features with micro-batch `index`'s rows from `current`."""
        parts = self.features
        return {key: torch.cat([*(p[key] for p in parts[:self.index]), value,
                                *(p[key] for p in parts[self.index + 1:])])
                for key, value in current.items()}


class PretrainModel(nn.Module):
    """Base of the model families: ``features`` and ``loss`` are the family's, the rest shared.

    ``exchange`` (set by the trainer when distributed; None in one process) tells contrastive
    losses how to gather features across ranks.
    """

    exchange: FeatureExchange | None = None

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample tensors (batch first) that `loss` needs; concatenable along dim 0."""
        raise NotImplementedError

    def loss(self, features: dict[str, Tensor]) -> dict[str, Any]:
        """``{"loss": total, "losses": {name: detached term}, ...}`` of a batch's features."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor],
                accumulated: Accumulated | None = None) -> dict[str, Any]:
        features = self.features(batch)
        if accumulated is not None:
            features = accumulated.merge(features)
        return self.loss(features)
