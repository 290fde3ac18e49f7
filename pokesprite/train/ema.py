"""Exponential moving average of model weights."""
from __future__ import annotations

import contextlib
import copy

import torch


def decay_for_half_life(half_life_steps: float) -> float:
    """The per-step decay d with d ** half_life_steps = 1/2: after that many steps a weight's share halves."""
    if half_life_steps <= 0:
        raise ValueError(f"half-life must be positive, got {half_life_steps}")
    return 0.5 ** (1.0 / half_life_steps)


class EMA:
    """Exponential moving average of a model's weights, used for validation, sampling and the saved model.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are not
    dominated by the random initial weights. ``update`` is a handful of ``torch._foreach`` kernels
    with the decay computed on the device, so it never waits for the host; an update whose ``ok``
    flag is false (a batch the stability guard skipped) leaves the average and n unchanged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(self.shadow.parameters()).device
        self._updates = torch.zeros((), dtype=torch.float32, device=device)

    @property
    def num_updates(self) -> int:
        return int(self._updates)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, ok: torch.Tensor | None = None) -> None:
        ok = torch.ones((), device=self._updates.device) if ok is None else ok.to(self._updates.device).float()
        n = self._updates + ok
        decay = torch.minimum((1 + n) / (10 + n), torch.full_like(n, self.decay))
        weight = (1 - decay) * ok  # 0 for a skipped batch
        averaged, live = list(self.shadow.parameters()), [p.detach() for p in model.parameters()]
        delta = torch._foreach_sub(live, averaged)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(averaged, delta)  # avg += (1 - d) (p - avg), i.e. lerp towards p
        buffers = list(self.shadow.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self._updates = n

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self._updates = torch.tensor(float(state["num_updates"]), device=self._updates.device)

    @contextlib.contextmanager
    def averaged(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.shadow.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)
