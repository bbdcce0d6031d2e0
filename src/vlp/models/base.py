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

    @property
    def share(self) -> float:
        """This micro-batch's fraction of the accumulated rows."""
        rows = [next(iter(part.values())).shape[0] for part in self.features]
        return rows[self.index] / sum(rows)

    def merge(self, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The accumulated batch's features with micro-batch `index`'s rows from `current`."""
        parts = self.features
        return {key: torch.cat([*(p[key] for p in parts[:self.index]), value,
                                *(p[key] for p in parts[self.index + 1:])])
                for key, value in current.items()}


def partial_grad(value: Tensor, share: float) -> Tensor:
    """`value` unchanged, with only `share` of its gradient passed back."""
    if share == 1.0:
        return value
    detached = value.detach()
    return detached + share * (value - detached)


class PretrainModel(nn.Module):
    """Base of the model families: ``features`` and ``loss`` are the family's, the rest shared.

    ``exchange`` (set by the trainer when distributed; None in one process) tells contrastive
    losses how to gather features across ranks.
    """

    exchange: FeatureExchange | None = None
    # False where features() has side effects (momentum encoders, queues): the trainer then
    # runs accumulated micro-batches independently instead of recomputing cached features
    accumulates_features: bool = True

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample tensors (batch first) that `loss` needs; concatenable along dim 0."""
        raise NotImplementedError

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict[str, Any]:
        """``{"loss": total, "losses": {name: detached term}, ...}`` of a batch's features.

        Parameters the loss uses directly (temperature, bias) pass back only `share` of their
        gradient (`partial_grad`): each accumulation pass computes the whole batch's loss, and
        together the passes must count those parameters once."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor],
                accumulated: Accumulated | None = None) -> dict[str, Any]:
        features = self.features(batch)
        if accumulated is None:
            return self.loss(features)
        return self.loss(accumulated.merge(features), share=accumulated.share)
