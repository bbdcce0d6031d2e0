"""vlp CLIP trained with the sigmoid loss <-> transformers ``SiglipModel`` directories.

SigLIP's towers as vlp config switches (set here on import, required on export):

- vision: no class token (``class_token=False``), no pre-norm, a patch conv with bias, the
  final norm on every token, then the attention pooling head (``pool="map"``: a learned probe,
  ``nn.MultiheadAttention``'s packed q|k|v split into vlp's ``q`` and ``kv``, a norm and a
  residual MLP); no projection after it (``image_proj=False``).
- text: bidirectional, every position attended when no mask is given (``padding="none"``),
  pooled at the last position (``pool="last"``: SigLIP pads to its context and pools there),
  then a linear head with bias.
- the sigmoid loss's ``logit_scale`` and ``logit_bias``; preprocessing as
  ``SiglipImageProcessor`` does it (squash to the image size, bilinear, mean = std = 0.5).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import ClipConfig, TextConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.hf import RESAMPLE_FROM_HF, RESAMPLE_TO_HF
from vlp.interop.hf_common import (
    PREPROCESSOR_FILE,
    activation_problems,
    encoder_layer_pairs,
    hf_architecture,
    hf_section,
    hf_text_section,
    hf_vision_section,
    read_hf_directory,
    read_hf_weights,
    text_fields,
    vision_fields,
    write_hf_directory,
)
from vlp.interop.keymap import Fused, KeyMap, Pairs, export_from, linear_pairs
from vlp.interop.skeleton import (
    ImportedModel,
    attach_tokenizer,
    family_model,
    hf_readable,
    import_model,
)
from vlp.models.clip import CLIP
from vlp.tokenizers import Tokenizer

ARCHITECTURES = ("SiglipModel",)
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "pad_token_id": 1,
    "bos_token_id": 49406, "eos_token_id": 49407, "projection_size": None,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True,
}
MEAN = STD = (0.5, 0.5, 0.5)
HEAD = "vision_model.head."


def is_siglip(config: ClipConfig) -> bool:
    """A vlp CLIP with SigLIP's towers (what `save_hf_siglip` writes)."""
    return (config.vision.pool == "map" and not config.image_proj
            and not config.vision.class_token)


def siglip_key_map(config: ClipConfig) -> KeyMap:
    """vlp CLIP (SigLIP switches) <-> HF ``SiglipModel`` state-dict names."""
    pairs: Pairs = [
        ("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
        *linear_pairs("visual.patch_embed", "vision_model.embeddings.patch_embedding"),
        *linear_pairs("visual.norm", "vision_model.post_layernorm"),
        ("visual.map_head.probe", HEAD + "probe"),
        *linear_pairs("visual.map_head.attn.proj", HEAD + "attention.out_proj"),
        *linear_pairs("visual.map_head.norm", HEAD + "layernorm"),
        *linear_pairs("visual.map_head.mlp.fc1", HEAD + "mlp.fc1"),
        *linear_pairs("visual.map_head.mlp.fc2", HEAD + "mlp.fc2"),
        ("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        ("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
        *linear_pairs("text.norm", "text_model.final_layer_norm"),
        *linear_pairs("text.head", "text_model.head"),
        ("logit_scale", "logit_scale"),
        ("logit_bias", "logit_bias"),
    ]
    fused: Fused = []
    for tower, ref, layers in (("visual", "vision_model", config.vision.layers),
                               ("text", "text_model", config.text.layers)):
        for i in range(layers):
            block_pairs, block_fused = encoder_layer_pairs(f"{tower}.transformer.blocks.{i}.",
                                                           f"{ref}.encoder.layers.{i}.")
            pairs += block_pairs
            fused += block_fused
    # nn.MultiheadAttention keeps q|k|v in one tensor; vlp's cross-attention has q and k|v
    packed = tuple((HEAD + f"attention.in_proj_{p}",
                    (f"visual.map_head.attn.q.{p}", f"visual.map_head.attn.kv.{p}"))
                   for p in ("weight", "bias"))
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), packed=packed,
                  padded=((HEAD + "probe", 3), ("logit_scale", 1), ("logit_bias", 1)),
                  scalars=frozenset({"logit_scale", "logit_bias"}),
                  ignored=frozenset({"text_model.embeddings.position_ids",
                                     "vision_model.embeddings.position_ids"}))


def _preprocessing(preprocessor: dict[str, Any] | None, image_size: int,
                   where: str) -> dict[str, Any]:
    """VisionConfig fields from a ``SiglipImageProcessor`` config (absent: its defaults)."""
    preprocessor = preprocessor or {}
    size = preprocessor.get("size", {"height": image_size, "width": image_size})
    if not (isinstance(size, dict) and size.get("height") == size.get("width") == image_size):
        raise CheckpointError(f"{where}: size {size!r}; vlp squashes images to "
                              f"{image_size}x{image_size}, the vision tower's input")
    resample = preprocessor.get("resample", 2)
    if resample not in RESAMPLE_FROM_HF:
        raise CheckpointError(f"{where}: resample {resample!r}; expected one of "
                              f"{sorted(RESAMPLE_FROM_HF)}")
    normalize = preprocessor.get("do_normalize", True)
    return {"resize_mode": "squash", "interpolation": RESAMPLE_FROM_HF[resample],
            "mean": tuple(float(x) for x in preprocessor.get("image_mean", MEAN))
            if normalize else (0.0, 0.0, 0.0),
            "std": tuple(float(x) for x in preprocessor.get("image_std", STD))
            if normalize else (1.0, 1.0, 1.0)}


