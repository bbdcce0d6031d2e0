"""Fine-tuning levers of a run: LoRA adapters, locked towers, layer-wise learning-rate decay and
a weight average (EMA), applied to the built model before it is wrapped and optimised.

Which parameters form the image and text towers, and their layer order, comes from the model
contract (`PretrainModel.tower_groups`): ``[0]`` the embeddings, ``[i]`` block ``i``, ``[-1]``
the final norm and heads.

- ``lock_image`` / ``lock_text`` freeze a tower (``requires_grad`` off, so it is left out of
  the optimizer and never changes), all but its last ``*_unlocked_groups`` groups, as
  open_clip's ``--lock-image-unlocked-groups`` / ``--lock-text-unlocked-layers``.
- ``layer_decay``: the parameters of group ``l`` of a tower of groups ``0..L`` train at
  ``lr * layer_decay ** (L - l)`` (BEiT, timm's ``param_groups_layer_decay``); parts outside
  every tower at ``lr``.
- ``lora_rank``: `vlp.train.lora`; ``ema_decay``: `vlp.train.ema`.

A checkpoint's ``model.safetensors`` holds the model as it is exported: the average when
``ema_decay`` is set, the adapters merged when ``lora_rank`` is; the weights training continues
from then go to ``train_weights.safetensors`` and, with adapters, the average of the adapted
model to ``ema.safetensors``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from vlp.contract import PretrainModel
from vlp.errors import ConfigError
from vlp.store import WEIGHTS_FILE
from vlp.store.tensors import read_safetensors
from vlp.train.checkpoint import TRAIN_WEIGHTS_FILE
from vlp.train.config import TrainConfig
from vlp.train.ema import WeightEma
from vlp.train.lora import add_lora, merged_state

EMA_FILE = "ema.safetensors"


def lock_towers(model: PretrainModel, cfg: TrainConfig) -> None:
    """Freeze the towers `cfg` locks, but for their last unlocked groups."""
    towers = model.tower_groups()
    for tower, locked, unlocked in (("image", cfg.lock_image, cfg.lock_image_unlocked_groups),
                                    ("text", cfg.lock_text, cfg.lock_text_unlocked_groups)):
        if not locked:
            continue
        if tower not in towers:
            have = ", ".join(sorted(towers)) or "none"
            raise ConfigError(f"train config lock_{tower}: {type(model).__name__} "
                              f"({model.config.family}) has no {tower} tower to lock (towers: "
                              f"{have})")
        groups = towers[tower]
        if unlocked >= len(groups):
            raise ConfigError(f"train config lock_{tower}_unlocked_groups={unlocked}: the "
                              f"{tower} tower has {len(groups)} groups (embeddings, "
                              f"{len(groups) - 2} blocks, heads); expected 0 to "
                              f"{len(groups) - 1}")
        frozen = {name for group in groups[:len(groups) - unlocked] for name in group}
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)


def layer_lr_scales(model: PretrainModel, decay: float) -> dict[str, float] | None:
    """Each tower parameter's learning-rate multiplier ``decay ** (L - l)``; None for decay 1
    (one learning rate)."""
    if decay == 1.0:
        return None
    towers = model.tower_groups()
    if not towers:
        raise ConfigError(f"train config layer_decay={decay}: {type(model).__name__} "
                          f"({model.config.family}) declares no towers to decay by layer")
    scales: dict[str, float] = {}
    for groups in towers.values():
        top = len(groups) - 1
        for layer, group in enumerate(groups):
            scales.update((name, decay ** (top - layer)) for name in group)
    return scales


class Levers:
    """The levers of one run over its model (plain, unwrapped): apply them at construction."""

    def __init__(self, cfg: TrainConfig, model: PretrainModel, *, is_main: bool = True,
                 sharded: bool = False) -> None:
        if sharded and (cfg.ema_decay is not None or cfg.lora_rank):
            raise ConfigError("train config ema_decay and lora_rank: not available with "
                              "strategy fsdp; use ddp")
        self.model = model
        self.lora = bool(cfg.lora_rank)
        if self.lora:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
        lock_towers(model, cfg)
        self.lr_scales = layer_lr_scales(model, cfg.layer_decay)
        self.ema = (WeightEma(model, cfg.ema_decay) if cfg.ema_decay is not None and is_main
                    else None)

    @property
    def reshapes_export(self) -> bool:
        """Whether the exported weights differ from the trained ones."""
        return self.lora or self.ema is not None

    def after_step(self) -> None:
        """After every optimizer step taken."""
        if self.ema is not None:
            self.ema.update(self.model)

    @contextlib.contextmanager
    def exported(self) -> Iterator[None]:
        """The model holding the weights it is evaluated with (the average, with EMA)."""
        with self.ema.swapped_in(self.model) if self.ema is not None else \
                contextlib.nullcontext():
            yield

    def checkpoint_files(self, state: dict[str, Tensor]
                         ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The exported state for ``model.safetensors`` from the full training `state`, and
        the other weight files the checkpoint needs to resume ({} with no lever that changes
        the export)."""
        if not self.reshapes_export:
            return state, {}
        files = {TRAIN_WEIGHTS_FILE: state}
        exported = self.ema.state_dict() if self.ema is not None else state
        if self.lora:
            if self.ema is not None:
                files[EMA_FILE] = exported
            exported = merged_state(self.model, exported)
        return exported, files

    def load(self, directory: str | Path) -> None:
        """The average from a checkpoint; one written without it starts the average from the
        restored weights."""
        if self.ema is None:
            return
        directory = Path(directory)
        path = directory / (EMA_FILE if self.lora else WEIGHTS_FILE)
        if not (directory / TRAIN_WEIGHTS_FILE).is_file() or not path.is_file():
            self.ema = WeightEma(self.model, self.ema.decay)
            return
        self.ema.load_state_dict(read_safetensors(path), str(path))

