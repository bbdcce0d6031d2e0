"""open_clip SigLIP (a timm ViT image tower + open_clip's text transformer) <-> vlp CLIP with
SigLIP's config switches.

open_clip's SigLIP configs (``ViT-B-16-SigLIP``, ``ViT-SO400M-14-SigLIP``, the SigLIP 2 ones)
name their image tower by a timm architecture (``vision_cfg.timm_model_name``, with
``timm_pool: "map"`` and ``timm_proj: "none"``); the name alone fixes its shape. timm (installed
with open_clip) is asked what the name builds, on the meta device (no memory, no weights), and
the trunk is accepted only when it is a plain ViT vlp builds the same way: patch conv with bias,
learned positions and no class or register token, pre-norm blocks (no layer scale, no q/k
norm), a final norm, then the MAP attention pool (one latent). Anything else is refused naming
the field. The text tower is open_clip's ``TextTransformer`` without a causal mask, pooled at
the last position, its ``text_projection`` a linear layer with bias (``proj_bias``); the
sigmoid head's ``logit_scale`` and ``logit_bias`` come along.

Export writes the same layout (``open_clip_config.json`` with a timm ``vision_cfg`` +
``open_clip_model.safetensors``), naming the timm architecture of the model's vision shape:
the one given, else the first registered timm SigLIP ViT that builds exactly that shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.config import ClipConfig, TextConfig, VisionConfig
from vlp.data.transforms import RESIZE_MODES
from vlp.errors import CheckpointError, ConfigError, require_extra
from vlp.interop.keymap import KeyMap, Pairs, export_from, linear_pairs
from vlp.interop.open_clip import (
    EXPORTED_TOKENIZER_NAME,
    TEXT_DEFAULTS,
    TEXT_FIXED,
    TEXT_IGNORED,
    TOP_LEVEL,
    VISION_DEFAULTS,
    VISION_FIXED,
    VISION_IGNORED,
)
from vlp.interop.open_clip_common import (
    CONFIG_FILE,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_NORM_EPS,
    WEIGHTS_FILE,
    check_fields,
    open_clip_tokenizer,
    preprocess_cfg_of,
    preprocess_fields,
    read_open_clip_files,
    text_cfg_of,
    text_fields,
    text_tower_pairs,
)
from vlp.interop.skeleton import (
    ImportedModel,
    TokenizerSource,
    family_model,
    hf_readable,
    import_model,
    mlp_ratio,
    write_directory,
)
from vlp.models.clip import CLIP
from vlp.store import read_state_dict
from vlp.tokenizers import Tokenizer

TRUNK = "visual.trunk."
LINEAR = ("weight", "bias")
BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
POOL_PARTS = ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")
# keys of timm ViTs vlp's ViT has no place for, and what they are
FOREIGN_KEYS = {"cls_token": "a class token", "reg_token": "register tokens",
                "norm_pre": "a pre-norm (norm_pre)", "fc_norm": "a norm after pooling (fc_norm)",
                "ls1": "layer scale", "q_norm": "q/k norms", "attn.norm": "a scaled attention norm",
                "patch_embed.norm": "a patch-embedding norm", "attn_pool.pos_embed":
                "a positional MAP head"}
# vision_cfg fields that hold for timm towers (the ViT fields are overridden by the timm name)
VISION_KNOWN = set(VISION_DEFAULTS) | set(VISION_FIXED) | VISION_IGNORED
TEXT_SIGLIP_FIXED: dict[str, tuple[Any, ...]] = {
    **TEXT_FIXED, "no_causal_mask": (True,), "proj_bias": (True, False),
    "act_kwargs": (None, {}, {"approximate": "tanh"}), "final_ln_after_pool": (False,),
}
ACTS = {"none": "gelu", "tanh": "gelu_tanh"}  # nn.GELU(approximate=...) -> vlp act


# -- timm -----------------------------------------------------------------------------------------

def _timm() -> Any:
    return require_extra("timm", "interop", "an open_clip model with a timm image tower "
                         "(vision_cfg.timm_model_name)")


def timm_trunk(name: str, field: str) -> nn.Module:
    """The timm trunk open_clip builds for ``name`` with the MAP pool and no classifier, on the
    meta device; CheckpointError naming ``field`` unless it is a timm ``VisionTransformer``."""
    timm = _timm()
    if not isinstance(name, str) or not timm.is_model(name):
        raise CheckpointError(f"{field} is not a timm architecture (timm {timm.__version__})")
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        try:
            trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="map")
        except Exception:  # no MAP pool in this family: built as it is, to name it
            trunk = timm.create_model(name, pretrained=False, num_classes=0)
    if type(trunk) is not VisionTransformer:
        raise CheckpointError(f"{field} is a timm {type(trunk).__name__}, not a plain ViT "
                              "(VisionTransformer); vlp reads SigLIP's ViT towers")
    return trunk


def _expected_trunk_keys(layers: int) -> set[str]:
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "attn_pool.latent"}
    keys |= {f"attn_pool.{part}.{p}" for part in POOL_PARTS for p in LINEAR}
    keys |= {f"blocks.{i}.{part}.{p}" for i in range(layers) for part in BLOCK_PARTS
             for p in LINEAR}
    return keys


def _activation(modules: list[nn.Module], field: str) -> str:
    acts = set()
    for module in modules:
        if type(module) is not nn.GELU or module.approximate not in ACTS:
            raise CheckpointError(f"{field}: MLP activation {module!r}; vlp reads GELU (exact "
                                  "or tanh)")
        acts.add(ACTS[module.approximate])
    if len(acts) != 1:
        raise CheckpointError(f"{field}: MLP activations differ between blocks ({sorted(acts)})")
    return acts.pop()


def trunk_vision_fields(trunk: nn.Module, field: str) -> dict[str, Any]:
    """The `VisionConfig` fields of a timm ViT trunk (built with the MAP pool); CheckpointError
    naming ``field`` when it is not one vlp's ViT + MapHead reproduce."""
    from timm.layers import AttentionPoolLatent, Mlp
    from timm.models.vision_transformer import Attention, Block

    layers = len(trunk.blocks)
    keys = set(trunk.state_dict())
    expected = _expected_trunk_keys(layers)
    extra = sorted(keys - expected)
    if extra:
        what = next((desc for part, desc in FOREIGN_KEYS.items() if part in extra[0]),
                    "a part vlp's ViT lacks")
        raise CheckpointError(f"{field} has {what} ({extra[0]!r}); vlp reads plain ViTs "
                              "(no class token, pre-norm blocks, final norm, MAP head)")
    missing = sorted(expected - keys)
    if missing:
        raise CheckpointError(f"{field} has no {missing[0]!r}; vlp reads plain ViTs with "
                              "learned positions, a patch conv with bias and a MAP head")
    blocks = list(trunk.blocks)
    if any(type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp
           for b in blocks):
        raise CheckpointError(f"{field}: its blocks are not timm's pre-norm Block with "
                              "Attention and Mlp; vlp reads plain ViT blocks")
    pool = trunk.attn_pool
    heads = blocks[0].attn.num_heads
    if (type(pool) is not AttentionPoolLatent or type(pool.mlp) is not Mlp
            or pool.latent.shape[1] != 1 or pool.pool != "token"):
        raise CheckpointError(f"{field}: its attention pool is not one latent read as a token "
                              "(vlp's MAP head)")
    if {b.attn.num_heads for b in blocks} | {pool.num_heads} != {heads}:
        raise CheckpointError(f"{field}: head counts differ between blocks and the MAP head")
    width = int(trunk.embed_dim)
    hidden = {b.mlp.fc1.out_features for b in blocks} | {pool.mlp.fc1.out_features}
    if len(hidden) != 1:
        raise CheckpointError(f"{field}: MLP widths differ between blocks and the MAP head")
    eps = {m.eps for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise CheckpointError(f"{field}: LayerNorm eps differ ({sorted(eps)})")
    image, patch = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
    if len(set(image)) != 1 or len(set(patch)) != 1:
        raise CheckpointError(f"{field}: image size {image} / patch size {patch} not square")
    return {"image_size": int(image[0]), "patch_size": int(patch[0]), "width": width,
            "layers": layers, "heads": int(heads),
            "mlp_ratio": mlp_ratio(width, hidden.pop(), field),
            "act": _activation([m.mlp.act for m in [*blocks, pool]], field),
            "norm_eps": float(eps.pop()), "pre_norm": False, "class_token": False,
            "pool": "map", "patch_bias": True}


# -- key map --------------------------------------------------------------------------------------

def siglip_open_clip_key_map(config: ClipConfig) -> KeyMap:
    """vlp CLIP (SigLIP switches) <-> open_clip ``CustomTextCLIP`` with a timm ViT trunk."""
    pairs: Pairs = [("visual.pos_embed", TRUNK + "pos_embed"),
                    *linear_pairs("visual.patch_embed", TRUNK + "patch_embed.proj"),
                    *linear_pairs("visual.norm", TRUNK + "norm"),
                    ("visual.map_head.probe", TRUNK + "attn_pool.latent")]
    for i in range(config.vision.layers):
        for part in BLOCK_PARTS:
            pairs += linear_pairs(f"visual.transformer.blocks.{i}.{part}",
                                  f"{TRUNK}blocks.{i}.{part}")
    for ours, theirs in (("attn.q", "q"), ("attn.kv", "kv"), ("attn.proj", "proj"),
                         ("norm", "norm"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        pairs += linear_pairs(f"visual.map_head.{ours}", f"{TRUNK}attn_pool.{theirs}")
    text = text_tower_pairs("text.", config.text.layers)
    transposed = frozenset()
    if config.proj_bias:  # a Linear: [out, in] weight and a bias
        text = [p for p in text if p[0] != "text.head.weight"]
        text += linear_pairs("text.head", "text.text_projection")
    else:  # a bare [in, out] matrix
        transposed = frozenset({"text.text_projection"})
    pairs += [*text, ("logit_scale", "logit_scale"), ("logit_bias", "logit_bias")]
    return KeyMap(pairs=tuple(pairs), transposed=transposed,
                  padded=((TRUNK + "pos_embed", 3), (TRUNK + "attn_pool.latent", 3)),
                  scalars=frozenset({"logit_scale", "logit_bias"}))


# -- configs --------------------------------------------------------------------------------------

def is_timm_tower(model_cfg: dict[str, Any]) -> bool:
    """An open_clip model config whose image tower is a timm model."""
    vision = model_cfg.get("vision_cfg")
    return isinstance(vision, dict) and bool(vision.get("timm_model_name"))


def siglip_config_from_open_clip(model_cfg: dict[str, Any], where: str = CONFIG_FILE,
                                 preprocess_cfg: dict[str, Any] | None = None,
                                 tokenizer: Tokenizer | None = None) -> ClipConfig:
    """vlp `ClipConfig` (SigLIP switches) for an open_clip SigLIP model config."""
    unknown = sorted(set(model_cfg) - TOP_LEVEL)
    if unknown:
        raise CheckpointError(f"{where}: {unknown[0]!r} is not supported (unknown architecture: "
                              "vlp reads open_clip SigLIP with a timm ViT image tower)")
    vision, text = model_cfg["vision_cfg"], {**TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    for key in vision:
        if key not in VISION_KNOWN:
            raise CheckpointError(f"{where}: vision_cfg: unknown field {key!r}")
    for key, wanted in (("timm_pool", "map"), ("timm_proj", "none")):
        if vision.get(key) != wanted:
            raise CheckpointError(f"{where}: vision_cfg.{key}={vision.get(key)!r} is not "
                                  f"supported; vlp reads SigLIP's timm towers ({key} {wanted!r})")
    name = vision["timm_model_name"]
    field = f"{where}: vision_cfg.timm_model_name={name!r}"
    fields = trunk_vision_fields(timm_trunk(name, field), field)
    size = vision.get("image_size", fields["image_size"])
    if size not in (fields["image_size"], [fields["image_size"]] * 2):
        raise CheckpointError(f"{where}: vision_cfg.image_size={size!r} differs from the "
                              f"{fields['image_size']} {name!r} is built for")
    check_fields(text, TEXT_SIGLIP_FIXED, set(TEXT_DEFAULTS) | TEXT_IGNORED, f"{where}: text_cfg")
    if text["pool_type"] != "last":
        raise CheckpointError(f"{where}: text_cfg.pool_type={text['pool_type']!r}; vlp reads "
                              "SigLIP's 'last'")
    embed_dim = int(model_cfg["embed_dim"])
    if embed_dim != fields["width"]:
        raise CheckpointError(f"{where}: embed_dim {embed_dim} differs from the width "
                              f"{fields['width']} of {name!r} (timm_proj 'none' adds no "
                              "projection)")
    act = ("quick_gelu" if model_cfg.get("quick_gelu") else
           "gelu_tanh" if (text.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu")
    text_settings = {**text_fields(text, act, where, tokenizer), "causal": False}
    if tokenizer is not None:
        text_settings["pad_id"] = tokenizer.pad_id
    bias = model_cfg.get("init_logit_bias")
    return ClipConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(**fields, **preprocess_fields(preprocess_cfg, where)),
        text=TextConfig(**text_settings, pool="last", padding="none"),
        init_logit_scale=float(model_cfg.get("init_logit_scale", DEFAULT_LOGIT_SCALE)),
        init_logit_bias=-10.0 if bias is None else float(bias), loss="siglip",
        proj_bias=bool(text["proj_bias"]), image_proj=False)


def _shape_of(vision: VisionConfig) -> dict[str, Any]:
    return {"image_size": vision.image_size, "patch_size": vision.patch_size,
            "width": vision.width, "layers": vision.layers, "heads": vision.heads,
            "mlp_hidden": int(vision.width * vision.mlp_ratio), "act": vision.act,
            "norm_eps": vision.norm_eps}


def _trunk_shape(name: str, field: str) -> dict[str, Any]:
    fields = trunk_vision_fields(timm_trunk(name, field), field)
    return _shape_of(VisionConfig(**fields))


def timm_name_for(vision: VisionConfig, name: str | None = None) -> str:
    """The timm architecture that builds ``vision``: ``name`` checked, else the first timm
    SigLIP ViT of that shape (non-"gap" names first). ConfigError when none does."""
    want = _shape_of(vision)
    if name is not None:
        try:
            got = _trunk_shape(name, f"architecture={name!r}")
        except CheckpointError as error:
            raise ConfigError(str(error)) from error
        wrong = [f"{k} {got[k]} (model: {want[k]})" for k in want if got[k] != want[k]]
        if wrong:
            raise ConfigError(f"architecture={name!r} does not build this vision tower: "
                              f"{'; '.join(wrong)}")
        return name
    pattern = f"*patch{vision.patch_size}*siglip*_{vision.image_size}"
    for candidate in sorted(_timm().list_models(pattern),
                            key=lambda n: ("_gap_" in n, len(n), n)):
        try:
            if _trunk_shape(candidate, f"timm model {candidate!r}") == want:
                return candidate
        except CheckpointError:
            continue
    shape = ", ".join(f"{k} {v}" for k, v in want.items())
    raise ConfigError(f"no timm SigLIP architecture builds this vision tower ({shape}); name "
                      "a registered timm model that does with architecture=")


def open_clip_config_from_siglip(config: ClipConfig, tokenizer: Tokenizer | None = None,
                                 timm_model_name: str | None = None) -> dict[str, Any]:
    """open_clip ``open_clip_config.json`` for a vlp SigLIP: a timm ViT ``vision_cfg``."""
    vision, text = config.vision, config.text
    problems = []
    if config.init_logit_bias is None:
        problems.append("a logit_bias (init_logit_bias)")
    if vision.pre_norm or not vision.patch_bias or vision.class_token:
        problems.append("vision.pre_norm=True, patch_bias=False or a class token")
    if text.causal or text.pool != "last" or text.padding != "none":
        problems.append("a text tower other than bidirectional, padding 'none', pool 'last'")
    if text.act not in ("gelu", "gelu_tanh", "quick_gelu"):
        problems.append(f"text.act={text.act!r}")
    if vision.resize_mode not in RESIZE_MODES:
        problems.append(f"vision.resize_mode={vision.resize_mode!r}")
    if problems:
        raise ConfigError(f"this vlp SigLIP cannot be written as open_clip SigLIP: "
                          f"{'; '.join(problems)}")
    text_cfg: dict[str, Any] = {**text_cfg_of(text), "no_causal_mask": True,
                                "proj_bias": config.proj_bias, "pool_type": "last"}
    if text.norm_eps != DEFAULT_NORM_EPS:
        text_cfg["norm_kwargs"] = {"eps": text.norm_eps}
    if text.act == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    if tokenizer is not None:
        text_cfg["hf_tokenizer_name"] = EXPORTED_TOKENIZER_NAME
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim, "init_logit_bias": config.init_logit_bias,
        "init_logit_scale": config.init_logit_scale, "custom_text": True,
        "quick_gelu": text.act == "quick_gelu",
        "vision_cfg": {"image_size": vision.image_size,
                       "timm_model_name": timm_name_for(vision, timm_model_name),
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": text_cfg,
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg_of(vision)}


# -- directories ----------------------------------------------------------------------------------

def load_open_clip_siglip(path: str | os.PathLike[str], *,
                          config: str | os.PathLike[str] | None = None,
                          tokenizer: TokenizerSource | None = None) -> ImportedModel:
    """A vlp CLIP with SigLIP's towers from open_clip SigLIP weights: a local-dir / hub snapshot
    (``open_clip_config.json`` + weights) or a weights file with ``config``."""
    files = read_open_clip_files(path, config, "vision_cfg", "SigLIP")
    model_cfg = files.model_cfg
    if not isinstance(model_cfg.get("text_cfg"), dict):
        raise CheckpointError(f"{files.config_path}: not an open_clip SigLIP config (no "
                              "text_cfg)")
    loaded_tokenizer = open_clip_tokenizer(tokenizer, files.directory,
                                           {**TEXT_DEFAULTS, **model_cfg["text_cfg"]})
    clip_config = siglip_config_from_open_clip(model_cfg, str(files.config_path),
                                               files.preprocess_cfg, loaded_tokenizer)
    model = import_model(clip_config, read_state_dict(files.weights_path),
                         str(files.weights_path), siglip_open_clip_key_map(clip_config),
                         unclamped_logit_scale=True)
    return ImportedModel(model, loaded_tokenizer)


def save_open_clip_siglip(model: nn.Module, directory: str | os.PathLike[str],
                          tokenizer: Tokenizer | None = None,
                          timm_model_name: str | None = None) -> Path:
    """Write an open_clip local-dir of a vlp SigLIP (``open_clip_config.json`` naming the timm
    image tower + ``open_clip_model.safetensors`` + tokenizer files) that
    ``open_clip.create_model("local-dir:DIR")`` loads. Atomic."""
    model = family_model(model, CLIP, "open_clip SigLIP")
    config_json = open_clip_config_from_siglip(model.config, tokenizer, timm_model_name)
    tensors = export_from(siglip_open_clip_key_map(model.config), model)
    return write_directory(directory, {CONFIG_FILE: config_json, WEIGHTS_FILE: tensors},
                           None if tokenizer is None else hf_readable(tokenizer))