def siglip_config_from_hf(hf_config: dict[str, Any], where: str = "config.json",
                          preprocessor: dict[str, Any] | None = None,
                          tokenizer: Tokenizer | None = None) -> ClipConfig:
    """vlp `ClipConfig` (SigLIP switches) for an HF SigLIP ``config.json``."""
    hf_architecture(hf_config, "siglip", ARCHITECTURES, where, default=ARCHITECTURES)
    text = hf_section(hf_config, "text_config", TEXT_DEFAULTS)
    vision = hf_section(hf_config, "vision_config", VISION_DEFAULTS)
    width = int(vision["hidden_size"])
    projection = int(text.get("projection_size") or text["hidden_size"])
    problems = []
    if vision["num_channels"] != 3:
        problems.append(f"vision_config.num_channels {vision['num_channels']} (expected 3)")
    if not vision.get("vision_use_head", True):
        problems.append("vision_config.vision_use_head false (no pooling head)")
    if projection != width:
        problems.append(f"text projection_size {projection} differs from the vision width "
                        f"{width}")
    if problems:
        raise CheckpointError(f"{where}: not supported: {'; '.join(problems)}")
    ids = ((tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None
           else (text["pad_token_id"], text["bos_token_id"], text["eos_token_id"]))
    vision_config = VisionConfig(
        **vision_fields(vision, f"{where}: vision_config"), pre_norm=False, class_token=False,
        pool="map", patch_bias=True,
        **_preprocessing(preprocessor, int(vision["image_size"]),
                         f"{where}: {PREPROCESSOR_FILE}"))
    return ClipConfig(
        embed_dim=width, vision=vision_config,
        text=TextConfig(**text_fields(text, f"{where}: text_config"), causal=False,
                        pool="last", padding="none", pad_id=int(ids[0]), bos_id=int(ids[1]),
                        eos_id=int(ids[2])),
        loss="siglip", init_logit_scale=2.302585, init_logit_bias=-10.0, proj_bias=True,
        image_proj=False)


def hf_config_from_siglip(config: ClipConfig) -> dict[str, Any]:
    """HF ``config.json`` for a vlp SigLIP; ConfigError naming what HF cannot express."""
    vision, text = config.vision, config.text
    problems = [] if is_siglip(config) else [
        "SigLIP's vision tower (class_token=False, pool='map', image_proj=False)"]
    if config.init_logit_bias is None:
        problems.append("a logit_bias (init_logit_bias)")
    if not config.proj_bias:
        problems.append("proj_bias=False (SigLIP's text head has a bias)")
    if vision.pre_norm or not vision.patch_bias:
        problems.append("vision.pre_norm=True or patch_bias=False")
    if text.causal or text.pool != "last" or text.padding != "none":
        problems.append("a text tower other than bidirectional, padding 'none', pool 'last'")
    problems += activation_problems(vision, text)
    if problems:
        raise ConfigError(f"this vlp CLIP cannot be written as HF SiglipModel: "
                          f"{'; '.join(problems)}")
    return {
        "architectures": list(ARCHITECTURES), "model_type": "siglip",
        "initializer_factor": 1.0, "torch_dtype": "float32",
        "text_config": hf_text_section(text, "siglip_text_model", attention_dropout=0.0,
                                       pad_token_id=text.pad_id, bos_token_id=text.bos_id,
                                       eos_token_id=text.eos_id,
                                       projection_size=config.embed_dim),
        "vision_config": hf_vision_section(vision, "siglip_vision_model", attention_dropout=0.0,
                                           num_channels=3, vision_use_head=True),
    }


def siglip_preprocessor_config(vision: VisionConfig) -> dict[str, Any]:
    """``SiglipImageProcessor`` config reproducing vlp's eval preprocessing."""
    if vision.resize_mode != "squash" or vision.interpolation not in RESAMPLE_TO_HF:
        raise ConfigError("SigLIP preprocessing squashes images with a PIL filter; vision has "
                          f"resize_mode={vision.resize_mode!r}, "
                          f"interpolation={vision.interpolation!r}")
    return {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
            "do_resize": True, "size": {"height": vision.image_size, "width": vision.image_size},
            "resample": RESAMPLE_TO_HF[vision.interpolation], "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(vision.mean),
            "image_std": list(vision.std), "do_convert_rgb": True}


def load_hf_siglip(path: str | os.PathLike[str]) -> ImportedModel:
    """A vlp CLIP with SigLIP's towers from an HF ``SiglipModel`` directory, with its
    tokenizer when the directory holds a ``tokenizer.json`` (SentencePiece-only repos: pass
    ``tokenizer=``)."""
    hf = read_hf_directory(path)
    text = hf_section(hf.config, "text_config", TEXT_DEFAULTS)
    tokenizer = attach_tokenizer(hf.path, int(text["max_position_embeddings"]),
                                 int(text["vocab_size"]))
    config = siglip_config_from_hf(hf.config, hf.where, hf.preprocessor, tokenizer)
    state, source = read_hf_weights(hf.path)
    model = import_model(config, state, source, siglip_key_map(config),
                         unclamped_logit_scale=True)
    return ImportedModel(model, tokenizer)


def save_hf_siglip(model: nn.Module, directory: str | os.PathLike[str],
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory ``transformers.SiglipModel.from_pretrained`` (and the zero-shot image
    classification pipeline) loads: config.json, model.safetensors, preprocessor_config.json and
    the tokenizer files, which give SigLIP ids alone (no attention mask, as SigLIP's own
    tokenizer: it attends to its padding). Atomic."""
    model = family_model(model, CLIP, "HF SiglipModel")
    hf_config = hf_config_from_siglip(model.config)
    return write_hf_directory(directory, hf_config, export_from(siglip_key_map(model.config),
                                                                model),
                              siglip_preprocessor_config(model.config.vision),
                              None if tokenizer is None else hf_readable(tokenizer),
                              model_input_names=("input_ids",))
