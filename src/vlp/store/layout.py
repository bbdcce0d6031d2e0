"""Where things lie on disk: the model directory and the run directory of training checkpoints.

A model directory holds ``config.json``, ``model.safetensors`` and the tokenizer files (HF
``tokenizer.json`` layout). A run directory holds ``checkpoint-{step:07d}/`` directories (a model
directory plus the training state; ``train_state.json``, written last, marks one complete), a
``checkpoint-latest`` link to the newest, and nothing else this module would mistake for one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from vlp.config import load_config, save_config
from vlp.errors import CheckpointError, ConfigError
from vlp.store.files import atomic_directory, fsync_path, hidden_sibling, remove_dir
from vlp.store.tensors import write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train_state.json"
LATEST_LINK = "checkpoint-latest"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{7,})$")
# hidden siblings an interrupted write or delete of the run's own files leaves (checkpoints,
# the latest link, the trainer's train_config.json and log.jsonl rewrites); never mistaken for
# a checkpoint, and nothing else in a run directory matches (pruning removes only these)
STALE_PATTERN = re.compile(r"^\.(checkpoint-\d{7,}|checkpoint-latest|train_config\.json"
                           r"|log\.jsonl)\.(tmp|old)-[0-9a-f]{32}(\.json|\.jsonl)?$")


# ---------------------------------------------------------------------------------------------
# model directories


def write_model_files(directory: Path, config: Any, state: dict[str, Tensor],
                      tokenizer: Any | None = None) -> None:
    """Fill `directory` (a staging directory) with a model's config, weights and tokenizer."""
    save_config(config, directory / CONFIG_FILE)
    write_safetensors(state, directory / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(directory)


def check_replaceable(directory: Path) -> None:
    """Replace only an empty directory or a model directory; never other user data."""
    if directory.is_dir() and any(directory.iterdir()):
        if not ((directory / CONFIG_FILE).exists() or (directory / WEIGHTS_FILE).exists()):
            raise CheckpointError(
                f"{directory}: exists, is not empty and holds no {CONFIG_FILE}/{WEIGHTS_FILE}; "
                "refusing to replace it with a model directory"
            )


def save_model_dir(directory: str | os.PathLike[str], config: Any, state: dict[str, Tensor],
                   tokenizer: Any | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) as one atomic directory."""
    directory = Path(directory)
    check_replaceable(directory)
    with atomic_directory(directory) as staging:
        write_model_files(staging, config, state, tokenizer)
    return directory


def read_model_config(directory: str | os.PathLike[str]) -> Any:
    """The config of model directory `directory` (CheckpointError naming the file otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    try:
        return load_config(directory / CONFIG_FILE)
    except ConfigError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from error


def is_run_dir(path: Path) -> bool:
    """A training run directory (checkpoints inside) rather than a model directory."""
    return (path.is_dir() and not (path / CONFIG_FILE).is_file()
            and not (path / TOKENIZER_FILE).is_file()
            and any(path.glob("checkpoint-*")))


def model_dir(path: str | os.PathLike[str]) -> Path:
    """`path` itself, or the latest checkpoint of the run directory `path`."""
    path = Path(path)
    return find_checkpoint(path, "latest") if is_run_dir(path) else path


# ---------------------------------------------------------------------------------------------
# run directories


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


def update_latest_link(run_dir: Path, target: Path) -> None:
    link = run_dir / LATEST_LINK
    temp_link = hidden_sibling(link, "tmp")
    os.symlink(target.name, temp_link)  # relative, so the run directory can be moved
    os.replace(temp_link, link)
    fsync_path(run_dir)


def prune(run_dir: Path, keep_last: int, protected: Path) -> None:
    """Remove what interrupted writes of the run's own files left (`STALE_PATTERN`; nothing
    else), and all but the newest `keep_last` checkpoints (0 keeps every one); `protected` is
    never removed. The caller holds the run directory's lock, so no live writer owns them."""
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
            remove_dir(path)


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
