"""Resumable training checkpoints: a model directory plus the training state, written atomically.

A training checkpoint ``run_dir/checkpoint-{step:07d}/`` is a model directory (`vlp.store`) plus
``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors`` and ``train_state.json``
(written last: its presence marks a complete checkpoint). Every directory is written under a
hidden temporary name, fsynced, then renamed into place, so a crash leaves either the old
directory or the new one, never a half-written one. Nothing here unpickles.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlp.contract import unwrap_model
from vlp.errors import CheckpointError
from vlp.store import (
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    atomic_directory,
    read_json_object,
    write_json,
)
from vlp.store.layout import (
    checkpoint_dir,
    find_checkpoint,
    prune,
    update_latest_link,
    write_model_files,
)
from vlp.store.tensors import checked_weights, read_safetensors, write_safetensors
from vlp.train.state import (
    apply_rng_state,
    load_model_state,
    load_optimizer_state,
    named_optimizer_state,
    read_optimizer,
    rng_state,
    write_optimizer,
)

RNG_FILE = "rng.safetensors"
TRAIN_WEIGHTS_FILE = "train_weights.safetensors"
TRAIN_STATE_VERSION = 2


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
    weight_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-{step:07d}`` atomically, then point ``checkpoint-latest`` at
    it and delete all but the newest `keep_last` checkpoints (0 keeps every one).

    Distributed runs gather first (`full_model_state`, `full_optimizer_state`, every rank's
    `rng_state`) and pass them in from rank 0; by default they are taken from `model`,
    `optimizer` and this process at call time. `weight_files` (file name -> state) are more
    weight files beside the model's: ``train_weights.safetensors``, the weights training
    resumes from when ``model.safetensors`` holds the exported ones (`vlp.train.levers`).
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
    raw = unwrap_model(model)
    try:
        with atomic_directory(target) as staging:
            write_model_files(staging, raw.config, model_state if model_state is not None
                              else raw.state_dict(), tokenizer)
            for name, tensors in (weight_files or {}).items():
                write_safetensors(tensors, staging / name)
            if optimizer_state is not None:
                write_optimizer(optimizer_state, type(optimizer).__name__, staging)
            save_file(rng_tensors, staging / RNG_FILE)
            # written last: its presence marks a complete checkpoint (see list_checkpoints)
            write_json(staging / TRAIN_STATE_FILE, train_state)
        update_latest_link(run_dir, target)
    except OSError as error:  # disk full, quota, permissions: nothing half-written stays
        raise CheckpointError(f"{target}: could not be written ({error.strerror or error}); "
                              "the previous checkpoints are untouched: free the space (or fix "
                              "the cause) and continue with resume='latest'") from error
    prune(run_dir, keep_last, protected=target)
    return target


TRAIN_STATE_FIELDS = {"step": int, "epoch": int, "rng": list, "extra": dict,
                      "data": (dict, type(None)), "scheduler": (dict, type(None))}


def _check_train_state(state: dict[str, Any], path: Path) -> None:
    for name, kind in TRAIN_STATE_FIELDS.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing {name!r}; not a complete training state")
        value = state[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {name} is a {type(value).__name__}, expected "
                                  f"{getattr(kind, '__name__', 'an object or null')}")
    if state["step"] < 0 or state["epoch"] < 0 or not state["rng"]:
        raise CheckpointError(f"{path}: step, epoch must be >= 0 and rng hold a rank's state")


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
    train_state = read_json_object(directory / TRAIN_STATE_FILE, CheckpointError)
    if train_state.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{directory / TRAIN_STATE_FILE}: version "
                              f"{train_state.get('version')!r}, expected {TRAIN_STATE_VERSION}")
    _check_train_state(train_state, directory / TRAIN_STATE_FILE)
    # read and check everything before changing anything: a bad file leaves all untouched
    train_weights = directory / TRAIN_WEIGHTS_FILE  # when model.safetensors is the export
    weights = checked_weights(unwrap_model(model), train_weights if train_weights.is_file()
                              else directory / WEIGHTS_FILE)
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
