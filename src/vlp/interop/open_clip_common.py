"""What open_clip's CLIP and CoCa formats share: the local-dir files (``open_clip_config.json``
with ``model_cfg`` + ``preprocess_cfg``, or a bare model config beside a weights file), the
tokenizer found beside them, the ``vision_cfg`` / ``text_cfg`` / ``preprocess_cfg`` fields both
spell the same way, and the ViT / text-transformer layout of their state dicts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from vlp.config import OPENAI_MEAN, OPENAI_STD, TextConfig, VisionConfig
from vlp.data.transforms import INTERPOLATIONS, RESIZE_MODES
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import Pairs, linear_pairs
from vlp.interop.skeleton import (
    TokenizerSource,
    attach_tokenizer,
    fit_tokenizer,
    read_json,
    read_tokenizer,
)
from vlp.tokenizers import Tokenizer

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# weight files of an open_clip directory, in the order open_clip's own loader prefers them
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
DEFAULT_NORM_EPS = 1e-5  # open_clip's LayerNorm
DEFAULT_LOGIT_SCALE = 2.6592  # log(1 / 0.07)
TEXT_PAD_ID = 0  # text_cfg.pad_id default


# -- files ----------------------------------------------------------------------------------------

class OpenClipFiles(NamedTuple):
    directory: Path | None  # None for a weights file given with its config
    config_path: Path
    weights_path: Path
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any] | None


def locate_files(path: Path, config: str | os.PathLike[str] | None) -> tuple[Path, Path]:
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


def read_open_clip_files(path: str | os.PathLike[str], config: str | os.PathLike[str] | None,
                         required: str, what: str) -> OpenClipFiles:
    """An open_clip local-dir, or a weights file with its ``config``; the model config must hold
    ``required`` (else it is not ``what``)."""
    path = Path(path)
    config_path, weights_path = locate_files(path, config)
    raw = read_json(config_path)
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict) or required not in model_cfg:
        raise CheckpointError(f"{config_path}: not an open_clip {what} config (no {required})")
    return OpenClipFiles(path if path.is_dir() else None, config_path, weights_path, model_cfg,
                         raw.get("preprocess_cfg"))


def open_clip_tokenizer(tokenizer: TokenizerSource | None, directory: Path | None,
                        text: dict[str, Any]) -> Tokenizer | None:
    """The user's tokenizer (HF directory, or a (vocab.json, merges.txt) pair), else tokenizer
    files beside the weights; padded like open_clip's tokenizer for ``text`` (the text_cfg)."""
    ctx, vocab_size = int(text["context_length"]), int(text["vocab_size"])
    if tokenizer is None:
        if directory is None:
            return None
        loaded = attach_tokenizer(directory, ctx, vocab_size)
        if loaded is None:
            return None
    else:
        loaded = read_tokenizer(tokenizer, ctx)
    pad_token = None
    if not text.get("hf_tokenizer_name"):
        # open_clip's SimpleTokenizer pads with text_cfg.pad_id (0), not with a pad token
        pad_id = int(text.get("pad_id", TEXT_PAD_ID))
        pad_token = loaded.backend.id_to_token(pad_id)
        if pad_token is None:
            raise CheckpointError(f"text_cfg.pad_id {pad_id} is not in the tokenizer vocabulary")
    return fit_tokenizer(loaded, ctx, vocab_size, "tokenizer", pad_token=pad_token)


# -- configs: open_clip -> vlp --------------------------------------------------------------------

def check_fields(cfg: dict[str, Any], fixed: dict[str, tuple[Any, ...]], known: set[str],
                 where: str) -> None:
    """Every field of ``cfg`` known, and those in ``fixed`` at a value vlp reads."""
    for key, value in cfg.items():
        if key in fixed:
            if value not in fixed[key]:
                raise CheckpointError(f"{where}.{key}={value!r} is not supported (another "
                                      f"architecture); vlp reads only {fixed[key][0]!r}")
        elif key not in known:
            raise CheckpointError(f"{where}: unknown field {key!r}")


