"""Samplers: reverse the schedule with a model that predicts the noise eps or the velocity v.

Both samplers walk the same evenly spaced subset of the training steps and share one interface:
``sampler.timesteps`` to iterate over and ``sampler.step(output, i, x)`` for x_t -> x_prev, where
``output`` is the (guided) model output of the kind the sampler was built for. The pipeline owns the
loop (model -> guidance -> step). ``SAMPLERS`` maps each name to its class: a new sampler is a class
here and an entry there (the configs, the CLI and the web page read the names from it).
"""
from __future__ import annotations

import torch

from pokesprite.diffusion.schedule import NoiseSchedule, check_prediction


def gaussian(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (N, ...) on the CPU. ``generator`` is one generator for the
    whole batch, or a list of N, one per row: row i is then what its own generator alone would give, so
    a sprite's noise does not depend on the other sprites of its batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype)


def spaced_timesteps(timesteps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` indices evenly spaced from T-1 down to 0, both ends included."""
    if not 1 <= num_steps <= timesteps:
        raise ValueError(f"num_steps must be in 1..{timesteps}, got {num_steps}")
    return torch.linspace(timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().unique_consecutive()


class _Sampler:
    def __init__(self, schedule: NoiseSchedule, num_steps: int, clip_x0: float, prediction: str):
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.prediction = check_prediction(prediction)  # what the model outputs: eps or v
        self.timesteps = spaced_timesteps(schedule.timesteps, num_steps)
        ab = schedule.alphas_cumprod[self.timesteps]
        self.alpha_bar = ab
        self.alpha_bar_prev = torch.cat([ab[1:], torch.ones(1, dtype=ab.dtype)])

    def predicted_x0(self, output, i, x):
        """The model output at position ``i`` -> its clean latent, clamped to +-clip_x0."""
        t = self.timesteps[i].repeat(x.shape[0])
        _, x0 = self.schedule.eps_and_x0(output, x, t, self.prediction)
        return x0.clamp(-self.clip_x0, self.clip_x0)

    def is_last(self, i: int) -> bool:
        return i == len(self.timesteps) - 1


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020) over ``num_steps`` evenly spaced steps.

    With num_steps == T this is the original sampler; with fewer it is the strided ("respaced")
    DDPM of Nichol & Dhariwal (2021, sec. 4): betas are recomputed from alpha_bar at the kept steps,
    so the sampler uses exactly the schedule the model was trained with.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, clip_x0: float = 3.0, prediction: str = "eps"):
        super().__init__(schedule, num_steps, clip_x0, prediction)
        ab, ab_prev = self.alpha_bar, self.alpha_bar_prev
        self.betas = 1 - ab / ab_prev
        # Posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 7).
        self.coef_x0 = ab_prev.sqrt() * self.betas / (1 - ab)
        self.coef_xt = (1 - self.betas).sqrt() * (1 - ab_prev) / (1 - ab)
        self.variance = self.betas * (1 - ab_prev) / (1 - ab)

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None):
        """One reverse step at position ``i`` of ``self.timesteps``: x_t -> x_prev (``generator``: see ``gaussian``)."""
        x0 = self.predicted_x0(output, i, x)
        mean = self.coef_x0[i].to(x.dtype) * x0 + self.coef_xt[i].to(x.dtype) * x
        if self.is_last(i):
            return mean
        noise = gaussian(x.shape, generator, x.dtype).to(x.device)
        return mean + self.variance[i].sqrt().to(x.dtype) * noise


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021, eq. 12); ``eta`` = 0 is deterministic, 1 matches DDPM's variance."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0, clip_x0: float = 3.0,
                 prediction: str = "eps"):
        super().__init__(schedule, num_steps, clip_x0, prediction)
        ab, ab_prev = self.alpha_bar, self.alpha_bar_prev
        self.sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None):
        ab, ab_prev, sigma = (v[i].to(x.dtype) for v in (self.alpha_bar, self.alpha_bar_prev, self.sigma))
        x0 = self.predicted_x0(output, i, x)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise consistent with the clamped x0
        out = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if sigma > 0 and not self.is_last(i):
            out = out + sigma * gaussian(x.shape, generator, x.dtype).to(x.device)
        return out


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, clip_x0: float = 3.0, *,
                 prediction: str = "eps"):
    """``clip_x0``: predicted clean latents are clamped to +-clip_x0 (the seed's +-3; 0 = no clamp).
    ``prediction``: what the model outputs, eps or v (``NoiseSchedule.eps_and_x0``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule, num_steps, clip_x0=clip_x0 if clip_x0 > 0 else float("inf"), prediction=prediction)
