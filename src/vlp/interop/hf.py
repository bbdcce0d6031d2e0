"""HF transformers ``CLIPModel`` <-> vlp CLIP: config translation, key map, directory I/O.

Reads and writes the directory ``CLIPModel.save_pretrained`` produces (``config.json`` +
``model.safetensors``; ``pytorch_model.bin`` and sharded indexes are read too) without
importing transformers. HF CLIP's behaviour is reproduced by vlp config switches set here:

- ``act="quick_gelu"``: HF ``hidden_act`` ``quick_gelu`` (x * sigmoid(1.702 x)), per tower.
- ``text.pool="eos"`` + ``text.eos_fallback="first"``: pool the first ``eos_token_id``, index 0
  when a row has none; ``text.pool="argmax"`` when ``eos_token_id == 2`` (pre-#24773 configs).
- ``text.mask_padding=True``: a given ``attention_mask`` also masks padding keys (left padding).
- ``vision.pre_norm=True``: HF's ``pre_layrnorm`` before the encoder (always present in HF).
- ``proj_bias=False``: ``visual_projection`` / ``text_projection`` have no bias.
- ``vision.pos_embed_antialias=False``: ``interpolate_pos_encoding`` is plain bicubic.
Position embeddings need no switch: HF stores them as ``nn.Embedding`` rows in vlp's layout
(class position first, then the patch grid row by row), so they map by name.

Export is exact for every input row that holds an eos; a row without one pools index 0 in HF,
which differs from a vlp model left at ``eos_fallback="last"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import OPENAI_MEAN, OPENAI_STD, ClipConfig, TextConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
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
from vlp.interop.keymap import Fused, KeyMap, export_from, linear_pairs
from vlp.interop.skeleton import (
    ImportedModel,
    attach_tokenizer,
    family_model,
    hf_readable,
    import_model,
)
from vlp.models.clip import CLIP
from vlp.tokenizers import Tokenizer

LEGACY_ARGMAX_EOS_ID = 2  # HF CLIP pools by argmax when its config says eos_token_id == 2

# HF CLIP config defaults (transformers 4.57 CLIPTextConfig / CLIPVisionConfig / CLIPConfig)
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
HF_PROJECTION_DIM = 512
HF_LOGIT_SCALE_INIT = 2.6592

# PIL resample codes used by CLIPImageProcessor <-> vlp interpolation names (vlp.data.transforms)
RESAMPLE_FROM_HF = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
RESAMPLE_TO_HF = {name: code for code, name in RESAMPLE_FROM_HF.items()}


# -- key map --------------------------------------------------------------------------------------

def hf_key_map(config: ClipConfig) -> KeyMap:
    """vlp CLIP <-> HF ``CLIPModel`` state-dict names for ``config``."""
    pairs = [
        ("visual.class_token", "vision_model.embeddings.class_embedding"),
        ("visual.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
        *linear_pairs("visual.norm_pre", "vision_model.pre_layrnorm"),
        *linear_pairs("visual.norm", "vision_model.post_layernorm"),
        ("visual.head.weight", "visual_projection.weight"),
        ("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        ("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
        *linear_pairs("text.norm", "text_model.final_layer_norm"),
        ("text.head.weight", "text_projection.weight"),
        ("logit_scale", "logit_scale"),
    ]
    fused: Fused = []
    for tower, ref_tower, layers in (("visual", "vision_model", config.vision.layers),
                                     ("text", "text_model", config.text.layers)):
        for i in range(layers):
            block_pairs, block_fused = encoder_layer_pairs(f"{tower}.transformer.blocks.{i}.",
                                                    f"{ref_tower}.encoder.layers.{i}.")
            pairs += block_pairs
            fused += block_fused
    return KeyMap(
        pairs=tuple(pairs),
        fused=tuple(fused),
        scalars=frozenset({"logit_scale"}),
        # derived buffers some older checkpoints still carry
        ignored=frozenset({"text_model.embeddings.position_ids",
                           "vision_model.embeddings.position_ids"}),
    )


# -- configs --------------------------------------------------------------------------------------

def _preprocessing(preprocessor: dict[str, Any], where: str) -> dict[str, Any]:
    """VisionConfig fields from a ``CLIPImageProcessor`` config (absent: OpenAI defaults)."""
    fields: dict[str, Any] = {"mean": OPENAI_MEAN, "std": OPENAI_STD,
                              "interpolation": "bicubic", "resize_mode": "shortest"}
    if not preprocessor:
        return fields
    if preprocessor.get("do_normalize", True):
        fields["mean"] = tuple(float(x) for x in preprocessor.get("image_mean", OPENAI_MEAN))
        fields["std"] = tuple(float(x) for x in preprocessor.get("image_std", OPENAI_STD))
    else:
        fields["mean"], fields["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = preprocessor.get("resample", 3)
    if resample not in RESAMPLE_FROM_HF:
        raise ConfigError(f"{where}: resample {resample!r}; expected one of "
                          f"{sorted(RESAMPLE_FROM_HF)}")
    fields["interpolation"] = RESAMPLE_FROM_HF[resample]
    size = preprocessor.get("size", {"shortest_edge": 224})
    exact_size = isinstance(size, dict) and "height" in size and "width" in size
    if exact_size and not preprocessor.get("do_center_crop", True):
        fields["resize_mode"] = "squash"  # resize straight to height x width, no crop
    return fields


def _tower(hf_config: dict[str, Any], name: str) -> dict[str, Any]:
    """One tower's settings: defaults, then ``{name}_config``, then the legacy
    ``{name}_config_dict`` (which HF lets win)."""
    defaults = HF_TEXT_DEFAULTS if name == "text" else HF_VISION_DEFAULTS
    return hf_section(hf_config, f"{name}_config", defaults, f"{name}_config_dict")


def clip_config_from_hf(hf_config: dict[str, Any], where: str = "config.json",
                        preprocessor: dict[str, Any] | None = None,
                        tokenizer: Tokenizer | None = None) -> ClipConfig:
    """vlp `ClipConfig` for an HF CLIP ``config.json`` (+ preprocessor config, tokenizer ids)."""
    hf_architecture(hf_config, "clip", ("CLIPModel",), where, default=("CLIPModel",))
    text, vision = _tower(hf_config, "text"), _tower(hf_config, "vision")
    if vision["num_channels"] != 3:
        raise CheckpointError(f"{where}: vision_config.num_channels {vision['num_channels']}; "
                              "expected 3 (RGB)")
    legacy_argmax = text["eos_token_id"] == LEGACY_ARGMAX_EOS_ID
    if tokenizer is not None:
        bos_id, eos_id, pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        if not legacy_argmax:
            eos_id = text["eos_token_id"]  # the id the reference pools at
    else:
        bos_id, pad_id = text["bos_token_id"], text["pad_token_id"]
        # legacy configs carry a wrong eos id; CLIP's end-of-text is its highest id
        eos_id = text["vocab_size"] - 1 if legacy_argmax else text["eos_token_id"]
    return ClipConfig(
        embed_dim=int(hf_config.get("projection_dim", HF_PROJECTION_DIM)),
        vision=VisionConfig(
            **vision_fields(vision, f"{where}: vision_config"), pre_norm=True, pool="cls",
            pos_embed_antialias=False,
            **_preprocessing(preprocessor or {}, f"{where}: {PREPROCESSOR_FILE}"),
        ),
        text=TextConfig(
            **text_fields(text, f"{where}: text_config"), causal=True,
            pool="argmax" if legacy_argmax else "eos", eos_fallback="first", mask_padding=True,
            pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
        ),
        init_logit_scale=float(hf_config.get("logit_scale_init_value", HF_LOGIT_SCALE_INIT)),
        proj_bias=False,
    )


def hf_config_from_clip(config: ClipConfig) -> dict[str, Any]:
    """HF ``config.json`` for a vlp CLIP; ConfigError where HF cannot express the model."""
    vision, text = config.vision, config.text
    problems = []
    if config.proj_bias:
        problems.append("proj_bias=True (HF projections have no bias)")
    if config.init_logit_bias is not None:
        problems.append("a logit_bias (SigLIP-style) head")
    if not vision.pre_norm:
        problems.append("vision.pre_norm=False (HF always applies pre_layrnorm)")
    if vision.pool != "cls":
        problems.append(f"vision.pool={vision.pool!r} (HF pools the class token)")
    if not text.causal:
        problems.append("text.causal=False")
    problems += activation_problems(vision, text)
    if text.pool == "eos" and text.eos_id == LEGACY_ARGMAX_EOS_ID:
        problems.append("text.pool='eos' with eos_id 2 (HF reads eos_token_id 2 as argmax)")
    if text.pool not in ("eos", "argmax"):
        problems.append(f"text.pool={text.pool!r}")
    if problems:
        raise ConfigError(f"this vlp CLIP cannot be written as HF CLIPModel: {'; '.join(problems)}")
    eos_token_id = text.eos_id
    if text.pool == "argmax" and text.eos_id != text.vocab_size - 1:
        # first-eos equals argmax only when eos is the highest id; else HF's legacy argmax switch
        eos_token_id = LEGACY_ARGMAX_EOS_ID
    common = {"projection_dim": config.embed_dim, "attention_dropout": 0.0, "dropout": 0.0,
              "initializer_range": 0.02, "initializer_factor": 1.0}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": hf_text_section(
            text, "clip_text_model", **common, pad_token_id=text.pad_id,
            bos_token_id=text.bos_id, eos_token_id=eos_token_id),
        "vision_config": hf_vision_section(vision, "clip_vision_model", **common,
                                           num_channels=3),
    }


def hf_preprocessor_config(vision: VisionConfig) -> dict[str, Any]:
    """``CLIPImageProcessor`` config reproducing vlp's eval preprocessing."""
    size = vision.image_size
    squash = vision.resize_mode == "squash"
    if vision.interpolation not in RESAMPLE_TO_HF:
        raise ConfigError(f"vision.interpolation {vision.interpolation!r} has no HF resample code")
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size} if squash else {"shortest_edge": size},
        "resample": RESAMPLE_TO_HF[vision.interpolation],
        "do_center_crop": not squash,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vision.mean),
        "image_std": list(vision.std),
        "do_convert_rgb": True,
    }


