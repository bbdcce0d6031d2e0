"""open_clip ``CLIP`` (ViT towers) <-> vlp CLIP: config translation, key map, directory I/O.

Reads a model config JSON (bare, like open_clip's ``model_configs/ViT-B-32.json``, or the
``open_clip_config.json`` of its local-dir/hub schema with ``model_cfg`` + ``preprocess_cfg``)
with ``open_clip_model.safetensors`` or a ``.bin``/``.pt``/``.pth`` state dict, without
importing open_clip. open_clip's behaviour is reproduced by vlp config switches set here:

- ``act="quick_gelu"``: the model config's ``quick_gelu`` flag (both towers).
- ``text.pool="argmax"``: pool the highest token id (open_clip ``pool_type`` "argmax");
  ``text.pool="eos"`` + ``eos_fallback="first"`` for ``pool_type`` "eos"; "first" as is.
- ``text.mask_padding=False``: open_clip's CLIP text tower masks no padding, only the future.
- ``vision.pre_norm``: ``ln_pre`` unless ``no_ln_pre``.
- ``proj_bias=False``: ``visual.proj`` / ``text_projection`` are bias-free ``[in, out]`` matrices
  (vlp stores ``[out, in]``: transposed on the way).
- ``vision.pos_embed_antialias=True``: open_clip resizes position grids with antialiasing.
Position embeddings need no switch: ``positional_embedding`` rows are in vlp's layout (class
position first, then the patch grid row by row). ``logit_scale`` may be 0-d or 1-d.

Export is exact for every input row that holds an eos; a row without one pools index 0 under
open_clip's "eos" pool, which differs from a vlp model left at ``eos_fallback="last"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vlp.config import ClipConfig, TextConfig, VisionConfig
from vlp.data.transforms import RESIZE_MODES
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import KeyMap, export_from, linear_pairs
from vlp.interop.open_clip_common import (
    CONFIG_FILE,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_NORM_EPS,
    WEIGHTS_FILE,
    activation,
    check_fields,
    open_clip_tokenizer,
    preprocess_cfg_of,
    preprocess_fields,
    read_open_clip_files,
    text_cfg_of,
    text_fields,
    text_tower_pairs,
    vision_cfg_of,
    vision_fields,
    vit_pairs,
)
from vlp.interop.skeleton import (
    ImportedModel,
    TokenizerSource,
    family_model,
    hf_readable,
    import_model,
    write_directory,
)
from vlp.models.clip import CLIP
from vlp.store import read_state_dict
from vlp.tokenizers import Tokenizer

EXPORTED_TOKENIZER_NAME = "vlp-export"  # non-empty hf_tokenizer_name: local-dir loads our files

# open_clip defaults (v3.3.0 CLIPVisionCfg / CLIPTextCfg)
VISION_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
    "image_size": 224, "patch_dropout": 0.0, "no_ln_pre": False, "pool_type": "tok",
    "final_ln_after_pool": False,
}
TEXT_DEFAULTS: dict[str, Any] = {
    "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
    "mlp_ratio": 4.0, "pad_id": 0, "eos_id": 2, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear",
}
# fields accepted only at these values (anything else is another architecture)
VISION_FIXED: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "attentional_pool": (False,), "pos_embed_type": ("learnable",),
    "act_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
    "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,), "timm_model_name": (None, ""),
}
VISION_IGNORED = {"output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                  "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                  "timm_drop", "timm_drop_path", "norm_kwargs"}
TEXT_FIXED: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
    "proj_bias": (False,), "proj_type": ("linear",), "act_kwargs": (None, {}),
    "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
    "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
    "scale_fc": (False,), "hf_model_name": (None, ""), "final_ln_after_pool": (False, True),
}
TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "output_tokens",
                "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "norm_kwargs"}
TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text",
             "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"}
TEXT_POOLS = {"argmax": "argmax", "eos": "eos", "first": "first"}


# -- key map --------------------------------------------------------------------------------------

def open_clip_key_map(config: ClipConfig, custom_text: bool = False) -> KeyMap:
    """vlp CLIP <-> open_clip ``CLIP`` (``CustomTextCLIP`` with ``custom_text``) names."""
    t = "text." if custom_text else ""  # CustomTextCLIP keeps its text tower under "text."
    pairs = vit_pairs(config.vision) + text_tower_pairs(t, config.text.layers)
    pairs += linear_pairs("visual.norm", "visual.ln_post")
    pairs += [("visual.head.weight", "visual.proj"), ("logit_scale", "logit_scale")]
    scalars = {"logit_scale"}
    if config.init_logit_bias is not None:
        pairs.append(("logit_bias", "logit_bias"))
        scalars.add("logit_bias")
    return KeyMap(pairs=tuple(pairs),
                  transposed=frozenset({"visual.proj", f"{t}text_projection"}),
                  scalars=frozenset(scalars))


# -- configs --------------------------------------------------------------------------------------

def clip_config_from_open_clip(model_cfg: dict[str, Any], where: str = CONFIG_FILE,
                               preprocess_cfg: dict[str, Any] | None = None,
                               tokenizer: Tokenizer | None = None) -> ClipConfig:
    """vlp `ClipConfig` for an open_clip model config (``embed_dim``/``vision_cfg``/``text_cfg``).

    Without a tokenizer, bos/eos ids follow OpenAI's BPE: the two highest ids.
    """
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise CheckpointError(f"{where}: not an open_clip model config; expected embed_dim, "
                              "vision_cfg and text_cfg")
    unknown = sorted(set(model_cfg) - TOP_LEVEL)
    if unknown:
        raise CheckpointError(f"{where}: {unknown[0]!r} is not supported (unknown architecture: "
                              "vlp reads open_clip CLIP/CustomTextCLIP with ViT towers)")
    vision = {**VISION_DEFAULTS, **model_cfg["vision_cfg"]}
    text = {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    if isinstance(vision["layers"], list | tuple):
        raise CheckpointError(f"{where}: vision_cfg.layers={vision['layers']} is a ResNet "
                              "(unknown architecture); vlp reads ViT towers")
    check_fields(vision, VISION_FIXED, set(VISION_DEFAULTS) | VISION_IGNORED,
                 f"{where}: vision_cfg")
    check_fields(text, TEXT_FIXED, set(TEXT_DEFAULTS) | TEXT_IGNORED, f"{where}: text_cfg")
    if vision["pool_type"] not in ("tok", "avg"):
        raise CheckpointError(f"{where}: vision_cfg.pool_type={vision['pool_type']!r}; "
                              "expected 'tok' or 'avg'")
    if vision["pool_type"] == "avg" and vision["final_ln_after_pool"]:
        raise CheckpointError(f"{where}: vision_cfg.final_ln_after_pool with 'avg' pooling is "
                              "not supported")
    if text["pool_type"] not in TEXT_POOLS:
        raise CheckpointError(f"{where}: text_cfg.pool_type={text['pool_type']!r}; expected one "
                              f"of {sorted(TEXT_POOLS)}")
    act = activation(model_cfg)
    text_settings = text_fields(text, act, where, tokenizer)
    if text["pool_type"] == "eos":
        text_settings["eos_id"] = int(text["eos_id"])  # the id the reference pools at
    vision_settings = vision_fields(vision, act, where)
    init_logit_bias = model_cfg.get("init_logit_bias")
    return ClipConfig(
        embed_dim=int(model_cfg["embed_dim"]),
        vision=VisionConfig(
            **vision_settings, pool="cls" if vision["pool_type"] == "tok" else "mean",
            patch_dropout=float(vision["patch_dropout"]),
            **preprocess_fields(preprocess_cfg, where),
        ),
        text=TextConfig(**text_settings, pool=TEXT_POOLS[text["pool_type"]],
                        eos_fallback="first", mask_padding=False),
        init_logit_scale=float(model_cfg.get("init_logit_scale", DEFAULT_LOGIT_SCALE)),
        init_logit_bias=None if init_logit_bias is None else float(init_logit_bias),
        loss="clip" if init_logit_bias is None else "siglip",
        proj_bias=False,
    )


def open_clip_config_from_clip(config: ClipConfig,
                               tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """open_clip ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) for a vlp CLIP."""
    vision, text = config.vision, config.text
    problems = []
    if config.proj_bias:
        problems.append("proj_bias=True (open_clip's image projection has no bias)")
    if vision.act != text.act or vision.act not in ("gelu", "quick_gelu"):
        problems.append(f"activations {vision.act!r}/{text.act!r} (open_clip: gelu or "
                        "quick_gelu, the same in both towers)")
    if vision.pool not in ("cls", "mean"):
        problems.append(f"vision.pool={vision.pool!r}")
    if not text.causal:
        problems.append("text.causal=False")
    if text.pool not in TEXT_POOLS.values():
        problems.append(f"text.pool={text.pool!r}")
    if vision.resize_mode not in RESIZE_MODES:
        problems.append(f"vision.resize_mode={vision.resize_mode!r}")
    if problems:
        raise ConfigError(f"this vlp CLIP cannot be written as open_clip CLIP: "
                          f"{'; '.join(problems)}")
    vision_cfg: dict[str, Any] = {
        **vision_cfg_of(vision), "pool_type": "tok" if vision.pool == "cls" else "avg",
        "patch_dropout": vision.patch_dropout,
    }
    text_cfg: dict[str, Any] = {**text_cfg_of(text), "eos_id": text.eos_id,
                                "pool_type": text.pool}
    for cfg, tower in ((vision_cfg, vision), (text_cfg, text)):
        if tower.norm_eps != DEFAULT_NORM_EPS:
            cfg["norm_kwargs"] = {"eps": tower.norm_eps}
    if tokenizer is not None:
        text_cfg["hf_tokenizer_name"] = EXPORTED_TOKENIZER_NAME
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim, "quick_gelu": vision.act == "quick_gelu",
        "vision_cfg": vision_cfg, "text_cfg": text_cfg,
        "init_logit_scale": config.init_logit_scale,
    }
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg_of(vision)}


# -- directories ----------------------------------------------------------------------------------

def load_open_clip(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    tokenizer: TokenizerSource | None = None,
    image_size: int | None = None,
) -> ImportedModel:
    """A vlp CLIP from open_clip weights: a local-dir (``open_clip_config.json`` + weights) or a
    weights file with ``config`` (a model config JSON). ``image_size`` resizes the position grid
    as open_clip's loader does for ``force_image_size`` (antialiased bicubic)."""
    files = read_open_clip_files(path, config, "text_cfg", "model")
    model_cfg = files.model_cfg
    loaded_tokenizer = open_clip_tokenizer(tokenizer, files.directory,
                                           {**TEXT_DEFAULTS, **model_cfg["text_cfg"]})
    clip_config = clip_config_from_open_clip(model_cfg, str(files.config_path),
                                             files.preprocess_cfg, loaded_tokenizer)
    key_map = open_clip_key_map(clip_config, bool(model_cfg.get("custom_text")))
    model = import_model(clip_config, read_state_dict(files.weights_path),
                         str(files.weights_path), key_map, image_size=image_size,
                         unclamped_logit_scale=True)
    return ImportedModel(model, loaded_tokenizer)


def save_open_clip(model: nn.Module, directory: str | os.PathLike[str],
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write an open_clip local-dir: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (+ tokenizer files, named by ``hf_tokenizer_name``). open_clip loads it with
    ``create_model("local-dir:DIR")`` / ``get_tokenizer("local-dir:DIR")``, or, for a model
    config registered under NAME, ``create_model(NAME, pretrained=DIR/WEIGHTS_FILE)``. Atomic."""
    model = family_model(model, CLIP, "open_clip CLIP")
    config_json = open_clip_config_from_clip(model.config, tokenizer)
    tensors = export_from(open_clip_key_map(model.config), model)
    return write_directory(directory, {CONFIG_FILE: config_json, WEIGHTS_FILE: tensors},
                           None if tokenizer is None else hf_readable(tokenizer))
