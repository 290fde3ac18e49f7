"""The seed's numerical-stability guard: skip non-finite batches, tame exploding gradients, stop on divergence.

After each backward pass the trainer calls ``guard.step(loss, params)``, which decides on the device,
without reading anything back to the host:

1. A non-finite loss or gradient norm makes the batch *skipped*: the returned ``ok`` flag is false,
   the optimiser skips its update (fused AdamW's ``found_inf``) and the EMA does not move. It is counted.
2. A finite norm far above its running mean (``explosion_factor`` times) is an *explosion*: it is
   counted and clipped to the running mean (or to ``grad_clip`` when that is lower), so one bad batch
   moves the weights no more than a typical one. Otherwise the norm is clipped to ``grad_clip`` as usual.

The counts live on the device; ``check()`` reads them (one host sync) every ``train.log_every`` steps
and at the end of each epoch, and after ``max_bad_batches`` skipped batches stops training with
``TrainingDiverged``, whose message says what to try: a run that keeps producing NaNs is not worth
finishing.
"""
from __future__ import annotations

import torch

from pokesprite.config import TrainConfig

WARMUP_STEPS = 10  # steps of running-mean history needed before explosions are detected
MOMENTUM = 0.9  # running mean of the (finite, non-exploded) gradient norm


class TrainingDiverged(RuntimeError):
    """Too many non-finite batches; raised with a message that says what to change."""


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, as a 0-d device tensor (inf/NaN if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)


class StabilityGuard:
    def __init__(self, cfg: TrainConfig, stage: str, device: str | torch.device = "cpu"):
        self.cfg, self.stage = cfg, stage
        self.device = torch.device(device)
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self._skipped = zero(torch.long)  # batches skipped for a non-finite loss or gradient (whole run)
        self._explosions = zero(torch.long)  # gradient explosions clipped adaptively (whole run)
        self._mean_norm = zero(torch.float32)  # running mean of gradient norms
        self._steps = zero(torch.long)  # finite, non-exploded gradient norms seen

    @property
    def skipped(self) -> int:
        return int(self._skipped)

    @property
    def explosions(self) -> int:
        return int(self._explosions)

    @torch.no_grad()
    def step(self, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip gradients in place; returns (pre-clip norm, ok) as 0-d device tensors, no host sync."""
        norm = grad_norm(params).to(self.device, torch.float32)
        ok = torch.isfinite(loss.detach()).all().to(self.device) & torch.isfinite(norm)
        exploded = ok & (self._steps >= WARMUP_STEPS) & (norm > self.cfg.explosion_factor * self._mean_norm)
        typical = ok & ~exploded
        limit = torch.where(exploded, self._mean_norm.clamp(max=self.cfg.grad_clip),
                            torch.full_like(norm, self.cfg.grad_clip))
        scale = torch.where(ok & (norm > limit), limit / (norm + 1e-6), torch.ones_like(norm))
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))
        running = torch.where(self._steps == 0, norm, MOMENTUM * self._mean_norm + (1 - MOMENTUM) * norm)
        self._mean_norm = torch.where(typical, running, self._mean_norm)
        self._steps += typical
        self._skipped += ~ok
        self._explosions += exploded
        return norm, ok

    def check(self) -> None:
        """Read the skip count (a host sync) and stop if it has reached ``max_bad_batches``."""
        skipped = self.skipped
        if self.cfg.max_bad_batches and skipped >= self.cfg.max_bad_batches:
            raise TrainingDiverged(
                f"{self.stage}: stopped after {skipped} batches with a non-finite loss or gradient "
                f"(train.max_bad_batches={self.cfg.max_bad_batches}). Lower {self.stage}.train.lr "
                f"(now {self.cfg.lr:g}) or {self.stage}.train.grad_clip, or check the data; resume from "
                "the last good checkpoint with --resume.")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "explosions": self.explosions, "mean_norm": float(self._mean_norm),
                "steps": int(self._steps)}

    def load_state_dict(self, state: dict) -> None:
        for name, dtype in (("skipped", torch.long), ("explosions", torch.long), ("mean_norm", torch.float32),
                            ("steps", torch.long)):
            setattr(self, f"_{name}", torch.tensor(state[name], dtype=dtype, device=self.device))
