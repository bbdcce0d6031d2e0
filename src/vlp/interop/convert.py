"""`convert`: move a model between vlp, HF transformers, open_clip and original BLIP/LAVIS.

CLIP: vlp <-> hf <-> open_clip; SigLIP: vlp <-> hf <-> open_clip (a timm ViT image tower).
CoCa: vlp <-> open_clip. BLIP: vlp <-> hf (one HF task class per directory) and the original
BLIP / LAVIS checkpoint file ("lavis") -> vlp / hf, vlp -> lavis. BLIP-2 and the GPT-2-shaped
language model (lm): vlp <-> hf. The source format is always given, never guessed from the
files; an HF directory's declared ``model_type`` and an open_clip config's towers pick the
family. The model is read and checked completely before anything is written, and the target
appears atomically."""

from __future__ import annotations

import os
from pathlib import Path

from vlp import factory
from vlp.errors import ConfigError
from vlp.interop.hf import load_hf, save_hf
from vlp.interop.hf_blip import load_hf_blip, save_hf_blip
from vlp.interop.hf_blip2 import load_hf_blip2, save_hf_blip2
from vlp.interop.hf_common import CONFIG_FILE
from vlp.interop.hf_gpt2 import load_hf_gpt2, save_hf_gpt2
from vlp.interop.hf_siglip import is_siglip, load_hf_siglip, save_hf_siglip
from vlp.interop.lavis_blip import load_lavis_blip, save_lavis_blip
from vlp.interop.open_clip import load_open_clip, save_open_clip
from vlp.interop.open_clip_coca import load_open_clip_coca, save_open_clip_coca
from vlp.interop.open_clip_common import locate_files
from vlp.interop.open_clip_siglip import (
    is_timm_tower,
    load_open_clip_siglip,
    save_open_clip_siglip,
)
from vlp.interop.skeleton import (
    ImportedModel,
    TokenizerSource,
    attach_tokenizer,
    fit_tokenizer,
    read_json,
    read_tokenizer,
)
from vlp.models.blip import BLIP
from vlp.models.blip2 import BLIP2
from vlp.models.clip import CLIP
from vlp.models.coca import CoCa
from vlp.models.lm import CausalLM
from vlp.store import model_dir

FORMATS = ("hf", "lavis", "open_clip", "vlp")
CONFIG_FORMATS = ("lavis", "open_clip")  # formats whose weights need a config= beside them


def load_vlp(path: str | os.PathLike[str], *, image_size: int | None = None) -> ImportedModel:
    """A vlp model directory (config.json + model.safetensors) with its tokenizer, if any."""

    model = factory.load(path)
    text = model.config.text
    tokenizer = attach_tokenizer(model_dir(path), text.context_length, text.vocab_size)
    if image_size is not None and image_size != model.config.vision.image_size:
        model.visual.set_image_size(image_size)
    return ImportedModel(model.eval(), tokenizer)


def load_any(
    src: str | os.PathLike[str],
    src_format: str,
    *,
    tokenizer: TokenizerSource | None = None,
    image_size: int | None = None,
    config: str | os.PathLike[str] | None = None,
) -> ImportedModel:
    """Read ``src`` in ``src_format`` (one of FORMATS) as a vlp model + tokenizer."""
    if src_format not in FORMATS:
        raise ConfigError(f"source format {src_format!r}; expected one of {list(FORMATS)}")
    if config is not None and src_format not in CONFIG_FORMATS:
        raise ConfigError(f"config= is for src_format {list(CONFIG_FORMATS)} (an open_clip "
                          "model config JSON; a vlp BLIP preset or config JSON for lavis)")
    if src_format == "open_clip":
        kind = _open_clip_kind(src, config)
        if kind != "clip" and image_size is not None:
            raise ConfigError(f"image_size= is not supported for open_clip {kind} models")
        if kind == "CoCa":
            return load_open_clip_coca(src, config=config, tokenizer=tokenizer)
        if kind == "SigLIP":
            return load_open_clip_siglip(src, config=config, tokenizer=tokenizer)
        return load_open_clip(src, config=config, tokenizer=tokenizer, image_size=image_size)
    if src_format == "lavis":
        imported = load_lavis_blip(src, config=config, image_size=image_size)
    elif src_format == "hf":
        model_type = _hf_model_type(src)
        if model_type == "blip-2":
            if image_size is not None:
                raise ConfigError("image_size= is not supported for HF BLIP-2 directories")
            imported = load_hf_blip2(src)
        elif model_type == "siglip":
            if image_size is not None:
                raise ConfigError("image_size= is not supported for HF SigLIP directories")
            imported = load_hf_siglip(src)
        elif model_type == "gpt2":
            if image_size is not None:
                raise ConfigError("image_size= is for image models; a GPT-2 reads text alone")
            imported = load_hf_gpt2(src)
        else:
            imported = (load_hf_blip(src, image_size=image_size) if model_type == "blip"
                        else load_hf(src, image_size=image_size))
    else:
        imported = load_vlp(src, image_size=image_size)
    if tokenizer is None:
        return imported
    text = imported.model.config.text
    chosen = fit_tokenizer(read_tokenizer(tokenizer, text.context_length),
                           text.context_length, text.vocab_size, str(tokenizer))
    return ImportedModel(imported.model, chosen)


