"""The frozen parts of BLIP-2: an image encoder read at one hidden layer, and an HF LLM.

Frozen means: ``requires_grad=False``, eval mode kept through ``model.train()`` (the owning
model's ``train`` re-applies it), and optionally stored in bf16/fp16. Image encoders come from
vlp (a ViT built from the config or the ``.visual`` of a vlp model directory), transformers
(any vision model directory) or open_clip; each returns the tokens of hidden state
``layer`` (0 = embeddings, -1 = after the last block, -2 = the paper's second-to-last layer),
before any final norm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlp.config import Blip2Config
from vlp.errors import CheckpointError, ConfigError
from vlp.models.registry import load_model_dir
from vlp.nn import VisionTransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VISION_FORMATS = ("vlp", "hf", "open_clip")
LLM_KINDS = ("none", "causal", "seq2seq")
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def torch_dtype(name: str, field: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"blip2.{field} {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def freeze_(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """No gradients, eval mode, optionally cast to ``dtype``; returns ``module``."""
    if dtype is not None:
        module.to(dtype)
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def _hidden_index(layer: int, depth: int, where: str) -> int:
    """Hidden-state index in [0, depth] of ``layer`` (negative counts from the end)."""
    index = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= index <= depth:
        raise ConfigError(f"{where}: vision_layer {layer} is outside the encoder's "
                          f"{depth + 1} hidden states")
    return index


class FrozenImageEncoder(nn.Module):
    """``pixels (B, 3, H, W) -> features (B, N, width)`` of one hidden layer, no grad."""

    width: int

    def forward(self, pixels: Tensor) -> Tensor:
        with torch.no_grad():
            return self.features(pixels.to(self.dtype()))

    def features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class VitFeatures(FrozenImageEncoder):
    """A vlp ViT cut after the blocks ``layer`` needs, its final norm and head dropped
    (LAVIS drops EVA's last block the same way)."""

    def __init__(self, tower: VisionTransformer, layer: int) -> None:
        super().__init__()
        blocks = tower.transformer.blocks
        keep = _hidden_index(layer, len(blocks), "blip2")
        tower.transformer.blocks = nn.ModuleList(list(blocks)[:keep])
        tower.norm, tower.head = nn.Identity(), nn.Identity()
        self.tower = tower
        self.width = tower.config.width

    def features(self, pixels: Tensor) -> Tensor:
        return self.tower.forward_features(pixels)  # blocks cut, no final norm


# from_pretrained keyword for the frozen towers: transformers 5 swaps layers for kernels fetched
# from the Hub by default (and refuses to load without the `kernels` package); transformers 4.57
# never did. Frozen towers keep the plain PyTorch modules on every version: loading a local
# directory stays offline and the outputs stay those of the reference forward.
NO_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}


