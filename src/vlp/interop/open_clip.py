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

from vlp.config import OPENAI_MEAN, OPENAI_STD, ClipConfig, TextConfig, VisionConfig
from vlp.data.transforms import INTERPOLATIONS, RESIZE_MODES
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import (
    ImportedModel,
    KeyMap,
    TokenizerSource,
    attach_tokenizer,
    clip_model,
    export_from,
    fit_tokenizer,
    hf_readable,
    import_into,
    keep_loaded_logit_scale,
    read_json,
    refuse_foreign_directory,
    save_tensors,
)
from vlp.models import build_model
from vlp.store import atomic_directory, read_state_dict, write_json
from vlp.tokenizers import Tokenizer, clip_bpe_tokenizer, load_tokenizer

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# weight files of an open_clip directory, in the order open_clip's own loader prefers them
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
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

def _block_pairs(vlp_prefix: str, ref_prefix: str) -> list[tuple[str, str]]:
    names = [("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.in_proj"),
             ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    pairs = []
    for ours, theirs in names:
        for p in ("weight", "bias"):
            # nn.MultiheadAttention names its fused q|k|v projection in_proj_weight/in_proj_bias
            ref = f"{theirs}_{p}" if theirs == "attn.in_proj" else f"{theirs}.{p}"
            pairs.append((f"{vlp_prefix}{ours}.{p}", f"{ref_prefix}{ref}"))
    return pairs


def open_clip_key_map(config: ClipConfig, custom_text: bool = False) -> KeyMap:
    """vlp CLIP <-> open_clip ``CLIP`` (``CustomTextCLIP`` with ``custom_text``) names."""
    t = "text." if custom_text else ""  # CustomTextCLIP keeps its text tower under "text."
    pairs = [
        ("visual.class_token", "visual.class_embedding"),
        ("visual.patch_embed.weight", "visual.conv1.weight"),
        ("visual.pos_embed", "visual.positional_embedding"),
        ("visual.norm.weight", "visual.ln_post.weight"),
        ("visual.norm.bias", "visual.ln_post.bias"),
        ("visual.head.weight", "visual.proj"),
        ("text.token_embed.weight", f"{t}token_embedding.weight"),
        ("text.pos_embed", f"{t}positional_embedding"),
        ("text.norm.weight", f"{t}ln_final.weight"),
        ("text.norm.bias", f"{t}ln_final.bias"),
        ("text.head.weight", f"{t}text_projection"),
        ("logit_scale", "logit_scale"),
    ]
    if config.vision.pre_norm:
        pairs += [("visual.norm_pre.weight", "visual.ln_pre.weight"),
                  ("visual.norm_pre.bias", "visual.ln_pre.bias")]
    scalars = {"logit_scale"}
    if config.init_logit_bias is not None:
        pairs.append(("logit_bias", "logit_bias"))
        scalars.add("logit_bias")
    for i in range(config.vision.layers):
        pairs += _block_pairs(f"visual.transformer.blocks.{i}.",
                              f"visual.transformer.resblocks.{i}.")
    for i in range(config.text.layers):
        pairs += _block_pairs(f"text.transformer.blocks.{i}.", f"{t}transformer.resblocks.{i}.")
    return KeyMap(pairs=tuple(pairs),
                  transposed=frozenset({"visual.proj", f"{t}text_projection"}),
                  scalars=frozenset(scalars))


# -- configs --------------------------------------------------------------------------------------

def _check_fields(cfg: dict[str, Any], fixed: dict[str, tuple[Any, ...]], known: set[str],
                  where: str) -> None:
    for key, value in cfg.items():
        if key in fixed:
            if value not in fixed[key]:
                raise CheckpointError(f"{where}.{key}={value!r} is not supported (another "
                                      f"architecture); vlp reads only {fixed[key][0]!r}")
        elif key not in known:
            raise CheckpointError(f"{where}: unknown field {key!r}")


def _norm_eps(cfg: dict[str, Any], where: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise CheckpointError(f"{where}.norm_kwargs {kwargs} not supported; only 'eps'")
    return float(kwargs.get("eps", 1e-5))


def _square(value: Any, name: str, where: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}.{name}={value} is not square; vlp needs one size")
        value = value[0]
    return int(value)


def _vision_width(vision: dict[str, Any], where: str) -> int:
    """``vision_cfg.width``, which must split into heads of ``head_width``."""
    width = int(vision["width"])
    if width % int(vision["head_width"]):
        raise CheckpointError(f"{where}: vision_cfg.width {width} is not a multiple of "
                              f"head_width {vision['head_width']}")
    return width


def _special_ids(tokenizer: Tokenizer | None, vocab_size: int) -> tuple[int, int]:
    """(bos, eos): the tokenizer's, else open_clip's convention of the last two ids."""
    if tokenizer is not None:
        return tokenizer.bos_id, tokenizer.eos_id
    return vocab_size - 2, vocab_size - 1


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
    _check_fields(vision, VISION_FIXED, set(VISION_DEFAULTS) | VISION_IGNORED,
                  f"{where}: vision_cfg")
    _check_fields(text, TEXT_FIXED, set(TEXT_DEFAULTS) | TEXT_IGNORED, f"{where}: text_cfg")
    if vision["pool_type"] not in ("tok", "avg"):
        raise CheckpointError(f"{where}: vision_cfg.pool_type={vision['pool_type']!r}; "
                              "expected 'tok' or 'avg'")
    if vision["pool_type"] == "avg" and vision["final_ln_after_pool"]:
        raise CheckpointError(f"{where}: vision_cfg.final_ln_after_pool with 'avg' pooling is "
                              "not supported")
    if text["pool_type"] not in TEXT_POOLS:
        raise CheckpointError(f"{where}: text_cfg.pool_type={text['pool_type']!r}; expected one "
                              f"of {sorted(TEXT_POOLS)}")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vocab_size = int(text["vocab_size"])
    bos_id, eos_id = _special_ids(tokenizer, vocab_size)
    if text["pool_type"] == "eos":
        eos_id = int(text["eos_id"])  # the id the reference pools at
    width = _vision_width(vision, where)
    image_size = _square(vision["image_size"], "image_size", f"{where}: vision_cfg")
    pre = {**(preprocess_cfg or {})}
    resize_mode = pre.get("resize_mode", "shortest")
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"{where}: preprocess_cfg.resize_mode {resize_mode!r} not supported; "
                          f"expected one of {RESIZE_MODES}")
    interpolation = str(pre.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"{where}: preprocess_cfg.interpolation {interpolation!r} not "
                          f"supported; expected one of {sorted(INTERPOLATIONS)}")
    init_logit_bias = model_cfg.get("init_logit_bias")
    return ClipConfig(
        embed_dim=int(model_cfg["embed_dim"]),
        vision=VisionConfig(
            image_size=image_size,
            patch_size=_square(vision["patch_size"], "patch_size", f"{where}: vision_cfg"),
            width=width, layers=int(vision["layers"]), heads=width // int(vision["head_width"]),
            mlp_ratio=float(vision["mlp_ratio"]), act=act,
            norm_eps=_norm_eps(vision, f"{where}: vision_cfg"),
            pre_norm=not vision["no_ln_pre"],
            pool="cls" if vision["pool_type"] == "tok" else "mean",
            patch_dropout=float(vision["patch_dropout"]),
            mean=tuple(float(x) for x in pre.get("mean", OPENAI_MEAN)),
            std=tuple(float(x) for x in pre.get("std", OPENAI_STD)),
            resize_mode=resize_mode, interpolation=interpolation,
            pos_embed_antialias=True,
        ),
        text=TextConfig(
            vocab_size=vocab_size, context_length=int(text["context_length"]),
            width=int(text["width"]), layers=int(text["layers"]), heads=int(text["heads"]),
            mlp_ratio=float(text["mlp_ratio"]), act=act,
            norm_eps=_norm_eps(text, f"{where}: text_cfg"), causal=True,
            pool=TEXT_POOLS[text["pool_type"]], eos_fallback="first", mask_padding=False,
            pad_id=int(text["pad_id"]), bos_id=bos_id, eos_id=eos_id,
        ),
        init_logit_scale=float(model_cfg.get("init_logit_scale", 2.6592)),
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
        "image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
        "layers": vision.layers, "head_width": vision.width // vision.heads,
        "mlp_ratio": vision.mlp_ratio, "no_ln_pre": not vision.pre_norm,
        "pool_type": "tok" if vision.pool == "cls" else "avg",
        "patch_dropout": vision.patch_dropout,
    }
    text_cfg: dict[str, Any] = {
        "context_length": text.context_length, "vocab_size": text.vocab_size,
        "width": text.width, "heads": text.heads, "layers": text.layers,
        "mlp_ratio": text.mlp_ratio, "pad_id": text.pad_id, "eos_id": text.eos_id,
        "pool_type": text.pool,
    }
    for cfg, tower in ((vision_cfg, vision), (text_cfg, text)):
        if tower.norm_eps != 1e-5:
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
    preprocess_cfg = {"size": vision.image_size, "mode": "RGB", "mean": list(vision.mean),
                      "std": list(vision.std), "interpolation": vision.interpolation,
                      "resize_mode": vision.resize_mode, "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# -- directories ----------------------------------------------------------------------------------

def _locate(path: Path, config: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """(config file, weights file) for a directory or a weights file (+ explicit config)."""
    if path.is_dir():
        config_path = Path(config) if config is not None else path / CONFIG_FILE
        weights = next((path / n for n in WEIGHTS_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weights file; expected one of {list(WEIGHTS_FILES)}")
        return config_path, weights
    if path.is_file():
        if config is None:
            raise CheckpointError(f"{path}: a weights file needs its model config JSON "
                                  "(config=...)")
        return Path(config), path
    raise CheckpointError(f"{path}: open_clip checkpoint not found")


def _open_clip_tokenizer(tokenizer: TokenizerSource | None, directory: Path | None,
                         model_cfg: dict[str, Any], ctx: int, vocab_size: int
                         ) -> Tokenizer | None:
    """The user's tokenizer (HF directory, or a (vocab.json, merges.txt) pair), else tokenizer
    files beside the weights; padded like open_clip's tokenizer for that config."""
    if tokenizer is None:
        if directory is None:
            return None
        loaded = attach_tokenizer(directory, ctx, vocab_size)
        if loaded is None:
            return None
    elif isinstance(tokenizer, Tokenizer):
        loaded = tokenizer
    elif isinstance(tokenizer, list | tuple):
        vocab_file, merges_file = tokenizer
        loaded = clip_bpe_tokenizer(vocab_file, merges_file, context_length=ctx)
    else:
        loaded = load_tokenizer(tokenizer)
    pad_token = None
    if not (model_cfg["text_cfg"].get("hf_tokenizer_name")):
        # open_clip's SimpleTokenizer pads with text_cfg.pad_id (0), not with a pad token
        pad_id = int(model_cfg["text_cfg"].get("pad_id", TEXT_DEFAULTS["pad_id"]))
        pad_token = loaded.backend.id_to_token(pad_id)
        if pad_token is None:
            raise CheckpointError(f"text_cfg.pad_id {pad_id} is not in the tokenizer vocabulary")
    return fit_tokenizer(loaded, ctx, vocab_size, "tokenizer", pad_token=pad_token)


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
    path = Path(path)
    config_path, weights_path = _locate(path, config)
    raw = read_json(config_path)
    model_cfg = raw.get("model_cfg", raw)
    preprocess_cfg = raw.get("preprocess_cfg")
    if not isinstance(model_cfg, dict) or "text_cfg" not in model_cfg:
        raise CheckpointError(f"{config_path}: not an open_clip model config (no text_cfg)")
    text = {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    loaded_tokenizer = _open_clip_tokenizer(tokenizer, path if path.is_dir() else None,
                                            model_cfg, int(text["context_length"]),
                                            int(text["vocab_size"]))
    clip_config = clip_config_from_open_clip(model_cfg, str(config_path), preprocess_cfg,
                                             loaded_tokenizer)
    state = read_state_dict(weights_path)
    model = build_model(clip_config)
    import_into(open_clip_key_map(clip_config, bool(model_cfg.get("custom_text"))), state,
                model, str(weights_path))
    keep_loaded_logit_scale(model)
    if image_size is not None and image_size != clip_config.vision.image_size:
        model.visual.set_image_size(image_size)
    return ImportedModel(model.eval(), loaded_tokenizer)


def save_open_clip(model: nn.Module, directory: str | os.PathLike[str],
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write an open_clip local-dir: ``open_clip_config.json`` + ``open_clip_model.safetensors``
    (+ tokenizer files, named by ``hf_tokenizer_name``). open_clip loads it with
    ``create_model("local-dir:DIR")`` / ``get_tokenizer("local-dir:DIR")``, or, for a model
    config registered under NAME, ``create_model(NAME, pretrained=DIR/WEIGHTS_FILE)``. Atomic."""

    model = clip_model(model)
    config_json = open_clip_config_from_clip(model.config, tokenizer)
    tensors = export_from(open_clip_key_map(model.config), model)
    directory = Path(directory)
    refuse_foreign_directory(directory, CONFIG_FILE)
    with atomic_directory(directory) as staging:
        write_json(staging / CONFIG_FILE, config_json)
        save_tensors(tensors, staging / WEIGHTS_FILE)
        if tokenizer is not None:
            hf_readable(tokenizer).save(staging)
    return directory
