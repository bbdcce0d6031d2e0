"""CLIP (Radford et al. 2021, arXiv 2103.00020): an image tower and a text tower trained so
that matching pairs have the highest cosine similarity in a shared embedding space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.config import ClipConfig
from vlp.contract import EMBED, PretrainModel, partial_grad, tower_names
from vlp.errors import ConfigError
from vlp.losses import clip_loss, siglip_loss
from vlp.models.registry import register
from vlp.nn import TextTransformer, VisionTransformer


class LogitScaled(PretrainModel):
    """A family with CLIP's learnable temperature: ``logit_scale``, a log-parameterised
    multiplier kept within [0, config.max_logit_scale] after each optimizer step (as
    open_clip does), never clamped inside the loss, so its gradient never dies."""

    logit_scale: nn.Parameter

    def scale(self) -> Tensor:
        """The logit multiplier exp(logit_scale)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0, self.config.max_logit_scale)

    def no_weight_decay(self) -> set[str]:
        """The temperature (and a SigLIP bias) and what each tower exempts, by full name."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def tower_heads(self) -> tuple[str, ...]:
        """Modules outside ``visual`` that belong to the image tower's last group."""
        return ()

    def tower_groups(self) -> dict[str, list[list[str]]]:
        return {"image": tower_names(self, "visual", self.tower_heads()),
                "text": tower_names(self, "text")}


class CLIP(LogitScaled):
    def __init__(self, config: ClipConfig, visual: VisionTransformer, text: TextTransformer):
        super().__init__()
        if config.loss not in ("clip", "siglip"):
            raise ConfigError(f"clip.loss {config.loss!r}; expected 'clip' or 'siglip'")
        self.config = config
        self.visual = visual
        self.text = text
        # temperature as a log-parameterised multiplier, clamped at max_logit_scale (paper §2.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.logit_bias = None

    def tasks(self) -> frozenset[str]:
        return frozenset({EMBED})

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """``(B, 3, H, W) -> (B, embed_dim)``, L2-normalised unless ``normalize=False``."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    normalize: bool = True) -> Tensor:
        """``(B, L) -> (B, embed_dim)``, L2-normalised unless ``normalize=False``."""
        features = self.text(input_ids, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def logits(self, pixels: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img])``."""
        image = self.encode_image(pixels)
        text = self.encode_text(input_ids)
        logits_per_image = self.scale() * image @ text.T
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.T

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"image": self.encode_image(batch["pixels"]),
                "text": self.encode_text(batch["input_ids"])}

    def loss(self, features: dict[str, Tensor], share: float = 1.0) -> dict:
        image, text = features["image"], features["text"]
        scale = partial_grad(self.scale(), share)
        if self.config.loss == "siglip":
            bias = partial_grad(self.logit_bias, share)
            out = siglip_loss(image, text, scale, bias, exchange=self.exchange)
        else:
            out = clip_loss(image, text, scale, exchange=self.exchange)
        return {"loss": out.loss, "losses": {"contrastive": out.loss.detach()},
                "logit_scale": self.scale().detach()}


@register("clip")
def build_clip(config: ClipConfig) -> CLIP:
    if not config.image_proj and config.embed_dim != config.vision.width:
        raise ConfigError(f"clip.image_proj=False: embed_dim {config.embed_dim} must equal "
                          f"vision.width {config.vision.width} (the pooled width is the "
                          "embedding)")
    visual = VisionTransformer(config.vision, config.embed_dim if config.image_proj else None,
                               proj_bias=config.proj_bias)
    text = TextTransformer(config.text, config.embed_dim, proj_bias=config.proj_bias)
    if not math.isfinite(config.init_logit_scale):
        raise ConfigError("clip.init_logit_scale must be finite")
    return CLIP(config, visual, text)
