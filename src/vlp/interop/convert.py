"""`convert`: move a CLIP between vlp, HF transformers and open_clip directory formats.

The source format is always given, never guessed from the files. The model is read and checked
completely before anything is written, and the target directory appears atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlp.errors import ConfigError
from vlp.interop.hf import load_hf, save_hf
from vlp.interop.keymap import ImportedModel, TokenizerSource, attach_tokenizer, fit_tokenizer
from vlp.interop.open_clip import load_open_clip, save_open_clip
from vlp.tokenizers import Tokenizer, clip_bpe_tokenizer, load_tokenizer

FORMATS = ("hf", "open_clip", "vlp")


def _read_tokenizer(source: TokenizerSource, context_length: int) -> Tokenizer:
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, list | tuple):
        vocab_file, merges_file = source
        return clip_bpe_tokenizer(vocab_file, merges_file, context_length=context_length)
    return load_tokenizer(source)


def load_vlp(path: str | os.PathLike[str], *, image_size: int | None = None) -> ImportedModel:
    """A vlp model directory (config.json + model.safetensors) with its tokenizer, if any."""
    from vlp.train.checkpoint import load_pretrained

    model = load_pretrained(path)
    text = model.config.text
    tokenizer = attach_tokenizer(Path(path), text.context_length, text.vocab_size)
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
    """Read ``src`` in ``src_format`` ("hf", "open_clip" or "vlp") as a vlp CLIP + tokenizer."""
    if src_format not in FORMATS:
        raise ConfigError(f"source format {src_format!r}; expected one of {list(FORMATS)}")
    if config is not None and src_format != "open_clip":
        raise ConfigError("config= names an open_clip model config; only for src_format "
                          "'open_clip'")
    if src_format == "open_clip":
        return load_open_clip(src, config=config, tokenizer=tokenizer, image_size=image_size)
    imported = (load_hf(src, image_size=image_size) if src_format == "hf"
                else load_vlp(src, image_size=image_size))
    if tokenizer is None:
        return imported
    text = imported.model.config.text
    chosen = fit_tokenizer(_read_tokenizer(tokenizer, text.context_length),
                           text.context_length, text.vocab_size, str(tokenizer))
    return ImportedModel(imported.model, chosen)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    src_format: str,
    dst_format: str,
    *,
    tokenizer: TokenizerSource | None = None,
    image_size: int | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert the CLIP at ``src`` (``src_format``) into a ``dst_format`` directory at ``dst``
    that the target library loads with its own API; returns ``dst``.

    ``tokenizer``: a tokenizer directory/file or a ``(vocab.json, merges.txt)`` pair used instead
    of the files found beside the weights. ``image_size``: serve another input size by
    interpolating the position embeddings. ``config``: the open_clip model config JSON when
    ``src`` is an open_clip weights file.
    """
    if dst_format not in FORMATS:
        raise ConfigError(f"target format {dst_format!r}; expected one of {list(FORMATS)}")
    model, loaded_tokenizer = load_any(src, src_format, tokenizer=tokenizer,
                                       image_size=image_size, config=config)
    if dst_format == "hf":
        return save_hf(model, dst, loaded_tokenizer)
    if dst_format == "open_clip":
        return save_open_clip(model, dst, loaded_tokenizer)
    from vlp.train.checkpoint import save_pretrained

    return save_pretrained(model, dst, loaded_tokenizer)
