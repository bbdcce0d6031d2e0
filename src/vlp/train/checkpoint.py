"""Model directories and resumable training checkpoints: safetensors + JSON, written atomically.

A model directory holds ``config.json``, ``model.safetensors`` and the tokenizer files. A
training checkpoint ``run_dir/checkpoint-{step:07d}/`` is a model directory plus
``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors`` and ``train_state.json``.
Every directory is written under a hidden temporary name, fsynced, then renamed into place, so
a crash leaves either the old directory or the new one, never a half-written one. Nothing here
unpickles.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlp.config import load_config, save_config
from vlp.errors import CheckpointError, ConfigError
from vlp.fileio import fsync_path
from vlp.models import build_model
from vlp.train.distributed import unwrap_model
from vlp.train.state import (
    apply_rng_state,
    load_model_state,
    load_optimizer_state,
    named_optimizer_state,
    read_optimizer,
    read_safetensors,
    rng_state,
    write_optimizer,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RNG_FILE = "rng.safetensors"
TRAIN_STATE_FILE = "train_state.json"
LATEST_LINK = "checkpoint-latest"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{7,})$")
# hidden siblings left by an interrupted write or delete; never mistaken for a checkpoint
STALE_PATTERN = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}(\.\w+)?$")  # + atomic_write suffix
TRAIN_STATE_VERSION = 2


# ---------------------------------------------------------------------------------------------
# atomic directories


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def _hidden_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the platform cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name, so a crash mid-delete never
    leaves a half-deleted directory under its real name."""
    doomed = _hidden_sibling(path, "old")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden sibling of `final` to fill; on success fsync it and move it to
    `final` (swapping out an existing directory atomically where the OS allows)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"{final}: exists and is not a directory; refusing to replace it")
    staging = _hidden_sibling(final, "tmp")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if not final.exists():
            os.rename(staging, final)
        elif _exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous contents
        else:
            _remove_dir(final)
            os.rename(staging, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not readable as JSON ({error})") from error


# ---------------------------------------------------------------------------------------------
# model directories


def _write_model_files(model: nn.Module, directory: Path, tokenizer: Any | None,
                       state: dict[str, torch.Tensor] | None = None) -> None:
    model = unwrap_model(model)
    if not hasattr(model, "config"):
        raise CheckpointError(f"{type(model).__name__} has no .config; cannot save it")
    save_config(model.config, directory / CONFIG_FILE)
    # clones: safetensors refuses shared storage (tied weights) and non-contiguous views
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous()
               for name, tensor in (state if state is not None else model.state_dict()).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)


def _check_replaceable(directory: Path) -> None:
    if directory.is_dir() and any(directory.iterdir()):
        if not ((directory / CONFIG_FILE).exists() or (directory / WEIGHTS_FILE).exists()):
            raise CheckpointError(
                f"{directory}: exists, is not empty and holds no {CONFIG_FILE}/{WEIGHTS_FILE}; "
                "refusing to replace it with a model directory"
            )


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any | None = None
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) as one atomic directory."""
    directory = Path(directory)
    _check_replaceable(directory)
    with atomic_directory(directory) as staging:
        _write_model_files(model, staging, tokenizer)
    return directory


def _describe_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
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


def _checked_weights(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The tensors in `path` after checking every key and shape against `model`."""
    tensors = read_safetensors(path)
    problems = _describe_mismatch(model, tensors)
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{path}: does not match {type(model).__name__}: {shown}{more}")
    return tensors


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a safetensors state dict strictly: every key and shape is checked before any
    tensor is copied, so a mismatch raises CheckpointError and leaves the model untouched."""
    model = unwrap_model(model)
    model.load_state_dict(_checked_weights(model, Path(path)), strict=True)


def load_pretrained(
    directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a model from ``config.json`` and load ``model.safetensors`` strictly."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    try:
        config = load_config(directory / CONFIG_FILE)
        model = build_model(config)
    except ConfigError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from error
    load_weights(model, directory / WEIGHTS_FILE)
    return model.to(map_location)


# ---------------------------------------------------------------------------------------------
# training checkpoints


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in `run_dir` as ``(step, path)``, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and not entry.is_symlink() and (entry / TRAIN_STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _update_latest_link(run_dir: Path, target: Path) -> None:
    link = run_dir / LATEST_LINK
    temp_link = _hidden_sibling(link, "tmp")
    os.symlink(target.name, temp_link)  # relative, so the run directory can be moved
    os.replace(temp_link, link)
    fsync_path(run_dir)


def _prune(run_dir: Path, keep_last: int, protected: Path) -> None:
    for entry in run_dir.iterdir():  # leftovers of interrupted writes (only rank 0 writes)
        if STALE_PATTERN.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(run_dir)
    for _, path in checkpoints[:-keep_last]:
        if path.resolve() != protected.resolve():
            _remove_dir(path)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    tokenizer: Any | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_state: dict[str, Any] | None = None,
    epoch: int = 0,
    extra: dict[str, Any] | None = None,
    keep_last: int = 0,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rng_states: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-{step:07d}`` atomically, then point ``checkpoint-latest`` at
    it and delete all but the newest `keep_last` checkpoints (0 keeps every one).

    Distributed runs gather first (`full_model_state`, `full_optimizer_state`, every rank's
    `rng_state`) and pass them in from rank 0; by default they are taken from `model`,
    `optimizer` and this process at call time.
    """
    run_dir = Path(run_dir)
    target = checkpoint_dir(run_dir, step)
    rng_states = rng_states if rng_states is not None else [rng_state()]
    if optimizer is not None and optimizer_state is None:
        optimizer_state = named_optimizer_state(model, optimizer)
    train_state = {
        "version": TRAIN_STATE_VERSION,
        "step": step,
        "epoch": epoch,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data": data_state,
        "rng": [json_state for json_state, _ in rng_states],  # one per rank
        "extra": extra or {},
    }
    rng_tensors = {f"rank{rank}.{key}": tensor for rank, (_, tensors) in enumerate(rng_states)
                   for key, tensor in tensors.items()}
    with atomic_directory(target) as staging:
        _write_model_files(model, staging, tokenizer, model_state)
        if optimizer_state is not None:
            write_optimizer(optimizer_state, type(optimizer).__name__, staging)
        save_file(rng_tensors, staging / RNG_FILE)
        # written last: its presence marks a complete checkpoint (see list_checkpoints)
        _write_json(staging / TRAIN_STATE_FILE, train_state)
    _update_latest_link(run_dir, target)
    _prune(run_dir, keep_last, protected=target)
    return target


