"""open_clip ``CoCa`` <-> vlp CoCa: config translation, key map, directory I/O.

Reads an open_clip CoCa model config (``embed_dim``/``vision_cfg``/``text_cfg``/
``multimodal_cfg``, bare like ``model_configs/coca_ViT-B-32.json`` or the ``model_cfg`` of an
``open_clip_config.json``) with its weights, without importing open_clip. open_clip's CoCa is
reproduced by these vlp switches, set here:

- ``pooler="shared"``: one ``attn_pooler_queries`` pooler; query 0 -> contrastive, the rest ->
  decoder memory (open_clip's ``attentional_pool: true``, not the paper's two poolers).
- ``text_mask="pad_id_legacy"``: keys equal to ``pad_id`` are hidden from every text row, with
  the validity shifted right by one (open_clip's ``correct_cls_mask=False``, its default).
- ``visual.ln_post`` is vlp's ``pool_norm`` over the pooled tokens; the ViT has no final norm.
- The CLS is appended after the text; vlp gives it position ``context_length`` where open_clip
  uses the text length: the same for texts padded to the context, as open_clip's tokenizer
  pads them.
- ``text_projection`` and the decoder's ``text_projection`` (the LM head, untied) are
  ``[in, out]`` matrices, transposed on the way.
- ``nn.MultiheadAttention`` packs q|k|v: the pooler's ``in_proj_bias`` and the decoder's
  cross-attention ``in_proj_weight``/``in_proj_bias`` split into vlp's ``q`` and ``kv``.

open_clip leaves ``text_decoder.text_projection`` uninitialised (``torch.empty``) in models it
builds itself; weights trained with open_clip carry a real one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlp.config import CocaConfig, TextConfig, VisionConfig
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import KeyMap, export_from, import_into, linear_pairs
from vlp.interop.open_clip_common import (
    CONFIG_FILE,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_NORM_EPS,
    WEIGHTS_FILE,
    activation,
    check_fields,
    norm_eps,
    open_clip_tokenizer,
    preprocess_cfg_of,
    preprocess_fields,
    read_open_clip_files,
    resblock_pairs,
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
    import_model,
    write_directory,
)
from vlp.models.coca import CoCa
from vlp.store import read_state_dict
from vlp.tokenizers import Tokenizer

# open_clip v3.3.0 defaults (CLIPVisionCfg, CLIPTextCfg, MultimodalCfg) for the fields read here
VISION_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
    "image_size": 224, "attentional_pool": False, "attn_pooler_queries": 256,
    "attn_pooler_heads": 8, "no_ln_pre": False, "pool_type": "tok",
}
TEXT_DEFAULTS: dict[str, Any] = {
    "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
    "mlp_ratio": 4.0, "pad_id": 0, "embed_cls": False,
}
MULTIMODAL_DEFAULTS: dict[str, Any] = {
    "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
    "mlp_ratio": 4,
}
# fields accepted only at these values (anything else is another architecture)
VISION_FIXED: dict[str, tuple[Any, ...]] = {
    "attentional_pool": (True,), "pool_type": ("tok",), "ls_init_value": (None,),
    "pos_embed_type": ("learnable",), "patch_dropout": (0.0, 0), "timm_model_name": (None, ""),
    "final_ln_after_pool": (False,), "act_kwargs": (None, {}), "block_type": (None, "default"),
}
TEXT_FIXED: dict[str, tuple[Any, ...]] = {
    "embed_cls": (True,), "no_causal_mask": (False,), "proj_bias": (False,),
    "proj_type": ("linear",), "ls_init_value": (None,), "hf_model_name": (None, ""),
    "act_kwargs": (None, {}), "block_type": (None, "default"), "correct_cls_mask": (False,),
    "use_pad_mask": (False,),
}
MULTIMODAL_FIXED: dict[str, tuple[Any, ...]] = {"ls_init_value": (None,)}
IGNORED = {"output_tokens", "norm_kwargs", "hf_tokenizer_name", "tokenizer_mode",
           "tokenizer_kwargs", "eos_id", "pool_type", "dim_head", "attn_pooler_heads",
           "n_queries", "head_width"}
TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg", "quick_gelu",
             "custom_text", "init_logit_scale"}


# -- key map --------------------------------------------------------------------------------------

def open_clip_coca_key_map(config: CocaConfig) -> KeyMap:
    """vlp CoCa <-> open_clip ``CoCa`` names. ``nn.MultiheadAttention`` packs q|k|v: the
    pooler's ``in_proj_bias`` and the decoder's cross-attention ``in_proj_*`` are packed from
    vlp's ``q`` and ``kv``."""
    pairs = vit_pairs(config.vision) + text_tower_pairs("text.", config.text.layers)
    pairs += [
        ("pooler.query", "visual.attn_pool.query"),
        ("pooler.attn.q.weight", "visual.attn_pool.attn.q_proj_weight"),
        ("image_proj.weight", "visual.proj"),
        ("text.cls_token", "text.cls_emb"),
        ("lm_head.weight", "text_decoder.text_projection"),
        ("logit_scale", "logit_scale"),
    ]
    for ours, theirs in (("pooler.attn.proj", "visual.attn_pool.attn.out_proj"),
                         ("pooler.norm_q", "visual.attn_pool.ln_q"),
                         ("pooler.norm_k", "visual.attn_pool.ln_k"),
                         ("pool_norm", "visual.ln_post"),
                         ("decoder.norm", "text_decoder.ln_final")):
        pairs += linear_pairs(ours, theirs)
    fused = [("pooler.attn.kv.weight", ("visual.attn_pool.attn.k_proj_weight",
                                        "visual.attn_pool.attn.v_proj_weight"))]
    packed = [("visual.attn_pool.attn.in_proj_bias",
               ("pooler.attn.q.bias", "pooler.attn.kv.bias"))]
    for i in range(config.decoder_layers):
        pairs += resblock_pairs(f"decoder.blocks.{i}.", f"text_decoder.resblocks.{i}.")
        ours, theirs = f"decoder.cross_blocks.{i}.", f"text_decoder.cross_attn.{i}."
        for a, b in (("norm1", "ln_1"), ("norm_context", "ln_1_kv"), ("norm2", "ln_2"),
                     ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj")):
            pairs += linear_pairs(ours + a, theirs + b)
        packed += [(f"{theirs}attn.in_proj_{p}", (f"{ours}attn.q.{p}", f"{ours}attn.kv.{p}"))
                   for p in ("weight", "bias")]
    return KeyMap(pairs=tuple(pairs), fused=tuple(fused), packed=tuple(packed),
                  transposed=frozenset({"visual.proj", "text.text_projection",
                                        "text_decoder.text_projection"}),
                  scalars=frozenset({"logit_scale"}))


def import_open_clip_coca(state: dict[str, Tensor], model: CoCa, source: str) -> None:
    """Copy an open_clip CoCa state dict into ``model``: every key and shape checked first."""
    import_into(open_clip_coca_key_map(model.config), state, model, source)


def export_open_clip_coca(model: CoCa) -> dict[str, Tensor]:
    """The open_clip CoCa state dict of ``model`` (contiguous CPU tensors)."""
    return export_from(open_clip_coca_key_map(model.config), model)


# -- configs --------------------------------------------------------------------------------------

def _merged(model_cfg: dict[str, Any], key: str, defaults: dict[str, Any],
            fixed: dict[str, tuple[Any, ...]], where: str) -> dict[str, Any]:
    cfg = {**defaults, **model_cfg[key]}
    check_fields(cfg, fixed, set(defaults) | IGNORED, f"{where}: {key}")
    return cfg


def coca_config_from_open_clip(model_cfg: dict[str, Any], where: str = CONFIG_FILE,
                               preprocess_cfg: dict[str, Any] | None = None,
                               tokenizer: Tokenizer | None = None) -> CocaConfig:
    """vlp `CocaConfig` for an open_clip CoCa model config; without a tokenizer, bos/eos ids
    follow OpenAI's BPE (the two highest ids), as open_clip's ``generate`` assumes."""
    if not {"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg"} <= set(model_cfg):
        raise CheckpointError(f"{where}: not an open_clip CoCa config; expected embed_dim, "
                              "vision_cfg, text_cfg and multimodal_cfg")
    unknown = sorted(set(model_cfg) - TOP_LEVEL)
    if unknown:
        raise CheckpointError(f"{where}: {unknown[0]!r} is not supported in an open_clip CoCa "
                              "config")
    vision = _merged(model_cfg, "vision_cfg", VISION_DEFAULTS, VISION_FIXED, where)
    text = _merged(model_cfg, "text_cfg", TEXT_DEFAULTS, TEXT_FIXED, where)
    multimodal = _merged(model_cfg, "multimodal_cfg", MULTIMODAL_DEFAULTS, MULTIMODAL_FIXED,
                         where)
    embed_dim = int(model_cfg["embed_dim"])
    if not int(text["width"]) == int(multimodal["width"]) == embed_dim:
        raise CheckpointError(f"{where}: open_clip CoCa needs embed_dim == text_cfg.width == "
                              f"multimodal_cfg.width, got {embed_dim}, {text['width']}, "
                              f"{multimodal['width']}")
    if int(multimodal["vocab_size"]) != int(text["vocab_size"]):
        raise CheckpointError(f"{where}: multimodal_cfg.vocab_size {multimodal['vocab_size']} "
                              f"differs from text_cfg.vocab_size {text['vocab_size']}")
    if float(multimodal["mlp_ratio"]) != float(text["mlp_ratio"]):
        raise CheckpointError(f"{where}: multimodal_cfg.mlp_ratio differs from text_cfg's; vlp "
                              "builds both decoder halves with one ratio")
    act = activation(model_cfg)
    vision_settings = vision_fields(vision, act, where)
    preprocessing = preprocess_fields(preprocess_cfg, where)
    text_settings = text_fields(text, act, where, tokenizer)
    if norm_eps(multimodal, f"{where}: multimodal_cfg") != text_settings["norm_eps"]:
        raise CheckpointError(f"{where}: multimodal_cfg.norm_kwargs differ from text_cfg's")
    return CocaConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(**vision_settings, pool="none", **preprocessing),
        text=TextConfig(**text_settings),
        decoder_layers=int(multimodal["layers"]), decoder_heads=int(multimodal["heads"]),
        pooler="shared", caption_queries=int(vision["attn_pooler_queries"]),
        pooler_heads=int(vision["attn_pooler_heads"]), tie_lm_head=False,
        init_logit_scale=float(model_cfg.get("init_logit_scale", DEFAULT_LOGIT_SCALE)),
        text_mask="pad_id_legacy",
    )