def norm_eps(cfg: dict[str, Any], where: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise CheckpointError(f"{where}.norm_kwargs {kwargs} not supported; only 'eps'")
    return float(kwargs.get("eps", DEFAULT_NORM_EPS))


def square(value: Any, name: str, where: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise CheckpointError(f"{where}.{name}={value} is not square; vlp needs one size")
        value = value[0]
    return int(value)


def activation(model_cfg: dict[str, Any]) -> str:
    return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"


def vision_fields(vision: dict[str, Any], act: str, where: str) -> dict[str, Any]:
    """The `VisionConfig` fields of a ViT ``vision_cfg`` (``where``: the file)."""
    width = int(vision["width"])
    if width % int(vision["head_width"]):
        raise CheckpointError(f"{where}: vision_cfg.width {width} is not a multiple of "
                              f"head_width {vision['head_width']}")
    return {"image_size": square(vision["image_size"], "image_size", f"{where}: vision_cfg"),
            "patch_size": square(vision["patch_size"], "patch_size", f"{where}: vision_cfg"),
            "width": width, "layers": int(vision["layers"]),
            "heads": width // int(vision["head_width"]), "mlp_ratio": float(vision["mlp_ratio"]),
            "act": act, "norm_eps": norm_eps(vision, f"{where}: vision_cfg"),
            "pre_norm": not vision["no_ln_pre"], "pos_embed_antialias": True}


def text_fields(text: dict[str, Any], act: str, where: str,
                tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The `TextConfig` fields of a causal ``text_cfg``; bos/eos are the tokenizer's, else
    OpenAI's BPE convention of the two highest ids."""
    vocab_size = int(text["vocab_size"])
    bos_id, eos_id = ((tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None
                      else (vocab_size - 2, vocab_size - 1))
    return {"vocab_size": vocab_size, "context_length": int(text["context_length"]),
            "width": int(text["width"]), "layers": int(text["layers"]),
            "heads": int(text["heads"]), "mlp_ratio": float(text["mlp_ratio"]), "act": act,
            "norm_eps": norm_eps(text, f"{where}: text_cfg"), "causal": True,
            "pad_id": int(text["pad_id"]), "bos_id": bos_id, "eos_id": eos_id}


def preprocess_fields(preprocess_cfg: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """The `VisionConfig` preprocessing fields of a ``preprocess_cfg`` (absent: OpenAI's)."""
    pre = preprocess_cfg or {}
    resize_mode = pre.get("resize_mode", "shortest")
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"{where}: preprocess_cfg.resize_mode {resize_mode!r} not supported; "
                          f"expected one of {RESIZE_MODES}")
    interpolation = str(pre.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"{where}: preprocess_cfg.interpolation {interpolation!r} not "
                          f"supported; expected one of {sorted(INTERPOLATIONS)}")
    return {"mean": tuple(float(x) for x in pre.get("mean", OPENAI_MEAN)),
            "std": tuple(float(x) for x in pre.get("std", OPENAI_STD)),
            "resize_mode": resize_mode, "interpolation": interpolation}


# -- configs: vlp -> open_clip --------------------------------------------------------------------

def vision_cfg_of(vision: VisionConfig) -> dict[str, Any]:
    return {"image_size": vision.image_size, "patch_size": vision.patch_size,
            "width": vision.width, "layers": vision.layers,
            "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio,
            "no_ln_pre": not vision.pre_norm}


def text_cfg_of(text: TextConfig) -> dict[str, Any]:
    return {"context_length": text.context_length, "vocab_size": text.vocab_size,
            "width": text.width, "heads": text.heads, "layers": text.layers,
            "mlp_ratio": text.mlp_ratio, "pad_id": text.pad_id}


def preprocess_cfg_of(vision: VisionConfig) -> dict[str, Any]:
    return {"size": vision.image_size, "mode": "RGB", "mean": list(vision.mean),
            "std": list(vision.std), "interpolation": vision.interpolation,
            "resize_mode": vision.resize_mode, "fill_color": 0}


# -- key maps -------------------------------------------------------------------------------------

def resblock_pairs(ours: str, theirs: str) -> Pairs:
    """One open_clip ``ResidualAttentionBlock`` <-> a vlp transformer block."""
    pairs = [(f"{ours}attn.qkv.{p}", f"{theirs}attn.in_proj_{p}")  # nn.MultiheadAttention's
             for p in ("weight", "bias")]                           # packed q|k|v
    for a, b in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        pairs += linear_pairs(ours + a, theirs + b)
    return pairs


def vit_pairs(vision: VisionConfig) -> Pairs:
    """open_clip's ``visual.`` ViT up to its last block (``ln_post`` and ``proj`` differ)."""
    pairs = [("visual.class_token", "visual.class_embedding"),
             ("visual.patch_embed.weight", "visual.conv1.weight"),
             ("visual.pos_embed", "visual.positional_embedding")]
    if vision.pre_norm:
        pairs += linear_pairs("visual.norm_pre", "visual.ln_pre")
    for i in range(vision.layers):
        pairs += resblock_pairs(f"visual.transformer.blocks.{i}.",
                                f"visual.transformer.resblocks.{i}.")
    return pairs


def text_tower_pairs(theirs: str, layers: int) -> Pairs:
    """open_clip's text transformer under ``theirs`` <-> vlp ``text.``; its
    ``text_projection`` is an ``[in, out]`` matrix (transposed)."""
    pairs = [("text.token_embed.weight", f"{theirs}token_embedding.weight"),
             ("text.pos_embed", f"{theirs}positional_embedding"),
             ("text.head.weight", f"{theirs}text_projection")]
    pairs += linear_pairs("text.norm", f"{theirs}ln_final")
    for i in range(layers):
        pairs += resblock_pairs(f"text.transformer.blocks.{i}.",
                                f"{theirs}transformer.resblocks.{i}.")
    return pairs