class HFVisionFeatures(FrozenImageEncoder):
    """A transformers vision model (CLIPVisionModel, SiglipVisionModel, a CLIPModel's vision
    side, ...) read at ``hidden_states[layer]``."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        super().__init__()
        self.tower = getattr(model, "vision_model", model)
        self.layer = layer
        self.width = int(self.tower.config.hidden_size)

    def features(self, pixels: Tensor) -> Tensor:
        return self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]


class OpenClipFeatures(FrozenImageEncoder):
    """An open_clip ``VisionTransformer`` read after block ``layer`` (class token kept)."""

    def __init__(self, visual: nn.Module, layer: int) -> None:
        super().__init__()
        depth = len(visual.transformer.resblocks)
        index = _hidden_index(layer, depth, "blip2 (open_clip)")
        if index == 0:
            raise ConfigError("blip2: open_clip towers give block outputs; vision_layer must "
                              "name a block, not the embeddings")
        self.tower = visual
        self.block = index - 1
        self.width = int(visual.transformer.width)

    def features(self, pixels: Tensor) -> Tensor:
        out = self.tower.forward_intermediates(pixels, indices=[self.block], stop_early=True,
                                               intermediates_only=True, output_fmt="NLC",
                                               output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]],
                         dim=1)


def build_image_encoder(config: Blip2Config) -> FrozenImageEncoder:
    """The frozen image encoder ``config`` describes, frozen and cast to ``vision_dtype``."""
    dtype = torch_dtype(config.vision_dtype, "vision_dtype")
    fmt, path = config.vision_format, config.vision_path
    if fmt not in VISION_FORMATS:
        raise ConfigError(f"blip2.vision_format {fmt!r}; expected one of {list(VISION_FORMATS)}")
    if fmt == "vlp":
        if path is None:
            tower = VisionTransformer(config.vision, output_dim=None)
        else:
            tower = _vlp_visual(path)
        encoder: FrozenImageEncoder = VitFeatures(tower, config.vision_layer)
    elif path is None:
        raise ConfigError(f"blip2.vision_format {fmt!r} needs vision_path")
    elif fmt == "hf":
        from transformers import AutoModel

        encoder = HFVisionFeatures(AutoModel.from_pretrained(path, **NO_HUB_KERNELS),
                                   config.vision_layer)
    else:
        import open_clip

        if path.startswith(OPEN_CLIP_SCHEMAS):  # the whole path names the model
            name, pretrained = path, ""
        else:
            name, _, pretrained = path.partition(":")
        model = open_clip.create_model(name, pretrained=pretrained or None)
        encoder = OpenClipFeatures(model.visual, config.vision_layer)
    return freeze_(encoder, dtype)


def _vlp_visual(path: str | os.PathLike[str]) -> VisionTransformer:
    visual = getattr(load_model_dir(path), "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise CheckpointError(f"{path}: a vlp model with a ViT `.visual` (CLIP, CoCa, BLIP) "
                              f"is needed as a BLIP-2 image encoder, got {type(visual).__name__}")
    return visual


# -- the LLM ---------------------------------------------------------------------------------------

def build_llm(config: Blip2Config) -> nn.Module | None:
    """The frozen HF LLM of stage 2 (None in stage 1): ``llm_path`` through from_pretrained, or
    the inline ``llm_config`` with random weights (the checkpoint then holds them)."""
    if config.llm not in LLM_KINDS:
        raise ConfigError(f"blip2.llm {config.llm!r}; expected one of {list(LLM_KINDS)}")
    if config.llm == "none":
        return None
    if (config.llm_path is None) == (config.llm_config is None):
        raise ConfigError("blip2 stage 2 needs exactly one of llm_path (an HF model directory) "
                          "and llm_config (an inline HF config dict)")
    import transformers

    auto = (transformers.AutoModelForCausalLM if config.llm == "causal"
            else transformers.AutoModelForSeq2SeqLM)
    dtype = torch_dtype(config.llm_dtype, "llm_dtype")
    if config.llm_path is not None and Path(config.llm_path).is_file():
        raise ConfigError(f"blip2.llm_path {config.llm_path}: expected an HF model directory")
    try:
        if config.llm_path is not None:
            model = auto.from_pretrained(config.llm_path, dtype=dtype, **NO_HUB_KERNELS)
        else:
            model = auto.from_config(hf_config_of(config.llm_config), dtype=dtype)
    except ValueError as error:  # transformers: a config class the Auto class does not map
        raise ConfigError(f"blip2.llm {config.llm!r} does not fit this LLM: {error}") from error
    if bool(model.config.is_encoder_decoder) != (config.llm == "seq2seq"):
        raise ConfigError(f"blip2.llm {config.llm!r} does not fit {type(model).__name__} "
                          f"(is_encoder_decoder={model.config.is_encoder_decoder})")
    return freeze_(model)


def hf_config_of(data: dict[str, Any]) -> Any:
    """A transformers config object from its ``to_dict()`` (``model_type`` picks the class)."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError("blip2.llm_config needs a model_type (an HF config dict)")
    return AutoConfig.for_model(model_type, **data)
