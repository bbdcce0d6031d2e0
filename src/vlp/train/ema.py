"""An exponential moving average of a model's weights (as timm's ``ModelEmaV2``).

After every optimizer step that was taken, each parameter's average moves
``ema = decay * ema + (1 - decay) * weight``; buffers (running statistics, queues) are copied.
The average is keyed by ``state_dict`` name, so it is saved, loaded and swapped into the model
by name. Evaluation and the exported model of a run with ``ema_decay`` use the average; the raw
weights stay in the checkpoint for resuming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from vlp.errors import CheckpointError


class WeightEma:
    """The average of `model`'s weights, started from their current values."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay {decay}: expected a value in [0, 1]")
        self.decay = decay
        self.parameters = {name for name, _ in model.named_parameters()}
        self.shadow = {name: tensor.detach().clone() for name, tensor
                       in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            average = self.shadow[name]
            if name in self.parameters and average.is_floating_point():
                average.mul_(self.decay).add_(tensor.detach().to(average.dtype),
                                              alpha=1.0 - self.decay)
            else:
                average.copy_(tensor)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], where: str) -> None:
        """Take a saved average; CheckpointError naming `where` unless it has every name and
        shape of this one (nothing changes then)."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        shapes = sorted(name for name in set(self.shadow) & set(state)
                        if state[name].shape != self.shadow[name].shape)
        if missing or unexpected or shapes:
            first = (missing or unexpected or shapes)[0]
            raise CheckpointError(f"{where}: the weight average does not fit the model "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected, "
                                  f"{len(shapes)} of another shape; first {first!r})")
        with torch.no_grad():
            for name, average in self.shadow.items():
                average.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` holding the average inside the block, its own weights again (bitwise)
        after it."""
        state = model.state_dict()
        saved = {name: tensor.detach().clone() for name, tensor in state.items()}
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in state.items():
                    tensor.copy_(saved[name])
