"""Tensor files: strict safetensors reads and writes with a report of every mismatching key, and
foreign weight files (safetensors, or torch files read with ``weights_only=True``). Nothing here
unpickles arbitrary objects."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlp.errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# where training checkpoints keep the weights: Lightning-style, then BLIP / LAVIS
CHECKPOINT_ENTRIES = ("state_dict", "model")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on CPU; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike[str], *,
                      copy: bool = True) -> None:
    """Write `tensors` with the ``format: pt`` metadata transformers expects; by default as CPU
    copies (safetensors refuses shared storage, i.e. tied weights, and non-contiguous views),
    `copy=False` where the caller already made them."""
    if copy:
        tensors = {name: tensor.detach().to("cpu", copy=True).contiguous()
                   for name, tensor in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def describe_mismatch(expected: dict[str, Tensor], tensors: dict[str, Tensor]) -> list[str]:
    """One line per missing, unexpected or misshapen key of `tensors` against `expected`."""
    problems = []
    for name, tensor in expected.items():
        if name not in tensors:
            problems.append(f"missing key {name!r} (expected shape {tuple(tensor.shape)})")
        elif tensors[name].shape != tensor.shape:
            problems.append(f"key {name!r} has shape {tuple(tensors[name].shape)}, expected "
                            f"{tuple(tensor.shape)}")
    for name, tensor in tensors.items():
        if name not in expected:
            problems.append(f"unexpected key {name!r} (found shape {tuple(tensor.shape)})")
    return problems


def check_state(model: nn.Module, tensors: dict[str, Tensor], where: str | os.PathLike) -> None:
    """CheckpointError naming `where` and the first mismatches unless `tensors` has exactly
    `model`'s keys and shapes."""
    problems = describe_mismatch(model.state_dict(), tensors)
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: does not match {type(model).__name__}: {shown}{more}")


def checked_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors in safetensors file `path` after checking every key and shape."""
    tensors = read_safetensors(path)
    check_state(model, tensors, path)
    return tensors


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a safetensors state dict strictly: every key and shape is checked before any
    tensor is copied, so a mismatch raises CheckpointError and leaves the model untouched."""
    model.load_state_dict(checked_weights(model, path), strict=True)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.bin``/``.pt``/``.pth`` state dict read with
    ``weights_only=True`` (a training checkpoint's ``state_dict`` or ``model`` entry is used);
    wrapper prefixes ``module.``/``_orig_mod.`` are stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle/zip errors come in many types
            reason = _torch_reason(error)
            if "GLOBAL" in reason:  # a pickle that would import and call something
                raise CheckpointError(f"{path}: refused: loading it would run code ({reason}); "
                                      "vlp reads only tensors from a weights file: save a "
                                      "state dict (torch.save(model.state_dict())) or "
                                      "safetensors") from error
            raise CheckpointError(f"{path}: not a readable weights-only torch file "
                                  f"({reason})") from error
        for entry in CHECKPOINT_ENTRIES:
            if isinstance(state, dict) and isinstance(state.get(entry), dict):
                state = state[entry]
                break
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: expected a state dict of parameter names to "
                                  f"tensors; entry {key!r} is a {type(key).__name__} key to a "
                                  f"{type(value).__name__}")
    return {_strip_wrappers(k): v for k, v in state.items()}


def _torch_reason(error: BaseException) -> str:
    """The one line of torch.load's error that says what is wrong with the file (its other
    lines advise loading with weights_only=False, which vlp never does)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue",
                   "In PyTorch", "Re-running")
    lines = [line.replace("WeightsUnpickler error:", "").strip()
             for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    return " ".join(lines)[:300] or type(error).__name__


def _strip_wrappers(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name
