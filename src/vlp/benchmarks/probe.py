"""Linear probe and few-shot classification on frozen image features.

The classifier is multinomial logistic regression with an L2 penalty, fitted full-batch by
L-BFGS in torch: it minimises ``mean cross-entropy + l2 / 2 * ||W||^2`` (the bias is not
penalised). The linear probe follows the CLIP paper's protocol (Radford et al. 2021, sec. 3.2
and appendix A.3): the penalty strength is chosen on a held-out part of the training split,
here from a small log-spaced grid, and the classifier is then refitted on the whole training
split with it and scored on the test split. Few-shot draws k training images per class with
several seeds and reports the mean and standard deviation of the accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlp.errors import ConfigError, DataError

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT = 0.2  # share of the training split held out to choose the L2 strength
FEW_SHOT_L2 = 1e-3


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, l2: float, *,
                 max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """``(weight [D, C], bias [C])`` of the L2-regularised multinomial logistic regression
    of ``labels`` [N] on ``features`` [N, D]."""
    if features.ndim != 2 or labels.shape != (features.shape[0],) or not len(labels):
        raise DataError(f"logistic regression: need features [N, D] and labels [N] with N > 0; "
                        f"got {tuple(features.shape)} and {tuple(labels.shape)}")
    if l2 < 0:
        raise ConfigError(f"l2 strength must be >= 0, got {l2}")
    features = features.double()
    labels = labels.to(features.device).long()
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64,
                         device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=features.device,
                       requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of the fitted classifier on ``features``."""
    predicted = (features.double().to(weight.device) @ weight + bias).argmax(dim=1)
    return float((predicted.cpu() == labels.cpu().long()).double().mean())


def holdout_split(labels: Tensor, share: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(fit, held out)`` indices: a seeded ``share`` of each class held out (at least one
    image of a class with two or more; none of a class with one)."""
    if not 0 < share < 1:
        raise ConfigError(f"holdout share must be in (0, 1), got {share}")
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(share * len(members))) if len(members) > 1 else 0
        held.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, num_classes: int, *, grid: Sequence[float] = L2_GRID,
                 holdout: float = HOLDOUT, seed: int = 0) -> dict[str, float]:
    """``probe_top1`` on the test split with the L2 strength (``probe_l2``) that scored best
    (``probe_holdout_top1``) on a held-out part of the training split (ties: the stronger)."""
    if not grid:
        raise ConfigError("linear probe: the l2 grid is empty")
    fit, held = holdout_split(train_labels, holdout, seed)
    if not len(held):
        raise DataError("linear probe: the training split has no class with two images to "
                        "hold one out")
    scores = {}
    for l2 in sorted(grid, reverse=True):
        weight, bias = fit_logistic(train_features[fit], train_labels[fit], num_classes, l2)
        scores[l2] = accuracy(weight, bias, train_features[held], train_labels[held])
    best = max(scores, key=lambda l2: (scores[l2], l2))
    weight, bias = fit_logistic(train_features, train_labels, num_classes, best)
    return {"probe_top1": accuracy(weight, bias, test_features, test_labels),
            "probe_l2": best, "probe_holdout_top1": scores[best],
            "num_train": len(train_labels)}


def sample_shots(labels: Tensor, k: int, seed: int) -> Tensor:
    """Indices of ``k`` images per class (all of a class with fewer), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def few_shot(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
             test_labels: Tensor, num_classes: int, *, shots: Sequence[int] = (1, 2, 4, 8, 16),
             seeds: int = 5, l2: float = FEW_SHOT_L2) -> dict[str, float]:
    """``fewshot_k{k}_mean`` / ``fewshot_k{k}_std`` test accuracy over ``seeds`` draws of
    ``k`` training images per class, for each k of ``shots``."""
    if not shots or min(shots) < 1 or seeds < 1:
        raise ConfigError(f"few-shot needs shots >= 1 and seeds >= 1; got shots {list(shots)}, "
                          f"seeds {seeds}")
    metrics: dict[str, float] = {}
    for k in shots:
        scores = []
        for seed in range(seeds):
            index = sample_shots(train_labels, k, seed)
            weight, bias = fit_logistic(train_features[index], train_labels[index],
                                        num_classes, l2)
            scores.append(accuracy(weight, bias, test_features, test_labels))
        values = torch.tensor(scores, dtype=torch.float64)
        metrics[f"fewshot_k{k}_mean"] = float(values.mean())
        metrics[f"fewshot_k{k}_std"] = float(values.std(unbiased=False))
    return metrics
