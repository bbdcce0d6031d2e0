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

import torch
from torch import Tensor, nn

from vlp.config import OPENAI_MEAN, OPENAI_STD, CocaConfig, TextConfig, VisionConfig
from vlp.contract import unwrap_model
from vlp.data.transforms import INTERPOLATIONS, RESIZE_MODES
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import (
    ImportedModel,
    KeyMap,
    TokenizerSource,
    export_from,
    import_into,
    read_json,
    refuse_foreign_directory,
    save_tensors,
)
from vlp.interop.open_clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _block_pairs,
    _locate,
    _norm_eps,
    _open_clip_tokenizer,
    _special_ids,
    _square,
    _vision_width,
)
from vlp.models.coca import CoCa, build_coca
from vlp.store import atomic_directory, read_state_dict, write_json
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

# (ref tensor packed along dim 0, [(vlp name, rows), ...]): nn.MultiheadAttention's q|k|v
Splits = tuple[tuple[str, tuple[tuple[str, int], ...]], ...]


def _slice_name(ref: str, index: int) -> str:
    return f"{ref}[part {index}]"  # a name no checkpoint holds: stands for a slice of ``ref``


def open_clip_coca_key_map(config: CocaConfig) -> tuple[KeyMap, Splits]:
    """vlp CoCa <-> open_clip ``CoCa`` names; split tensors are mapped through slice names."""
    E, W = config.embed_dim, config.text.width
    pairs = [
        ("visual.class_token", "visual.class_embedding"),
        ("visual.patch_embed.weight", "visual.conv1.weight"),
        ("visual.pos_embed", "visual.positional_embedding"),
        ("pooler.query", "visual.attn_pool.query"),
        ("pooler.attn.q.weight", "visual.attn_pool.attn.q_proj_weight"),
        ("pooler.attn.proj.weight", "visual.attn_pool.attn.out_proj.weight"),
        ("pooler.attn.proj.bias", "visual.attn_pool.attn.out_proj.bias"),
        ("image_proj.weight", "visual.proj"),
        ("text.cls_token", "text.cls_emb"),
        ("text.pos_embed", "text.positional_embedding"),
        ("text.token_embed.weight", "text.token_embedding.weight"),
        ("text.head.weight", "text.text_projection"),
        ("lm_head.weight", "text_decoder.text_projection"),
        ("logit_scale", "logit_scale"),
    ]
    norms = [("visual.norm_pre", "visual.ln_pre"), ("pooler.norm_q", "visual.attn_pool.ln_q"),
             ("pooler.norm_k", "visual.attn_pool.ln_k"), ("pool_norm", "visual.ln_post"),
             ("text.norm", "text.ln_final"), ("decoder.norm", "text_decoder.ln_final")]
    if not config.vision.pre_norm:
        norms = norms[1:]
    pairs += [(f"{ours}.{p}", f"{theirs}.{p}") for ours, theirs in norms
              for p in ("weight", "bias")]
    fused = [("pooler.attn.kv.weight", ("visual.attn_pool.attn.k_proj_weight",
                                        "visual.attn_pool.attn.v_proj_weight"))]
    splits = [("visual.attn_pool.attn.in_proj_bias",
               (("pooler.attn.q.bias", E), ("pooler.attn.kv.bias", 2 * E)))]
    for i in range(config.vision.layers):
        pairs += _block_pairs(f"visual.transformer.blocks.{i}.",
                              f"visual.transformer.resblocks.{i}.")
    for i in range(config.text.layers):
        pairs += _block_pairs(f"text.transformer.blocks.{i}.", f"text.transformer.resblocks.{i}.")
    for i in range(config.decoder_layers):
        pairs += _block_pairs(f"decoder.blocks.{i}.", f"text_decoder.resblocks.{i}.")
        ours, theirs = f"decoder.cross_blocks.{i}.", f"text_decoder.cross_attn.{i}."
        for a, b in (("norm1", "ln_1"), ("norm_context", "ln_1_kv"), ("norm2", "ln_2"),
                     ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj")):
            pairs += [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for p in ("weight", "bias")]
        for p in ("weight", "bias"):
            splits.append((f"{theirs}attn.in_proj_{p}",
                           ((f"{ours}attn.q.{p}", W), (f"{ours}attn.kv.{p}", 2 * W))))
    for ref, parts in splits:
        pairs += [(vlp_name, _slice_name(ref, k)) for k, (vlp_name, _) in enumerate(parts)]
    keymap = KeyMap(pairs=tuple(pairs), fused=tuple(fused),
                    transposed=frozenset({"visual.proj", "text.text_projection",
                                          "text_decoder.text_projection"}),
                    scalars=frozenset({"logit_scale"}))
    return keymap, tuple(splits)


def _split_packed(state: dict[str, Tensor], splits: Splits, source: str) -> dict[str, Tensor]:
    """``state`` with each packed tensor replaced by its slices, after checking it."""
    state = dict(state)
    for ref, parts in splits:
        rows = sum(n for _, n in parts)
        if ref not in state:
            raise CheckpointError(f"{source}: missing key {ref!r} (expected {rows} rows on dim 0)")
        tensor = state.pop(ref)
        if not isinstance(tensor, Tensor) or tensor.ndim == 0 or tensor.shape[0] != rows:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise CheckpointError(f"{source}: key {ref!r} has shape {shape}, expected {rows} "
                                  "rows on dim 0")
        for k, chunk in enumerate(tensor.split([n for _, n in parts], dim=0)):
            state[_slice_name(ref, k)] = chunk
    return state


def _join_packed(state: dict[str, Tensor], splits: Splits) -> dict[str, Tensor]:
    for ref, parts in splits:
        state[ref] = torch.cat([state.pop(_slice_name(ref, k)) for k in range(len(parts))])
    return state


def import_open_clip_coca(state: dict[str, Tensor], model: CoCa, source: str) -> None:
    """Copy an open_clip CoCa state dict into ``model``: every key and shape checked first."""
    keymap, splits = open_clip_coca_key_map(model.config)
    import_into(keymap, _split_packed(state, splits, source), model, source)


def export_open_clip_coca(model: CoCa) -> dict[str, Tensor]:
    """The open_clip CoCa state dict of ``model`` (contiguous CPU tensors)."""
    keymap, splits = open_clip_coca_key_map(model.config)
    return _join_packed(export_from(keymap, model), splits)


# -- configs --------------------------------------------------------------------------------------

def _merged(model_cfg: dict[str, Any], key: str, defaults: dict[str, Any],
            fixed: dict[str, tuple[Any, ...]], where: str) -> dict[str, Any]:
    cfg = {**defaults, **model_cfg[key]}
    for name, value in cfg.items():
        if name in fixed:
            if value not in fixed[name]:
                raise CheckpointError(f"{where}: {key}.{name}={value!r} is not supported; vlp "
                                      f"reads open_clip CoCa with {name}={fixed[name][0]!r}")
        elif name not in defaults and name not in IGNORED:
            raise CheckpointError(f"{where}: {key}: unknown field {name!r}")
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
    width = _vision_width(vision, where)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vocab_size = int(text["vocab_size"])
    bos_id, eos_id = _special_ids(tokenizer, vocab_size)
    pre = {**(preprocess_cfg or {})}
    if pre.get("resize_mode", "shortest") not in RESIZE_MODES:
        raise ConfigError(f"{where}: preprocess_cfg.resize_mode {pre['resize_mode']!r} not "
                          f"supported; expected one of {RESIZE_MODES}")
    if str(pre.get("interpolation", "bicubic")) not in INTERPOLATIONS:
        raise ConfigError(f"{where}: preprocess_cfg.interpolation {pre['interpolation']!r} not "
                          f"supported; expected one of {sorted(INTERPOLATIONS)}")
    vision_eps = _norm_eps(vision, f"{where}: vision_cfg")
    text_eps = _norm_eps(text, f"{where}: text_cfg")
    if _norm_eps(multimodal, f"{where}: multimodal_cfg") != text_eps:
        raise CheckpointError(f"{where}: multimodal_cfg.norm_kwargs differ from text_cfg's")
    return CocaConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=_square(vision["image_size"], "image_size", f"{where}: vision_cfg"),
            patch_size=_square(vision["patch_size"], "patch_size", f"{where}: vision_cfg"),
            width=width, layers=int(vision["layers"]), heads=width // int(vision["head_width"]),
            mlp_ratio=float(vision["mlp_ratio"]), act=act, norm_eps=vision_eps,
            pre_norm=not vision["no_ln_pre"], pool="none",
            mean=tuple(float(x) for x in pre.get("mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in pre.get("std", OPENAI_STD)),
            resize_mode=pre.get("resize_mode", "shortest"),
            interpolation=str(pre.get("interpolation", "bicubic")), pos_embed_antialias=True,
        ),
        text=TextConfig(
            vocab_size=vocab_size, context_length=int(text["context_length"]),
            width=int(text["width"]), layers=int(text["layers"]), heads=int(text["heads"]),
            mlp_ratio=float(text["mlp_ratio"]), act=act, norm_eps=text_eps, causal=True,
            pad_id=int(text["pad_id"]), bos_id=bos_id, eos_id=eos_id,
        ),
        decoder_layers=int(multimodal["layers"]), decoder_heads=int(multimodal["heads"]),
        pooler="shared", caption_queries=int(vision["attn_pooler_queries"]),
        pooler_heads=int(vision["attn_pooler_heads"]), tie_lm_head=False,
        init_logit_scale=float(model_cfg.get("init_logit_scale", 2.6592)),
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
    if vision.norm_eps != 1e-5 or text.norm_eps != 1e-5:
        problems.append("LayerNorm eps other than 1e-5")
    if problems:
        raise ConfigError(f"this vlp CoCa cannot be written as open_clip CoCa: "
                          f"{'; '.join(problems)}")
    model_cfg = {
        "embed_dim": config.embed_dim, "quick_gelu": vision.act == "quick_gelu",
        "init_logit_scale": config.init_logit_scale, "custom_text": True,
        "vision_cfg": {
            "image_size": vision.image_size, "patch_size": vision.patch_size,
            "width": vision.width, "layers": vision.layers,
            "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio,
            "no_ln_pre": not vision.pre_norm, "attentional_pool": True,
            "attn_pooler_queries": config.caption_queries,
            "attn_pooler_heads": config.pooler_heads, "output_tokens": True,
        },
        "text_cfg": {
            "context_length": text.context_length, "vocab_size": text.vocab_size,
            "width": text.width, "heads": text.heads, "layers": text.layers,
            "mlp_ratio": text.mlp_ratio, "pad_id": text.pad_id, "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": text.context_length, "vocab_size": text.vocab_size,
            "width": text.width, "heads": config.decoder_heads, "layers": config.decoder_layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }
    preprocess_cfg = {"size": vision.image_size, "mode": "RGB", "mean": list(vision.mean),
                      "std": list(vision.std), "interpolation": vision.interpolation,
                      "resize_mode": vision.resize_mode, "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# -- directories ----------------------------------------------------------------------------------

def load_open_clip_coca(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    tokenizer: TokenizerSource | None = None,
) -> ImportedModel:
    """A vlp CoCa from open_clip CoCa weights: a local-dir (``open_clip_config.json`` + weights)
    or a weights file with ``config`` (a model config JSON such as ``coca_ViT-B-32.json``)."""
    path = Path(path)
    config_path, weights_path = _locate(path, config)
    raw = read_json(config_path)
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict) or "multimodal_cfg" not in model_cfg:
        raise CheckpointError(f"{config_path}: not an open_clip CoCa config (no multimodal_cfg)")
    text = {**TEXT_DEFAULTS, **model_cfg.get("text_cfg", {})}
    loaded_tokenizer = _open_clip_tokenizer(tokenizer, path if path.is_dir() else None,
                                            model_cfg, int(text["context_length"]),
                                            int(text["vocab_size"]))
    coca_config = coca_config_from_open_clip(model_cfg, str(config_path),
                                             raw.get("preprocess_cfg"), loaded_tokenizer)
    model = build_coca(coca_config)
    import_open_clip_coca(read_state_dict(weights_path), model, str(weights_path))
    # the reference applies its loaded temperature unclamped
    coca_config.max_logit_scale = max(coca_config.max_logit_scale,
                                      float(model.logit_scale.detach()))
    return ImportedModel(model.eval(), loaded_tokenizer)


def save_open_clip_coca(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write an open_clip local-dir (``open_clip_config.json`` + ``open_clip_model.safetensors``)
    that ``open_clip.create_model("local-dir:DIR")`` loads as ``CoCa``. Atomic."""

    model = unwrap_model(model)
    if not isinstance(model, CoCa):
        raise ConfigError(f"{type(model).__name__} cannot be exported as open_clip CoCa; "
                          "expected a vlp CoCa model")
    config_json = open_clip_config_from_coca(model.config)
    tensors = export_open_clip_coca(model)
    directory = Path(directory)
    refuse_foreign_directory(directory, CONFIG_FILE)
    with atomic_directory(directory) as staging:
        write_json(staging / CONFIG_FILE, config_json)
        save_tensors(tensors, staging / WEIGHTS_FILE)
    return directory
