"""The noise schedule: cosine alpha_bar (Nichol & Dhariwal 2021) and the forward process q(x_t | x_0)."""
from __future__ import annotations

import math

import torch

from pokesprite.config import ScheduleConfig


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar_t for t = 1..T (index t-1), float64.

    Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    with beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) clipped to ``max_beta`` (0.999) so that the last steps
    stay finite; alpha_bar_T is then ~0 (pure noise) as the paper intends.
    """
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


class NoiseSchedule:
    """Discrete-time DDPM schedule. Index ``t`` in 0..T-1 is diffusion step t+1."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        self.alphas_cumprod = cosine_alphas_cumprod(cfg.timesteps, cfg.cosine_s, cfg.max_beta)  # (T,) float64

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        ab = self._gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._gather(self.alphas_cumprod, t, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Uniform over the T steps."""
        return torch.randint(0, self.timesteps, (n,), generator=generator).to(device)
