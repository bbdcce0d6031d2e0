"""Optimizer parameter groups and AdamW (the learning-rate schedules: `vlp.train.schedules`)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from vlp.contract import unwrap_model
from vlp.errors import ConfigError
from vlp.train.schedules import LrSchedule, WarmupCosine

__all__ = ["LrSchedule", "WarmupCosine", "build_optimizer", "param_groups"]

FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_names: Collection[str] | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and undecayed vectors/scalars plus
    `no_decay_names` (default: the contract's ``model.no_weight_decay()``: temperature,
    position embeddings, class token; a module outside the contract passes its own).

    With `lr_scales` (parameter name -> learning-rate multiplier, 1 for a name it lacks:
    layer-wise decay), the two are split further by multiplier, each group carrying its
    ``lr_scale``, the largest multiplier first.

    Each group carries ``param_names`` so checkpoints can store optimizer state by name.
    """
    model = unwrap_model(model)  # names as the model gives them, not DDP's "module." ones
    no_decay_names = set(model.no_weight_decay() if no_decay_names is None
                         else no_decay_names)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name in no_decay_names:
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    groups = []
    for members, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({
                "params": [param for _, param in members],
                "param_names": [name for name, _ in members],
                "weight_decay": decay_value,
            })
    if lr_scales is not None:
        groups = _split_by_scale(groups, lr_scales)
    if not groups:
        raise ConfigError("model has no trainable parameters (every requires_grad is False)")
    return groups


def _split_by_scale(groups: list[dict[str, Any]],
                    lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    split: dict[tuple[float, int], dict[str, Any]] = {}
    for order, group in enumerate(groups):
        for name, param in zip(group["param_names"], group["params"], strict=True):
            scale = float(lr_scales.get(name, 1.0))
            part = split.setdefault((-scale, order), {
                "params": [], "param_names": [], "weight_decay": group["weight_decay"],
                "lr_scale": scale})
            part["params"].append(param)
            part["param_names"].append(name)
    return [split[key] for key in sorted(split)]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    no_decay_names: Collection[str] | None = None,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each at ``lr`` times its ``lr_scale``), with the fused
    kernel where PyTorch has one for every parameter (floating tensors, all on CPU or all on
    CUDA): several times faster per step than the per-tensor loop for small models, and
    deterministic. Else PyTorch's default."""
    if lr <= 0:
        raise ConfigError(f"lr={lr}: expected a positive learning rate")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay={weight_decay}: expected >= 0")
    groups = param_groups(model, weight_decay, no_decay_names, lr_scales)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    params = [param for group in groups for param in group["params"]]
    device_types = {param.device.type for param in params}
    fusable = len(device_types) == 1 and device_types <= {"cpu", "cuda"} and all(
        param.dtype in FUSED_DTYPES for param in params)
    options = {"lr": lr, "betas": tuple(betas), "eps": eps}
    if fusable:
        try:
            return torch.optim.AdamW(groups, fused=True, **options)
        except RuntimeError:  # a build without the fused kernel for this device
            pass
    return torch.optim.AdamW(groups, **options)
