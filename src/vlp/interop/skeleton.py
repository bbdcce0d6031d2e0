"""The one path every interop format takes; a format module supplies only what differs (its key
map, its config translation, its file names).

Import: translate the reference config -> build the vlp model -> map the reference state dict
onto it with the format's `KeyMap`, every key, dtype and shape checked before one tensor is
copied (`import_model`). Export: check the family -> translate the config -> the `KeyMap` gives
the reference state dict -> write the files atomically, fsynced, through
`vlp.store.atomic_directory` (`write_directory`) or `vlp.store.atomic_write`; a directory
replaces only an empty one or one of the same format, never user data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from torch import Tensor, nn

from vlp.contract import unwrap_model
from vlp.errors import CheckpointError, ConfigError
from vlp.interop.keymap import KeyMap, import_into
from vlp.models import build_model
from vlp.store import atomic_directory, read_json_object, write_json, write_safetensors
from vlp.tokenizers import Tokenizer, clip_bpe_tokenizer, load_tokenizer

# a tokenizer, a tokenizer directory / tokenizer.json, or a CLIP (vocab.json, merges.txt) pair
TokenizerSource = str | os.PathLike[str] | tuple[str | os.PathLike[str], ...] | Tokenizer
M = TypeVar("M", bound=nn.Module)


class ImportedModel(NamedTuple):
    """A model converted from a reference library, with the tokenizer it shipped with."""

    model: nn.Module
    tokenizer: Tokenizer | None


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


# -- import ---------------------------------------------------------------------------------------

def import_model(config: Any, state: Mapping[str, Tensor], source: str,
                 key_map: KeyMap | Callable[[nn.Module], KeyMap], *,
                 image_size: int | None = None, unclamped_logit_scale: bool = False
                 ) -> nn.Module:
    """The vlp model for ``config`` holding the reference ``state`` (read from ``source``),
    mapped by ``key_map`` (or ``key_map(model)``, for maps that need the built model), in eval
    mode.

    ``image_size``: serve another input size by resampling the position grid.
    ``unclamped_logit_scale``: raise the config's clamp to the loaded ``logit_scale``, as the
    reference applies it unclamped at inference (vlp's clamp must not change its logits).
    """
    model = build_model(config)
    import_into(key_map if isinstance(key_map, KeyMap) else key_map(model), state, model,
                source)
    if unclamped_logit_scale:
        model.config.max_logit_scale = max(model.config.max_logit_scale,
                                           float(model.logit_scale.detach()))
    if image_size is not None and image_size != config.vision.image_size:
        model.visual.set_image_size(image_size)
    return model.eval()


def mlp_ratio(width: int, hidden: int, where: str) -> float:
    """A ratio with ``int(width * ratio) == hidden`` exactly (vlp sizes the MLP that way)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != hidden:
        raise ConfigError(f"{where}: intermediate_size {hidden} cannot be expressed for width "
                          f"{width}")
    return ratio


# -- export ---------------------------------------------------------------------------------------

def family_model(model: nn.Module, family: type[M], target: str) -> M:
    """``model`` unwrapped, checked to be a vlp ``family`` model (what ``target`` holds)."""
    model = unwrap_model(model)
    if not isinstance(model, family):
        raise ConfigError(f"{type(model).__name__} cannot be written as {target}; expected a "
                          f"vlp {family.__name__} model")
    return model


def refuse_foreign_directory(directory: Path, marker: str) -> None:
    """Replace only an empty directory or one already holding ``marker``; never user data."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / marker).exists():
        raise CheckpointError(f"{directory}: exists, is not empty and holds no {marker}; "
                              "refusing to replace it")


def write_directory(directory: str | os.PathLike[str], files: Mapping[str, Any],
                    tokenizer: Tokenizer | None = None,
                    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")
                    ) -> Path:
    """Write ``files`` (name -> JSON object, or name -> state dict for a ``.safetensors`` name;
    tensors already CPU copies) and the tokenizer's files (declaring ``model_input_names``) into
    ``directory``, atomically. The
    first file name is the format's marker: only a directory holding it (or an empty one) is
    replaced."""
    directory = Path(directory)
    refuse_foreign_directory(directory, next(iter(files)))
    with atomic_directory(directory) as staging:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                write_safetensors(content, staging / name, copy=False)
            else:
                write_json(staging / name, content)
        if tokenizer is not None:
            tokenizer.save(staging, model_input_names)
    return directory


# -- tokenizers -----------------------------------------------------------------------------------

def read_tokenizer(source: TokenizerSource, context_length: int) -> Tokenizer:
    """A tokenizer, a tokenizer directory / tokenizer.json, or a CLIP (vocab.json, merges.txt)
    pair, as a `Tokenizer`."""
    if isinstance(source, Tokenizer):
        return source
    if isinstance(source, list | tuple):
        vocab_file, merges_file = source
        return clip_bpe_tokenizer(vocab_file, merges_file, context_length=context_length)
    return load_tokenizer(source)


def attach_tokenizer(path: Path, context_length: int, vocab_size: int) -> Tokenizer | None:
    """The tokenizer files in ``path`` (HF layout, or a CLIP vocab.json + merges.txt), cut to the
    model's context length; None when there are none."""
    has_files = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    if not has_files:
        return None
    tokenizer = load_tokenizer(path)
    return fit_tokenizer(tokenizer, context_length, vocab_size, str(path))


def fit_tokenizer(tokenizer: Tokenizer, context_length: int, vocab_size: int, where: str,
                  pad_token: str | None = None) -> Tokenizer:
    """The same tokenizer with the model's context length (if shorter) and ``pad_token``."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: tokenizer emits {tokenizer.vocab_size} ids but the model "
                              f"embeds only {vocab_size}")
    return Tokenizer(tokenizer.backend, context_length=min(tokenizer.context_length,
                                                           context_length),
                     bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                     pad_token=pad_token or tokenizer.pad_token)


def hf_readable(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` fit for files other libraries read: transformers turns the declared pad
    token into a special token that splits text, so an ordinary word as pad (open_clip pads
    with id 0, "!") is declared as eos instead; eos pooling gives the same embeddings."""
    special = {token.content for token in tokenizer.backend.get_added_tokens_decoder().values()}
    if tokenizer.pad_token in special:
        return tokenizer
    return Tokenizer(tokenizer.backend, context_length=tokenizer.context_length,
                     bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                     pad_token=tokenizer.eos_token)
