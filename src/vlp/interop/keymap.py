"""Strict weight maps between a vlp state dict and a reference library's, kept as data.

A `KeyMap` is a list of ``(vlp_name, ref_name)`` pairs plus every change of form a tensor
takes on the way, declared rather than coded: transposed, fused (several reference tensors
concatenated into one vlp tensor), packed (the reverse: one reference tensor holding several
vlp tensors, like ``nn.MultiheadAttention``'s q|k|v), padded (leading singleton dims), scalar,
and tied (a reference name holding a copy of another). Import checks every key and shape of the
reference state dict before a single tensor is copied, so a bad checkpoint never leaves a
half-loaded model behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlp.errors import CheckpointError

Shape = tuple[int, ...]
Pairs = list[tuple[str, str]]
Fused = list[tuple[str, tuple[str, ...]]]


class Tie(NamedTuple):
    """A reference tensor stored again under ``alias``; vlp holds it once."""

    alias: str
    owner: str
    why: str  # the end of the error when the two differ


@dataclass(frozen=True)
class KeyMap:
    pairs: tuple[tuple[str, str], ...]  # (vlp_name, ref_name): same values
    transposed: frozenset[str] = frozenset()  # ref names holding the transpose of vlp's tensor
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # vlp tensor = cat(ref tensors, dim 0)
    packed: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ref tensor = cat(vlp tensors, dim 0)
    # ref names of pairs stored with leading 1s up to n dims (other names: not in this file)
    padded: tuple[tuple[str, int], ...] = ()
    scalars: frozenset[str] = frozenset()  # ref names that may be 0-d or shape (1,)
    ignored: frozenset[str] = frozenset()  # ref buffers rebuilt from the config, dropped
    integers: frozenset[str] = frozenset()  # ref names holding integer tensors (queue pointers)
    vlp_only: frozenset[str] = frozenset()  # vlp names the reference lacks: kept, not exported
    tied: tuple[Tie, ...] = ()  # optional ref copies: checked against their owner and dropped
    write_tied: bool = True  # export writes the tied copies (False: left out, as HF saves)

    def vlp_names(self) -> list[str]:
        return ([name for name, _ in self.pairs] + [name for name, _ in self.fused]
                + [name for _, names in self.packed for name in names] + sorted(self.vlp_only))


def linear_pairs(ours: str, theirs: str) -> Pairs:
    """The weight and bias of one layer (a Linear, LayerNorm or conv) under both names."""
    return [(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def _shape(shape: torch.Size | Shape) -> str:
    return str(tuple(shape))


def _pad(shape: Shape, ndim: int) -> Shape:
    return (1,) * (ndim - len(shape)) + tuple(shape)


def expected_ref_shapes(keymap: KeyMap, vlp_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """The shape each reference tensor must have for a vlp model with ``vlp_shapes``."""
    padded = dict(keymap.padded)
    shapes: dict[str, Shape] = {}
    for vlp_name, ref in keymap.pairs:
        shape = tuple(vlp_shapes[vlp_name])
        shape = shape[::-1] if ref in keymap.transposed else shape
        shapes[ref] = _pad(shape, padded[ref]) if ref in padded else shape
    for vlp_name, refs in keymap.fused:
        first, *rest = vlp_shapes[vlp_name]
        for ref in refs:
            shapes[ref] = (first // len(refs), *rest)
    for ref, names in keymap.packed:
        _, *rest = vlp_shapes[names[0]]
        shapes[ref] = (sum(vlp_shapes[name][0] for name in names), *rest)
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


def _drop_tied(keymap: KeyMap, found: dict[str, Tensor], source: str) -> None:
    """Remove each tied copy from ``found`` after checking it holds its owner's values."""
    for alias, owner, why in keymap.tied:
        if alias not in found:
            continue
        value = found.pop(alias)
        if owner in found and not (isinstance(value, Tensor) and isinstance(found[owner], Tensor)
                                   and value.shape == found[owner].shape
                                   and torch.equal(value, found[owner])):
            raise CheckpointError(f"{source}: {alias!r} differs from {owner!r}; {why}")


def validate(keymap: KeyMap, ref_state: Mapping[str, Tensor], model: nn.Module,
             source: str) -> dict[str, Tensor]:
    """Check names, counts, dtypes and shapes of ``ref_state`` against what ``model`` needs;
    return ``ref_state`` without ignored buffers and tied copies, scalars reshaped. Raises
    `CheckpointError`."""
    vlp_state = _check_map_covers_model(keymap, model)
    wanted = expected_ref_shapes(keymap, {k: tuple(v.shape) for k, v in vlp_state.items()})
    found = {k: v for k, v in ref_state.items() if k not in keymap.ignored}
    _drop_tied(keymap, found, source)
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
    packed = {ref for ref, _ in keymap.packed}
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
        if name in packed and tuple(tensor.shape[:1]) != shape[:1]:
            raise CheckpointError(f"{source}: key {name!r} has shape {_shape(tensor.shape)}, "
                                  f"expected {shape[0]} rows on dim 0")
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
    targets = model.state_dict(keep_vars=True)
    padded = dict(keymap.padded)
    new_values: dict[str, Tensor] = {}
    for vlp_name, ref in keymap.pairs:
        tensor = checked[ref]
        if ref in padded:  # drop the leading singleton dims
            tensor = tensor.reshape(tensor.shape[tensor.ndim - targets[vlp_name].ndim:])
        new_values[vlp_name] = tensor.T if ref in keymap.transposed else tensor
    for vlp_name, refs in keymap.fused:
        new_values[vlp_name] = torch.cat([checked[ref] for ref in refs], dim=0)
    for ref, names in keymap.packed:
        parts = checked[ref].split([targets[name].shape[0] for name in names], dim=0)
        new_values.update(zip(names, parts, strict=True))
    _check_tied_copies(keymap, new_values, targets, source)
    with torch.no_grad():
        for name, value in new_values.items():
            targets[name].copy_(value)


def _ref_names(keymap: KeyMap) -> dict[str, str]:
    names = {vlp_name: ref for vlp_name, ref in keymap.pairs}
    names.update((vlp_name, "+".join(refs)) for vlp_name, refs in keymap.fused)
    names.update((name, f"{ref}[part {k}]") for ref, parts in keymap.packed
                 for k, name in enumerate(parts))
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
    padded = dict(keymap.padded)
    out: dict[str, Tensor] = {}
    for vlp_name, ref in keymap.pairs:
        tensor = vlp_state[vlp_name].detach()
        tensor = tensor.T if ref in keymap.transposed else tensor
        if ref in padded:
            tensor = tensor.reshape(_pad(tuple(tensor.shape), padded[ref]))
        out[ref] = tensor.contiguous().cpu().clone()
    for vlp_name, refs in keymap.fused:
        for ref, part in zip(refs, vlp_state[vlp_name].detach().chunk(len(refs), dim=0),
                             strict=True):
            out[ref] = part.contiguous().cpu().clone()
    for ref, names in keymap.packed:
        out[ref] = torch.cat([vlp_state[name].detach() for name in names]).contiguous().cpu()
    if keymap.write_tied:
        for alias, owner, _ in keymap.tied:
            out[alias] = out[owner].clone()
    return out
