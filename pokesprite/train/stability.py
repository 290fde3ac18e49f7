"""The seed's numerical-stability guard: skip non-finite batches, tame exploding gradients, stop on divergence.

Per batch the trainer asks the guard two questions:

1. ``loss_ok(loss)``: is the loss finite? If not the batch is skipped (no backward, no step) and counted.
2. ``clip(params)``: after backward, what is the gradient norm? A non-finite norm skips the batch as
   well. A finite norm far above its running mean (``explosion_factor`` times) is an *explosion*: it
   is counted and clipped to the running mean instead of ``grad_clip``, so one bad batch moves the
   weights no more than a typical one. Otherwise the norm is clipped to ``grad_clip`` as usual.

After ``max_bad_batches`` skipped batches training stops with ``TrainingDiverged``, whose message
says what to try; a run that keeps producing NaNs is not worth finishing.
"""
from __future__ import annotations

import math

import torch

from pokesprite.config import TrainConfig

WARMUP_STEPS = 10  # steps of running-mean history needed before explosions are detected
MOMENTUM = 0.9  # running mean of the (finite, non-exploded) gradient norm


class TrainingDiverged(RuntimeError):
    """Too many non-finite batches; raised with a message that says what to change."""


class StabilityGuard:
    def __init__(self, cfg: TrainConfig, stage: str):
        self.cfg, self.stage = cfg, stage
        self.skipped = 0  # batches skipped for a non-finite loss or gradient (whole run)
        self.explosions = 0  # gradient explosions clipped adaptively (whole run)
        self.mean_norm = 0.0  # running mean of gradient norms
        self.steps = 0  # finite gradient norms seen

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if self.cfg.max_bad_batches and self.skipped >= self.cfg.max_bad_batches:
            raise TrainingDiverged(
                f"{self.stage}: stopped after {self.skipped} batches with a non-finite {what} "
                f"(train.max_bad_batches={self.cfg.max_bad_batches}). Lower {self.stage}.train.lr "
                f"(now {self.cfg.lr:g}) or {self.stage}.train.grad_clip, or check the data; resume from "
                "the last good checkpoint with --resume.")

    def loss_ok(self, loss: torch.Tensor) -> bool:
        if torch.isfinite(loss).all():
            return True
        self._skip("loss")
        return False

    def clip(self, params: list[torch.nn.Parameter]) -> tuple[float, bool]:
        """Clip gradients in place; returns (pre-clip norm, whether to take the optimiser step)."""
        norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))  # measure only
        if not math.isfinite(norm):
            self._skip("gradient")
            return norm, False
        limit = self.cfg.grad_clip
        if self.steps >= WARMUP_STEPS and norm > self.cfg.explosion_factor * self.mean_norm:
            self.explosions += 1
            limit = min(limit, self.mean_norm)
        else:
            self.mean_norm = norm if self.steps == 0 else MOMENTUM * self.mean_norm + (1 - MOMENTUM) * norm
            self.steps += 1
        if norm > limit:
            scale = limit / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm, True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "explosions": self.explosions, "mean_norm": self.mean_norm,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.explosions = state["skipped"], state["explosions"]
        self.mean_norm, self.steps = state["mean_norm"], state["steps"]