def find_checkpoint(path: str | os.PathLike[str], which: str | int = "latest") -> Path:
    """A training checkpoint directory: `path` itself if it is one, else the run directory's
    ``"latest"`` (the link, falling back to the highest complete step) or a given step."""
    path = Path(path)
    if (path / TRAIN_STATE_FILE).is_file():
        return path.resolve()
    if (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: a model directory without {TRAIN_STATE_FILE}; "
                              "initialise a new run from it instead of resuming")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    checkpoints = list_checkpoints(path)
    if which == "latest":
        link = path / LATEST_LINK
        if (link / TRAIN_STATE_FILE).is_file():
            return link.resolve()
        if checkpoints:
            return checkpoints[-1][1].resolve()
    else:
        try:
            step = int(which) if not isinstance(which, str) else int(which.rsplit("-", 1)[-1])
        except ValueError as error:
            raise CheckpointError(f"which={which!r}: expected 'latest', a step number or "
                                  "'checkpoint-NNNNNNN'") from error
        for found_step, found in checkpoints:
            if found_step == step:
                return found.resolve()
    have = [found.name for _, found in checkpoints] or "none"
    raise CheckpointError(f"{path}: no checkpoint {which!r} (complete checkpoints: {have})")


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore model weights (strictly), optimizer, scheduler and this rank's RNG states from a
    checkpoint (or a run directory's latest); returns train_state.json with ``path`` added.

    Weights and optimizer state are full (unsharded), so `model` may be plain, DDP or FSDP
    and the world size may differ from the saving run's; a rank the saving run did not have
    takes rank 0's RNG state. The loader position is in ``train_state["data"]``, for the
    caller's ``load_state_dict``.
    """
    directory = find_checkpoint(path)
    train_state = _read_json(directory / TRAIN_STATE_FILE)
    if train_state.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{directory / TRAIN_STATE_FILE}: version "
                              f"{train_state.get('version')!r}, expected {TRAIN_STATE_VERSION}")
    # read and check everything before changing anything: a bad file leaves all untouched
    weights = _checked_weights(unwrap_model(model), directory / WEIGHTS_FILE)
    optimizer_state = (read_optimizer(model, optimizer, directory) if optimizer is not None
                       else None)
    if restore_rng:
        saved = train_state["rng"]
        source_rank = rank if rank < len(saved) else 0
        prefix = f"rank{source_rank}."
        rng_tensors = {key[len(prefix):]: tensor for key, tensor
                       in read_safetensors(directory / RNG_FILE).items()
                       if key.startswith(prefix)}
        if "torch_cpu" not in rng_tensors:
            raise CheckpointError(f"{directory / RNG_FILE}: no RNG state for rank {source_rank}")
    load_model_state(model, weights)
    if optimizer is not None:
        load_optimizer_state(model, optimizer, optimizer_state)
    if scheduler is not None and train_state.get("scheduler") is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if restore_rng:
        apply_rng_state(saved[source_rank], rng_tensors)
    train_state["path"] = str(directory)
    return train_state
