"""Strict weight maps between a vlp state dict and a reference library's, kept as data.

A `KeyMap` is a list of ``(vlp_name, ref_name)`` pairs plus the few tensors that change form
on the way (transposed, fused along dim 0, scalar). Import checks every key and shape of the
reference state dict before a single tensor is copied, so a bad checkpoint never leaves a
half-loaded model behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vlp.contract import unwrap_model
from vlp.errors import CheckpointError, ConfigError
from vlp.models.clip import CLIP
from vlp.store import read_json_object, write_safetensors
from vlp.tokenizers import Tokenizer, load_tokenizer

Shape = tuple[int, ...]
# a tokenizer, a tokenizer directory / tokenizer.json, or a CLIP (vocab.json, merges.txt) pair
TokenizerSource = str | os.PathLike[str] | tuple[str | os.PathLike[str], ...] | Tokenizer


@dataclass(frozen=True)
class KeyMap:
    pairs: tuple[tuple[str, str], ...]  # (vlp_name, ref_name): same values
    transposed: frozenset[str] = frozenset()  # ref names holding the transpose of vlp's tensor
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # vlp tensor = cat(ref tensors, dim 0)
    scalars: frozenset[str] = frozenset()  # ref names that may be 0-d or shape (1,)
    ignored: frozenset[str] = frozenset()  # ref buffers rebuilt from the config, dropped
    integers: frozenset[str] = frozenset()  # ref names holding integer tensors (queue pointers)
    vlp_only: frozenset[str] = frozenset()  # vlp names the reference lacks: kept, not exported

    def vlp_names(self) -> list[str]:
        return ([name for name, _ in self.pairs] + [name for name, _ in self.fused]
                + sorted(self.vlp_only))


def _shape(shape: torch.Size | Shape) -> str:
    return str(tuple(shape))


def expected_ref_shapes(keymap: KeyMap, vlp_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """The shape each reference tensor must have for a vlp model with ``vlp_shapes``."""
    shapes: dict[str, Shape] = {}
    for vlp_name, ref in keymap.pairs:
        shape = tuple(vlp_shapes[vlp_name])
        shapes[ref] = shape[::-1] if ref in keymap.transposed else shape
    for vlp_name, refs in keymap.fused:
        first, *rest = vlp_shapes[vlp_name]
        for ref in refs:
            shapes[ref] = (first // len(refs), *rest)
    return shapes


def _check_map_covers_model(keymap: KeyMap, model: nn.Module) -> dict[str, Tensor]:
    state = model.state_dict()
    mapped = keymap.vlp_names()
    if sorted(mapped) != sorted(state):
        missing = sorted(set(state) - set(mapped))
        extra = sorted(set(mapped) - set(state))
        raise RuntimeError(f"key map out of step with the vlp model: unmapped {missing}, "
                           f"unknown {extra}")  # a bug in vlp, not in the user's checkpoint
    return state


def _describe(names: list[str], shapes: Mapping[str, Shape]) -> str:
    first = names[0]
    text = f"{first!r} (expected shape {_shape(shapes[first])})"
    if len(names) > 1:
        text += f" and {len(names) - 1} more: {names[1:6]}{' ...' if len(names) > 6 else ''}"
    return text


def validate(keymap: KeyMap, ref_state: Mapping[str, Tensor], model: nn.Module,
             source: str) -> dict[str, Tensor]:
    """Check names, counts, dtypes and shapes of ``ref_state`` against what ``model`` needs;
    return ``ref_state`` without ignored buffers, scalars reshaped. Raises `CheckpointError`."""
    vlp_state = _check_map_covers_model(keymap, model)
    wanted = expected_ref_shapes(keymap, {k: tuple(v.shape) for k, v in vlp_state.items()})
    found = {k: v for k, v in ref_state.items() if k not in keymap.ignored}
    missing = [k for k in wanted if k not in found]
    if missing:
        raise CheckpointError(f"{source}: missing key {_describe(missing, wanted)}")
    unexpected = [k for k in found if k not in wanted]
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(
            f"{source}: unexpected key {first!r} with shape {_shape(_tensor_shape(found, first))}"
            f" (not part of this architecture/config)"
            + (f"; {len(unexpected) - 1} more: {unexpected[1:6]}" if len(unexpected) > 1 else "")
        )
    checked: dict[str, Tensor] = {}
    for name, shape in wanted.items():
        tensor = found[name]
        integer = name in keymap.integers
        if not isinstance(tensor, Tensor) or (tensor.is_floating_point() == integer
                                              or tensor.dtype == torch.bool):
            kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            wanted_kind = "an integer" if integer else "a floating point"
            raise CheckpointError(f"{source}: key {name!r} holds {kind}, expected {wanted_kind} "
                                  f"tensor of shape {_shape(shape)}")
        if name in keymap.scalars and tensor.numel() == 1 and tensor.ndim <= 1:
            tensor = tensor.reshape(shape)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{source}: key {name!r} has shape {_shape(tensor.shape)}, "
                                  f"expected {_shape(shape)}")
        checked[name] = tensor
    if len(checked) != len(found):  # every key either wanted or reported above
        raise RuntimeError("key count mismatch after validation")
    return checked


def _tensor_shape(state: Mapping[str, object], name: str) -> Shape:
    value = state[name]
    return tuple(value.shape) if isinstance(value, Tensor) else ()


def import_into(keymap: KeyMap, ref_state: Mapping[str, Tensor], model: nn.Module,
                source: str) -> None:
    """Validate everything first, then copy every tensor into ``model`` under no_grad."""
    checked = validate(keymap, ref_state, model, source)
    new_values: dict[str, Tensor] = {}
    for vlp_name, ref in keymap.pairs:
        tensor = checked[ref]
        new_values[vlp_name] = tensor.T if ref in keymap.transposed else tensor
    for vlp_name, refs in keymap.fused:
        new_values[vlp_name] = torch.cat([checked[ref] for ref in refs], dim=0)
    targets = model.state_dict(keep_vars=True)
    _check_tied_copies(keymap, new_values, targets, source)
    with torch.no_grad():
        for name, value in new_values.items():
            targets[name].copy_(value)


def _ref_names(keymap: KeyMap) -> dict[str, str]:
    names = {vlp_name: ref for vlp_name, ref in keymap.pairs}
    names.update((vlp_name, "+".join(refs)) for vlp_name, refs in keymap.fused)
    return names


def _check_tied_copies(keymap: KeyMap, new_values: Mapping[str, Tensor],
                       targets: Mapping[str, Tensor], source: str) -> None:
    """A vlp tensor reachable under several names (shared modules) is loaded once, so every
    reference copy of it must hold the same values; raises `CheckpointError` naming both."""
    first_name: dict[int, str] = {}
    ref_names = _ref_names(keymap)
    for name, value in new_values.items():
        owner = first_name.setdefault(id(targets[name]), name)
        if owner != name and not torch.equal(value, new_values[owner]):
            raise CheckpointError(
                f"{source}: {ref_names[name]!r} differs from {ref_names[owner]!r}, but vlp "
                f"loads both into one shared tensor ({owner!r} is {name!r})")


def export_from(keymap: KeyMap, model: nn.Module) -> dict[str, Tensor]:
    """The reference state dict of ``model``: contiguous CPU tensors that share no storage."""
    vlp_state = _check_map_covers_model(keymap, model)
    out: dict[str, Tensor] = {}
    for vlp_name, ref in keymap.pairs:
        tensor = vlp_state[vlp_name].detach()
        out[ref] = (tensor.T if ref in keymap.transposed else tensor).contiguous().cpu().clone()
    for vlp_name, refs in keymap.fused:
        for ref, part in zip(refs, vlp_state[vlp_name].detach().chunk(len(refs), dim=0),
                             strict=True):
            out[ref] = part.contiguous().cpu().clone()
    return out


# -- reading foreign weight files -----------------------------------------------------------------

# -- shared by the importers ----------------------------------------------------------------------


class ImportedModel(NamedTuple):
    """A model converted from a reference library, with the tokenizer it shipped with."""

    model: nn.Module
    tokenizer: Tokenizer | None


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """`tensors` (already CPU copies) as a safetensors file."""
    write_safetensors(tensors, path, copy=False)


def clip_model(model: nn.Module) -> CLIP:
    """``model`` unwrapped, checked to be a vlp CLIP (the only family these formats hold)."""
    model = unwrap_model(model)
    if not isinstance(model, CLIP):
        raise ConfigError(f"{type(model).__name__} cannot be exported to a CLIP format; "
                          "expected a vlp CLIP model")
    return model


def refuse_foreign_directory(directory: Path, marker: str) -> None:
    """Replace only an empty directory or one already holding ``marker``; never user data."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / marker).exists():
        raise CheckpointError(f"{directory}: exists, is not empty and holds no {marker}; "
                              "refusing to replace it")


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


def keep_loaded_logit_scale(model: CLIP) -> None:
    """Raise the config's clamp to the loaded ``logit_scale``: the references apply it unclamped
    at inference, so vlp's clamp must not change their logits."""
    loaded = float(model.logit_scale.detach())
    model.config.max_logit_scale = max(model.config.max_logit_scale, loaded)


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


def mlp_ratio(width: int, hidden: int, where: str) -> float:
    """A ratio with ``int(width * ratio) == hidden`` exactly (vlp sizes the MLP that way)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != hidden:
        raise ConfigError(f"{where}: intermediate_size {hidden} cannot be expressed for width "
                          f"{width}")
    return ratio
