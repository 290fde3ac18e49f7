"""The noise schedule: cosine alpha_bar (Nichol & Dhariwal 2021), the forward process q(x_t | x_0), and
the two things a model may predict (the noise eps or the velocity v) with their conversions."""
from __future__ import annotations

import math

import torch

from pokesprite.config import ScheduleConfig

PREDICTIONS = ("eps", "v")  # what the U-Net outputs: the noise, or the velocity of Salimans & Ho (2022)


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


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    return prediction


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): the x0 loss weighted by min(SNR, gamma), written for the target trained.

    An eps error is sqrt(SNR) times the x0 error and a v error sqrt(SNR + 1) times, so the weights are
    min(SNR, gamma) / SNR for eps (= 1 wherever SNR <= gamma) and min(SNR, gamma) / (SNR + 1) for v.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 to weight the loss, got {gamma}")
    if check_prediction(prediction) == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 (not 0/0) where SNR = 0
    return snr.clamp(max=gamma) / (snr + 1)


class NoiseSchedule:
    """Discrete-time DDPM schedule. Index ``t`` in 0..T-1 is diffusion step t+1.

    In the notation of Salimans & Ho (2022): alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
    x_t = alpha_t x0 + sigma_t eps.
    """

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

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, sec. 4 and appendix D)."""
        ab = self._gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """What a model of kind ``prediction`` is trained to output at x_t = add_noise(x0, noise, t)."""
        return noise if check_prediction(prediction) == "eps" else self.velocity(x0, noise, t)

    def eps_and_x0(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                   prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A model output of kind ``prediction`` at (x_t, t) -> (eps, x0), both shaped like x_t.

        For v (Salimans & Ho 2022, appendix D): x0 = alpha_t x_t - sigma_t v and eps = sigma_t x_t + alpha_t v,
        which stay well conditioned where alpha_bar_t ~ 0, unlike x0 from eps (a division by alpha_t).
        """
        if check_prediction(prediction) == "eps":
            return output, self.predict_x0(xt, output, t)
        ab = self._gather(self.alphas_cumprod, t, xt)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        return sigma * xt + alpha * output, alpha * xt - sigma * output

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at each step of ``t``: (B,) float64 on t's device."""
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab / (1 - ab)

    def loss_weight(self, t: torch.Tensor, prediction: str, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample Min-SNR-gamma weights (B,) at steps ``t`` (``min_snr_weight``); None (unweighted) at gamma 0."""
        return min_snr_weight(self.snr(t), min_snr_gamma, prediction) if min_snr_gamma > 0 else None

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device="cpu",
                         t_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Uniform over the T steps (or the inclusive ``t_range``), on ``device``; drawn on the generator's
        device (without one, on ``device``)."""
        low, high = t_range if t_range is not None else (0, self.timesteps - 1)
        draw_on = generator.device if generator is not None else device
        return torch.randint(low, high + 1, (n,), generator=generator, device=draw_on).to(device)

    def noised(self, z0: torch.Tensor, generator: torch.Generator | None = None,
               t_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A draw of the forward process: (t, noise, x_t = add_noise(z0, noise, t)), t uniform as in
        ``sample_timesteps``. t, then the noise, come from ``generator`` on its device, else from the
        default generator of z0's device (a GPU step copies no random numbers from the host)."""
        t = self.sample_timesteps(len(z0), generator, device=z0.device, t_range=t_range)
        draw_on = generator.device if generator is not None else z0.device
        noise = torch.randn(z0.shape, generator=generator, device=draw_on, dtype=z0.dtype).to(z0.device)
        return t, noise, self.add_noise(z0, noise, t)