def _open_clip_kind(src: str | os.PathLike[str], config: str | os.PathLike[str] | None) -> str:
    """"CoCa", "SigLIP" (a timm image tower) or "clip", from the model config's towers."""
    config_path, _ = locate_files(Path(src), config)
    raw = read_json(config_path)
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict):
        return "clip"  # the CLIP reader names what is wrong
    if "multimodal_cfg" in model_cfg:
        return "CoCa"
    return "SigLIP" if is_timm_tower(model_cfg) else "clip"


def _hf_model_type(src: str | os.PathLike[str]) -> object:
    path = Path(src) / CONFIG_FILE
    return read_json(path).get("model_type") if path.is_file() else None


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    src_format: str,
    dst_format: str,
    *,
    tokenizer: TokenizerSource | None = None,
    image_size: int | None = None,
    config: str | os.PathLike[str] | None = None,
    architecture: str | None = None,
) -> Path:
    """Convert the model at ``src`` (``src_format``) into ``dst_format`` at ``dst`` (a directory;
    a ``.pth``/``.safetensors`` file for "lavis") that the target library loads with its own
    API; returns ``dst``.

    ``tokenizer``: a tokenizer directory/file or a ``(vocab.json, merges.txt)`` pair used instead
    of the files found beside the weights. ``image_size``: serve another input size by
    interpolating the position embeddings. ``config``: the open_clip model config JSON when
    ``src`` is an open_clip weights file; for "lavis", a vlp BLIP preset name or config JSON
    giving the attention heads and token ids. ``architecture``: the HF BLIP class to write
    (e.g. the captioner of a pretrained BLIP); default the one holding exactly the model's parts.
    For an open_clip SigLIP, the timm model name of its image tower; default the registered timm
    SigLIP ViT of the model's vision shape.
    """
    if dst_format not in FORMATS:
        raise ConfigError(f"target format {dst_format!r}; expected one of {list(FORMATS)}")
    if architecture is not None and dst_format not in ("hf", "open_clip"):
        raise ConfigError("architecture= names an HF BLIP class (dst_format 'hf') or the timm "
                          "image tower of an open_clip SigLIP (dst_format 'open_clip')")
    model, loaded_tokenizer = load_any(src, src_format, tokenizer=tokenizer,
                                       image_size=image_size, config=config)
    if dst_format == "hf" and isinstance(model, BLIP2):
        if architecture is not None:
            raise ConfigError("architecture= is for BLIP models; a BLIP-2 is written as the "
                              "HF class holding its parts")
        return save_hf_blip2(model, dst)
    if dst_format == "hf" and isinstance(model, CausalLM):
        if architecture is not None:
            raise ConfigError("architecture= is for BLIP models; an lm is GPT2LMHeadModel")
        return save_hf_gpt2(model, dst, loaded_tokenizer)
    if dst_format == "hf" and isinstance(model, BLIP):
        return save_hf_blip(model, dst, loaded_tokenizer, architecture=architecture)
    if dst_format == "hf":
        if architecture is not None:
            raise ConfigError("architecture= is for BLIP models; an HF CLIP is CLIPModel")
        if isinstance(model, CLIP) and is_siglip(model.config):
            return save_hf_siglip(model, dst, loaded_tokenizer)
        return save_hf(model, dst, loaded_tokenizer)
    if dst_format == "open_clip" and isinstance(model, CLIP) and is_siglip(model.config):
        return save_open_clip_siglip(model, dst, loaded_tokenizer, architecture)
    if dst_format == "open_clip" and architecture is not None:
        raise ConfigError("architecture= names the timm image tower of an open_clip SigLIP; "
                          "this model is not SigLIP-shaped")
    if dst_format == "open_clip" and isinstance(model, CoCa):
        return save_open_clip_coca(model, dst)
    if dst_format == "open_clip":
        return save_open_clip(model, dst, loaded_tokenizer)
    if dst_format == "lavis":
        return save_lavis_blip(model, dst)

    return factory.save(model, dst, loaded_tokenizer)
