"""Samplers: reverse the schedule with a noise-predicting model."""
from __future__ import annotations

import torch

from pokesprite.diffusion.schedule import NoiseSchedule


class DDPMSampler:
    """Ancestral DDPM sampling (Ho et al. 2020) over ``num_steps`` evenly spaced steps.

    With num_steps == T this is the original sampler; with fewer it is the strided ("respaced")
    DDPM of Nichol & Dhariwal (2021, sec. 4): betas are recomputed from alpha_bar at the kept steps,
    so the sampler uses exactly the schedule the model was trained with.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, clip_x0: float = 3.0):
        if not 1 <= num_steps <= schedule.timesteps:
            raise ValueError(f"num_steps must be in 1..{schedule.timesteps}, got {num_steps}")
        self.schedule = schedule
        self.clip_x0 = clip_x0
        T = schedule.timesteps
        # Evenly spaced indices from T-1 down to 0, always including both ends.
        self.timesteps = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long().unique_consecutive()
        ab = schedule.alphas_cumprod[self.timesteps]
        ab_prev = torch.cat([ab[1:], torch.ones(1, dtype=ab.dtype)])
        self.alpha_bar, self.alpha_bar_prev = ab, ab_prev
        self.betas = 1 - ab / ab_prev
        # Posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 7).
        self.coef_x0 = ab_prev.sqrt() * self.betas / (1 - ab)
        self.coef_xt = (1 - self.betas).sqrt() * (1 - ab_prev) / (1 - ab)
        self.variance = self.betas * (1 - ab_prev) / (1 - ab)

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None):
        """One reverse step at position ``i`` of ``self.timesteps``: x_t -> x_prev."""
        t = self.timesteps[i].repeat(x.shape[0])
        x0 = self.schedule.predict_x0(x, eps, t).clamp(-self.clip_x0, self.clip_x0)
        mean = self.coef_x0[i].to(x.dtype) * x0 + self.coef_xt[i].to(x.dtype) * x
        if i == len(self.timesteps) - 1:
            return mean
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return mean + self.variance[i].sqrt().to(x.dtype) * noise
