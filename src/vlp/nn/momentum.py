"""Momentum (EMA) copies of modules and feature queues: MoCo (arXiv 1911.05722), ALBEF (arXiv
2107.07651) and BLIP score against a queue of features from a slowly moving encoder copy."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vlp.errors import ConfigError


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are buffers: saved in the state dict and moved
    with the model, but never trained or seen by the optimizer."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            if param is not None:
                sub.register_buffer(name, param.detach().clone())
    return twin.requires_grad_(False)


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source``, tensor by tensor in the order of
    ``source.named_parameters`` (``target`` is its `momentum_copy`)."""
    targets = dict(target.named_buffers())
    for name, param in source.named_parameters(remove_duplicate=False):
        if ".lora_" in name:  # LoRA adapters (PEFT) in the source: the copy follows the base
            continue
        targets[name.replace(".base_layer.", ".")].mul_(momentum).add_(
            param.detach(), alpha=1.0 - momentum)


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` L2-normalised ``dim``-vectors per stream (e.g. image, text),
    filled from random unit vectors as BLIP does, with one write pointer shared by the streams.

    ``ids`` holds each slot's image id (-1: none yet, or enqueued without ids) so that queued
    captions of a batch's image count as its positives (BLIP retrieval fine-tuning). It is not
    saved (checkpoints keep their layout): after a reload the queued features are unnamed
    until overwritten, which only costs them their positive role."""

    def __init__(self, size: int, dim: int, streams: tuple[str, ...] = ("image", "text")) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.streams = streams
        for stream in streams:
            self.register_buffer(stream, nn.functional.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))  # enqueue calls

    def get(self, stream: str) -> Tensor:
        """``(size, dim)`` the queued features of ``stream`` (a detached copy)."""
        return getattr(self, stream).clone()

    def get_ids(self) -> Tensor:
        """``(size,)`` the image id of each queued row (-1: unknown)."""
        return self.ids.clone()

    @torch.no_grad()
    def enqueue(self, ids: Tensor | None = None, **features: Tensor) -> None:
        """Write each stream's ``(B, dim)`` rows at the pointer, wrapping around the end, and
        their image ``ids`` (B,) (default: -1, unknown)."""
        if sorted(features) != sorted(self.streams):
            raise ValueError(f"enqueue needs exactly the streams {self.streams}")
        batch = next(iter(features.values())).shape[0]
        if batch > self.size:
            raise ConfigError(f"a batch of {batch} does not fit a queue of {self.size}; raise "
                              "queue_size")
        rows = (self.ptr + torch.arange(batch, device=self.ptr.device)) % self.size
        for stream, value in features.items():
            getattr(self, stream)[rows] = value.detach().to(getattr(self, stream).dtype)
        self.ids[rows] = -1 if ids is None else ids.to(self.ids.device)
        self.ptr.copy_((self.ptr + batch) % self.size)
        self.batches += 1
