import math

import pytest
import torch

from pokesprite.config import ScheduleConfig
from pokesprite.diffusion.samplers import DDIMSampler, DDPMSampler, make_sampler
from pokesprite.diffusion.schedule import NoiseSchedule, cosine_alphas_cumprod


def closed_form(t, T=1000, s=0.008):
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def test_cosine_schedule_matches_closed_form():
    ab = cosine_alphas_cumprod(1000)
    for t in (1, 10, 250, 500, 750, 900, 990):
        assert ab[t - 1].item() == pytest.approx(closed_form(t), rel=1e-9)


def test_betas_capped_and_alpha_bar_reaches_zero():
    ab = cosine_alphas_cumprod(1000)
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas[1:] >= betas[:-1] - 1e-12).all()  # betas only grow
    assert ab[-1].item() < 1e-6  # pure noise at t = T
    # The original project clipped betas to [1e-4, 0.02], leaving alpha_bar_T ~ 0.003: not here.
    clipped = torch.cumprod(1 - betas.clamp(1e-4, 0.02), 0)
    assert clipped[-1].item() == pytest.approx(0.0031, abs=5e-4)
    assert ab[-1].item() < clipped[-1].item() / 1000


def test_add_noise_and_predict_x0_invert():
    sched = NoiseSchedule(ScheduleConfig())
    x0, noise = torch.randn(4, 8, 27, 27), torch.randn(4, 8, 27, 27)
    t = torch.tensor([0, 10, 500, 998])
    xt = sched.add_noise(x0, noise, t)
    ab = sched.alphas_cumprod[500].item()
    assert torch.allclose(xt[2], math.sqrt(ab) * x0[2] + math.sqrt(1 - ab) * noise[2], atol=1e-5)
    assert torch.allclose(sched.predict_x0(xt, noise, t), x0, atol=1e-3)


def test_sampler_timesteps_span_the_schedule():
    sched = NoiseSchedule(ScheduleConfig())
    for n in (1000, 50, 4):
        ts = DDPMSampler(sched, n).timesteps
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    with pytest.raises(ValueError, match="num_steps"):
        DDPMSampler(sched, 0)


def test_full_sampler_uses_the_trained_betas():
    sched = NoiseSchedule(ScheduleConfig())
    s = DDPMSampler(sched, 1000)
    ab = sched.alphas_cumprod
    true_betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    assert torch.allclose(s.betas, true_betas.flip(0))


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddpm", 50), ("ddpm", 5), ("ddim", 50), ("ddim", 5)])
def test_sampler_with_an_oracle_recovers_x0(name, steps):
    """If the model returns the exact noise of a fixed x0, sampling must land on x0."""
    sched = NoiseSchedule(ScheduleConfig())
    sampler = make_sampler(name, sched, steps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 8, 27, 27, generator=g) * 2 - 1
    x = torch.randn(2, 8, 27, 27, generator=g)
    for i, t in enumerate(sampler.timesteps):
        ab = sched.alphas_cumprod[t].float()
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        x = sampler.step(eps, i, x, generator=g)
    assert torch.allclose(x, x0, atol=1e-4)


def test_ddim_with_eta_one_has_the_ddpm_variance():
    sched = NoiseSchedule(ScheduleConfig())
    ddim, ddpm = DDIMSampler(sched, 20, eta=1.0), DDPMSampler(sched, 20)
    assert torch.allclose(ddim.sigma ** 2, ddpm.variance)
    assert (DDIMSampler(sched, 20).sigma == 0).all()


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", NoiseSchedule(ScheduleConfig()), 10)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_samplers_clamp_predicted_x0_to_the_latent_range(name):
    """An oracle for x0 = 10 everywhere: with the seed's +-3 clamp the samples end at 3, with 0 (off) at 10."""
    sched = NoiseSchedule(ScheduleConfig())
    x0 = torch.full((1, 8, 27, 27), 10.0)
    for clamp, expected in ((3.0, 3.0), (0.0, 10.0)):
        sampler = make_sampler(name, sched, 5, clamp)
        x = torch.randn(1, 8, 27, 27, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(sampler.timesteps):
            ab = sched.alphas_cumprod[t].float()
            x = sampler.step((x - ab.sqrt() * x0) / (1 - ab).sqrt(), i, x)
        assert torch.allclose(x, torch.full_like(x, expected), atol=1e-3), (clamp, x.mean())


def test_training_latents_are_clamped_and_the_loss_kind_is_used():
    from pokesprite.train.diffusion import denoising_loss, sample_latents

    mean, logvar = torch.tensor([[-5.0, 0.5, 5.0]]), torch.full((1, 3), -60.0)  # ~no posterior noise
    assert sample_latents(mean, logvar, 1.0, clamp=3.0).tolist() == [[-3.0, 0.5, 3.0]]
    assert sample_latents(mean, logvar, 1.0, clamp=0.0).tolist() == [[-5.0, 0.5, 5.0]]

    class Zero(torch.nn.Module):  # predicts eps = 0, so the loss is a function of the noise alone
        def forward(self, x, t, context, mask):
            return torch.zeros_like(x)

    sched = NoiseSchedule(ScheduleConfig())
    z0 = torch.zeros(4, 8, 27, 27)
    args = (Zero(), sched, z0, None, None)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    mse = denoising_loss(*args, generator=torch.Generator().manual_seed(3), kind="mse")
    huber = denoising_loss(*args, generator=torch.Generator().manual_seed(3), kind="huber")
    # same generator order: timesteps first, then the noise
    g = torch.Generator().manual_seed(3)
    sched.sample_timesteps(4, g)
    noise = torch.randn(z0.shape, generator=g)
    assert mse.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    a = noise.abs()
    assert huber.item() == pytest.approx(torch.where(a < 1, 0.5 * a ** 2, a - 0.5).mean().item(), rel=1e-5)
