"""Learning-rate schedules: linear warmup to each group's peak, then cosine, constant, linear
or constant with a cooldown, as open_clip's ``--lr-scheduler cosine|const|const-cooldown``.

A schedule is a small class (not ``LambdaLR``) so its state is plain JSON and a resumed run can
extend ``total_steps`` without unpickling a closure. ``lr_factor(i)`` is the multiplier of each
group's peak lr for optimizer update ``i`` (0-based):

- warmup (every kind): ``(i + 1) / warmup_steps`` while ``i < warmup_steps``, so the first
  update already moves and update ``warmup_steps - 1`` is at the peak;
- ``cosine``: half a cosine from 1 down to ``min_lr_ratio``, reached at ``i = total_steps``;
- ``constant``: 1;
- ``linear``: a straight line from 1 down to ``min_lr_ratio`` at ``i = total_steps``;
- ``constant-cooldown``: 1 until ``total_steps - cooldown_steps``, then
  ``min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) ** cooldown_power`` over the last
  ``cooldown_steps`` updates (progress 0 -> 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlp.errors import ConfigError

SCHEDULES = ("cosine", "constant", "linear", "constant-cooldown")


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int,
              min_lr_ratio: float = 0.0, cooldown_steps: int = 0,
              cooldown_power: float = 1.0) -> float:
    """The multiplier of the peak lr for optimizer update `step` (0-based); see the module."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "constant-cooldown":
        start = total_steps - cooldown_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / cooldown_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** cooldown_power
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


class LrSchedule:
    """Sets every param group's lr to its peak (its lr when the schedule is made) times
    `lr_factor`. Call `step()` after each ``optimizer.step()``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        kind: str = "cosine",
        cooldown_steps: int = 0,
        cooldown_power: float = 1.0,
    ) -> None:
        if kind not in SCHEDULES:
            raise ConfigError(f"schedule={kind!r}; expected one of {list(SCHEDULES)}")
        if warmup_steps < 0 or total_steps < 0:
            raise ConfigError(f"warmup_steps={warmup_steps}, total_steps={total_steps}: "
                              "expected both >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={min_lr_ratio}: expected a value in [0, 1]")
        if kind == "constant-cooldown" and not 0 < cooldown_steps <= total_steps - warmup_steps:
            raise ConfigError(f"cooldown_steps={cooldown_steps}: schedule constant-cooldown "
                              f"expects 1 to {total_steps - warmup_steps} (the {total_steps} "
                              f"steps of the run after its {warmup_steps} warmup steps)")
        if cooldown_power <= 0:
            raise ConfigError(f"cooldown_power={cooldown_power}: expected a value > 0")
        self.optimizer = optimizer
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.cooldown_steps = cooldown_steps
        self.cooldown_power = cooldown_power
        self.base_lrs = [float(group.get("initial_lr", group["lr"]))
                         for group in optimizer.param_groups]
        for group, base_lr in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base_lr
        self.step_count = 0  # optimizer updates done so far
        self._apply()

    def lr_factor(self, step: int) -> float:
        return lr_factor(self.kind, step, self.warmup_steps, self.total_steps,
                         self.min_lr_ratio, self.cooldown_steps, self.cooldown_power)

    def _apply(self) -> None:
        factor = self.lr_factor(self.step_count)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "kind": self.kind,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio, "cooldown_steps": self.cooldown_steps,
                "cooldown_power": self.cooldown_power, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position only; the shape (peak, warmup, total) stays this instance's, so
        a resumed run may extend its schedule."""
        step_count = state.get("step_count")
        if not isinstance(step_count, int) or step_count < 0:
            raise ConfigError(f"scheduler state step_count={step_count!r}: expected an int >= 0")
        self.step_count = step_count
        self._apply()


WarmupCosine = LrSchedule  # the default kind; the name earlier releases exported
