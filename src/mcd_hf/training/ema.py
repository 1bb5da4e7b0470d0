"""Exponential moving average of model weights (Polyak averaging), as MDLM trains with decay 0.9999.

The average is kept in float32 next to the parameters (same device), updated after every optimizer step with
``ema = decay * ema + (1 - decay) * param``, saved with each checkpoint, and copied into the model for the final
export. Reference: diffusers ``training_utils.EMAModel`` (same update, without its decay warm-up, so that the
average is a plain function of the step).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ExponentialMovingAverage:
    """EMA of the trainable parameters of a model.

    Args:
        model: The (unwrapped) model whose parameters are averaged.
        decay: The decay in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[name].detach().float().clone() for name in self.names]
        self.num_updates = 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step toward the current parameters of ``model``."""
        current = [param.detach().float() for param in self._params(model)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the averaged weights into ``model``."""
        for param, average in zip(self._params(model), self.shadow):
            param.copy_(average.to(param.dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Temporarily swaps the averaged weights into ``model`` (for validation), restoring them on exit."""
        backup = [param.detach().clone() for param in self._params(model)]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self._params(model), backup):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {name: tensor.cpu() for name, tensor in zip(self.names, self.shadow)},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks parameters {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for index, name in enumerate(self.names):
            self.shadow[index].copy_(state["shadow"][name])


__all__ = ["ExponentialMovingAverage"]