def open_clip_config_from_coca(config: CocaConfig) -> dict[str, Any]:
    """open_clip ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) for a vlp CoCa
    that open_clip can represent; ConfigError naming what it cannot."""
    vision, text = config.vision, config.text
    problems = []
    if config.pooler != "shared":
        problems.append(f"pooler={config.pooler!r} (open_clip: one shared pooler)")
    if config.text_mask != "pad_id_legacy":
        problems.append(f"text_mask={config.text_mask!r} (open_clip: 'pad_id_legacy')")
    if config.tie_lm_head:
        problems.append("tie_lm_head=True (open_clip's LM head is its own matrix)")
    if not config.embed_dim == text.width:
        problems.append(f"embed_dim {config.embed_dim} != text.width {text.width}")
    if vision.act != text.act or vision.act not in ("gelu", "quick_gelu"):
        problems.append(f"activations {vision.act!r}/{text.act!r}")
    if vision.norm_eps != DEFAULT_NORM_EPS or text.norm_eps != DEFAULT_NORM_EPS:
        problems.append("LayerNorm eps other than 1e-5")
    if problems:
        raise ConfigError(f"this vlp CoCa cannot be written as open_clip CoCa: "
                          f"{'; '.join(problems)}")
    model_cfg = {
        "embed_dim": config.embed_dim, "quick_gelu": vision.act == "quick_gelu",
        "init_logit_scale": config.init_logit_scale, "custom_text": True,
        "vision_cfg": {
            **vision_cfg_of(vision), "attentional_pool": True,
            "attn_pooler_queries": config.caption_queries,
            "attn_pooler_heads": config.pooler_heads, "output_tokens": True,
        },
        "text_cfg": {**text_cfg_of(text), "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {
            "context_length": text.context_length, "vocab_size": text.vocab_size,
            "width": text.width, "heads": config.decoder_heads, "layers": config.decoder_layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg_of(vision)}


# -- directories ----------------------------------------------------------------------------------

def load_open_clip_coca(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    tokenizer: TokenizerSource | None = None,
) -> ImportedModel:
    """A vlp CoCa from open_clip CoCa weights: a local-dir (``open_clip_config.json`` + weights)
    or a weights file with ``config`` (a model config JSON such as ``coca_ViT-B-32.json``)."""
    files = read_open_clip_files(path, config, "multimodal_cfg", "CoCa")
    text = {**TEXT_DEFAULTS, **files.model_cfg.get("text_cfg", {})}
    loaded_tokenizer = open_clip_tokenizer(tokenizer, files.directory, text)
    coca_config = coca_config_from_open_clip(files.model_cfg, str(files.config_path),
                                             files.preprocess_cfg, loaded_tokenizer)
    model = import_model(coca_config, read_state_dict(files.weights_path),
                         str(files.weights_path), open_clip_coca_key_map(coca_config),
                         unclamped_logit_scale=True)
    return ImportedModel(model, loaded_tokenizer)


def save_open_clip_coca(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write an open_clip local-dir (``open_clip_config.json`` + ``open_clip_model.safetensors``)
    that ``open_clip.create_model("local-dir:DIR")`` loads as ``CoCa``. Atomic."""
    model = family_model(model, CoCa, "open_clip CoCa")
    config_json = open_clip_config_from_coca(model.config)
    return write_directory(directory, {CONFIG_FILE: config_json,
                                       WEIGHTS_FILE: export_open_clip_coca(model)})
