"""The model contract: everything train/, data/ and eval/ may ask of a model, declared in one place
with its default, so no caller probes a model with ``getattr``/``hasattr``.

Every family derives from `PretrainModel`. The trainer needs only ``forward(batch) =
loss(features(batch))`` and the capabilities below; the split of forward into features and loss
lets it accumulate micro-batches while batch-level terms (the contrastive loss) still see the
whole accumulated batch, as open_clip's ``--accum-freq``: features of every micro-batch are
computed once without gradients, then each micro-batch is recomputed with gradients and its rows
replace the cached ones before the loss (two forwards per sample, memory of one micro-batch).

Capabilities with defaults:

- ``batch_kinds``: the batches a family trains on: ``"image_text"`` (every vision-language
  family), ``"text_only"`` (rows of a text corpus mixed into each batch), ``"qa"`` (VQA
  fine-tuning), ``"text"`` (batches of text-only documents alone: a language model).
- ``accumulates_features``: False where ``features`` has side effects (momentum encoders,
  queues); accumulated micro-batches then run independently.
- ``tower_groups()``: the image and text towers' parameters in layer order (locking a tower,
  layer-wise learning-rate decay).
- ``no_weight_decay()``, ``set_grad_checkpointing()``, ``shard_units()`` (the modules FSDP
  shards one at a time), ``check_tokenizer()``, ``init_from()`` (start from another
  checkpoint's weights), ``after_optimizer_step()`` (keep parameters within their bounds: the
  temperature is clamped there, never inside the forward pass, so its gradient never dies),
  ``begin_step(step, steps_per_epoch)`` (where the run stands, for a family's own schedules),
  ``mask_caption_prompt(tokens)`` (training captions start with a prompt that carries no loss).
- ``tasks()``: what the model can serve (``"embed"``, ``"caption"``, ``"vqa"``, ``"itm"``), from
  the parts it was built with; ``require(task)`` turns a missing one into a one-line error.
- ``encode_image(pixels, normalize)``, ``encode_text(input_ids, attention_mask, normalize)``
  and ``similarity(images, texts)``: how retrieval and zero-shot score a family;
  ``itm_image(pixels)`` and ``itm_match(features, input_ids, attention_mask)``: how ITM
  re-ranking scores a pair.
- The config side (``answer_continues_question``, ``batch_text()``) is `vlp.config.ModelConfig`.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from vlp.errors import ConfigError
from vlp.losses import FeatureExchange
from vlp.store.tensors import load_weights

IMAGE_TEXT, TEXT_ONLY, QA, TEXT = "image_text", "text_only", "qa", "text"  # batch kinds
# what a model can serve: encode_image/encode_text (+ similarity), generate, answer, itm_*
EMBED, CAPTION, VQA, ITM = "embed", "caption", "vqa", "itm"


class ShardUnit:
    """Marker of the blocks FSDP all-gathers one at a time (the default `shard_units`)."""


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


def tower_names(model: nn.Module, tower: str, heads: tuple[str, ...] = ()) -> list[list[str]]:
    """The `layer_groups()` of the model's submodule `tower` as the model names them, with the
    parameters of the model's modules `heads` (attributes; None: absent) added to the last
    group: a `tower_groups` entry. A name the model does not list (a weight tied to another)
    is left out."""
    names = {name for name, _ in model.named_parameters()}
    out = [[f"{tower}.{name}" for name in group if f"{tower}.{name}" in names]
           for group in model.get_submodule(tower).layer_groups()]
    for head in heads:
        module = getattr(model, head)
        if module is not None:
            out[-1] += [f"{head}.{name}" for name, _ in module.named_parameters()
                        if f"{head}.{name}" in names]
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class PretrainModel(nn.Module):
    """Base of the model families: ``features`` and ``loss`` are the family's, the rest shared.

    ``exchange`` (set by the trainer when distributed; None in one process) tells contrastive
    losses how to gather features across ranks.
    """

    config: Any
    exchange: FeatureExchange | None = None
    accumulates_features: ClassVar[bool] = True
    batch_kinds: ClassVar[frozenset[str]] = frozenset({IMAGE_TEXT})

    # -- training ----------------------------------------------------------------------------

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

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay besides biases and norms."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise ConfigError(f"{type(self).__name__} has no gradient checkpointing")

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one at a time (the root is sharded too)."""
        return [module for module in self.modules() if isinstance(module, ShardUnit)]

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step that was taken: clamp parameters
        that must stay within bounds (CLIP's logit scale, BLIP's temperature)."""

    def tower_groups(self) -> dict[str, list[list[str]]]:
        """The family's unimodal towers, ``"image"`` and/or ``"text"``, each as its parameter
        names (as ``named_parameters`` gives them) in layer order: ``[0]`` the embeddings,
        ``[i]`` block ``i``, ``[-1]`` the final norm and the heads that project the tower's
        output. What ``--lock-image`` / ``--lock-text`` freeze and layer-wise learning-rate
        decay scales; parts outside every tower (cross-modal decoders, temperatures) are in
        none. Default: no towers."""
        return {}

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        """Called by the trainer before each optimizer step: the updates this run has taken
        (restored on resume) and its optimizer steps per epoch, for schedules a family keeps
        itself (BLIP ramps its distillation weight over the first epoch)."""

    def mask_caption_prompt(self, prompt_tokens: int) -> None:
        """Called by the trainer when every training caption starts with a prompt
        (``lm_prompt``): the ``prompt_tokens`` tokens after bos carry no captioning loss.
        Families that cannot leave them out refuse."""
        raise ConfigError(f"{type(self).__name__} ({self.config.family}) cannot train captions "
                          "after a prompt (lm_prompt); a family that does is blip")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ConfigError when `tokenizer` cannot feed this model's batches."""

    def init_from(self, path: str | os.PathLike[str]) -> None:
        """Start from another checkpoint's weights file: strict by default (options may differ,
        shapes may not); families with stages override it (BLIP-2 stage 1 -> 2)."""
        load_weights(self, path)

    # -- what the model serves ----------------------------------------------------------------

    def tasks(self) -> frozenset[str]:
        """The tasks this model can serve, among EMBED, CAPTION, VQA and ITM."""
        return frozenset()

    def require(self, task: str, where: str) -> None:
        """ConfigError naming `where` unless the model serves `task`."""
        if task not in self.tasks():
            have = sorted(self.tasks()) or "none"
            raise ConfigError(f"{where}: {type(self).__name__} ({self.config.family}) cannot "
                              f"serve {task!r}; it serves {have}")

    # -- embedding and scoring ---------------------------------------------------------------

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        raise ConfigError(f"{type(self).__name__} does not embed images")

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        raise ConfigError(f"{type(self).__name__} does not embed texts")

    def similarity(self, images: Tensor, texts: Tensor) -> Tensor:
        """``[n_images, n_texts]`` scores of `encode_image` and `encode_text` outputs, as the
        family ranks retrieval and zero-shot classes (cosine similarity by default)."""
        return images @ texts.T

    def zeroshot_logit_scale(self) -> float:
        """What multiplies `similarity` scores before the softmax over zero-shot classes:
        100 (CLIP's inverse temperature at its clamp, as CLIP's and open_clip's zero-shot)."""
        return 100.0

    def itm_logits(self, pixels: Tensor, input_ids: Tensor,
                   attention_mask: Tensor | None = None) -> Tensor:
        """``(B, 2)`` match logits of image i with text i (index 1 = match)."""
        raise ConfigError(f"{type(self).__name__} has no image-text matching head")

    def itm_probability(self, pixels: Tensor, input_ids: Tensor,
                        attention_mask: Tensor | None = None) -> Tensor:
        """``(B,)`` probability that image i matches text i: the softmax of `itm_logits`."""
        return torch.softmax(self.itm_logits(pixels, input_ids, attention_mask).float(),
                             dim=-1)[:, 1]

    def itm_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``(encode_image embeddings, the per-image features itm_match reads)``."""
        raise ConfigError(f"{type(self).__name__} has no image-text matching head")

    def itm_match(self, features: Tensor, input_ids: Tensor,
                  attention_mask: Tensor | None = None) -> Tensor:
        """``(P,)`` match logits of image features ``(P, ...)`` (from `itm_image`) with texts."""
        raise ConfigError(f"{type(self).__name__} has no image-text matching head")