# -- directories ----------------------------------------------------------------------------------

def load_hf(path: str | os.PathLike[str], *, image_size: int | None = None) -> ImportedModel:
    """A vlp CLIP from an HF ``CLIPModel`` directory, with its tokenizer (tokenizer.json or
    vocab.json + merges.txt in the same directory; None when absent) and preprocessing.

    ``image_size`` serves another input size by interpolating the position embeddings as HF's
    ``interpolate_pos_encoding=True`` does.
    """
    hf = read_hf_directory(path)
    text = _tower(hf.config, "text")
    tokenizer = attach_tokenizer(hf.path, int(text["max_position_embeddings"]),
                                 int(text["vocab_size"]))
    config = clip_config_from_hf(hf.config, hf.where, hf.preprocessor, tokenizer)
    state, source = read_hf_weights(hf.path)
    model = import_model(config, state, source, hf_key_map(config),
                         image_size=image_size, unclamped_logit_scale=True)
    return ImportedModel(model, tokenizer)


def save_hf(model: nn.Module, directory: str | os.PathLike[str],
            tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory ``transformers.CLIPModel.from_pretrained`` loads: config.json,
    model.safetensors, preprocessor_config.json and the tokenizer files. Atomic."""
    model = family_model(model, CLIP, "HF CLIPModel")
    hf_config = hf_config_from_clip(model.config)
    preprocessor = hf_preprocessor_config(model.config.vision)
    tensors = export_from(hf_key_map(model.config), model)
    return write_hf_directory(directory, hf_config, tensors, preprocessor,
                              None if tokenizer is None else hf_readable(tokenizer))
