"""Exponential moving average of model weights."""
from __future__ import annotations

import contextlib
import copy

import torch


class EMA:
    """Exponential moving average of a model's weights, used for validation, sampling and the saved model.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are not
    dominated by the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for avg, p in zip(self.shadow.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1 - d)
        for avg, b in zip(self.shadow.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = state["num_updates"]

    @contextlib.contextmanager
    def averaged(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.shadow.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)
