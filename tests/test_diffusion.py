import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pokesprite.config import ConfigError, DiffusionStageConfig, ScheduleConfig, from_dict
from pokesprite.diffusion.samplers import DDIMSampler, DDPMSampler, make_sampler
from pokesprite.diffusion.schedule import NoiseSchedule, cosine_alphas_cumprod, min_snr_weight
from pokesprite.losses import noise_loss


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


@pytest.mark.parametrize("steps", [10, 50])
def test_a_ddim_step_moves_a_noised_latent_to_the_previous_step(steps):
    """Deterministic DDIM (eta 0) with the true noise maps q(x_t | x0) to q(x_prev | x0) with the same noise,
    at every step, not only the last."""
    sched = NoiseSchedule(ScheduleConfig())
    sampler = DDIMSampler(sched, steps)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 8, 5, 5, generator=g, dtype=torch.float64) * 2 - 1  # float64: at t = 999, ab is 2.4e-9
    eps = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64)
    for i, t in enumerate(sampler.timesteps.tolist()):
        x_t = sched.add_noise(x0, eps, torch.full((2,), t))
        expected = (x0 if sampler.is_last(i)
                    else sched.add_noise(x0, eps, torch.full((2,), int(sampler.timesteps[i + 1]))))
        assert torch.allclose(sampler.step(eps, i, x_t), expected, atol=1e-5), (i, t)


@pytest.mark.parametrize("steps", [1000, 20])
def test_a_ddpm_step_samples_the_gaussian_posterior(steps):
    """x_prev ~ q(x_prev | x_t, x0), derived here by conditioning the joint Gaussian of
    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) z and x_t = sqrt(a) x_prev + sqrt(1 - a) z', a = ab / ab_prev:
    mean sqrt(ab_prev) x0 + sqrt(a) (1 - ab_prev) / (1 - ab) (x_t - sqrt(ab) x0),
    variance (1 - ab_prev) - a (1 - ab_prev)^2 / (1 - ab); the noise is the generator's next draw."""
    sched = NoiseSchedule(ScheduleConfig())
    sampler = DDPMSampler(sched, steps)
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.rand(3, 4, 5, 5, generator=g) * 2 - 1, torch.randn(3, 4, 5, 5, generator=g)
    ab_all = sched.alphas_cumprod.double()
    for i in (0, 1, len(sampler.timesteps) // 2, len(sampler.timesteps) - 2):
        t, t_prev = (int(v) for v in sampler.timesteps[i:i + 2])
        ab, ab_prev = ab_all[t], ab_all[t_prev]
        a = ab / ab_prev
        mean = ab_prev.sqrt() * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * (x_t - ab.sqrt() * x0)
        var = (1 - ab_prev) - a * (1 - ab_prev) ** 2 / (1 - ab)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i))
        expected = (mean + var.sqrt() * noise).float()
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise that puts x0 at x_t
        got = sampler.step(eps.float(), i, x_t, generator=torch.Generator().manual_seed(i))
        assert torch.allclose(got, expected, atol=2e-4), (i, (got - expected).abs().max())


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
    # scaled first, then clamped: the clamp is in the units the U-Net sees
    assert torch.allclose(sample_latents(mean * 1.6, logvar, 0.5, clamp=3.0), torch.tensor([[-3.0, 0.4, 3.0]]))

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


# --- v-prediction (Salimans & Ho 2022) and Min-SNR-gamma weighting (Hang et al. 2023) ---


def oracle_output(sched, x, t, x0, prediction):
    """The exact eps or v of a noisy x whose clean latent is x0, at steps t (float32, as a model would)."""
    ab = sched.alphas_cumprod[t].float().view(-1, *([1] * (x.dim() - 1)))
    eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def test_velocity_and_its_inverse_recover_eps_and_x0_exactly():
    sched = NoiseSchedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 8, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 8, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 990, 999])
    xt, v = sched.add_noise(x0, eps, t), sched.velocity(x0, eps, t)
    ab = closed_form(501)  # index 500 is step 501
    assert torch.allclose(v[2], math.sqrt(ab) * eps[2] - math.sqrt(1 - ab) * x0[2], atol=1e-9)
    eps_v, x0_v = sched.eps_and_x0(v, xt, t, "v")
    assert torch.allclose(eps_v, eps, rtol=0, atol=1e-12) and torch.allclose(x0_v, x0, rtol=0, atol=1e-12)
    # eps -> (eps, x0) is the old predict_x0; it divides by sqrt(alpha_bar), so it is exact away from t = T
    eps_e, x0_e = sched.eps_and_x0(eps, xt, t, "eps")
    assert eps_e is eps and torch.allclose(x0_e[:4], x0[:4], rtol=0, atol=1e-10)
    assert sched.target(x0, eps, t, "eps") is eps and torch.equal(sched.target(x0, eps, t, "v"), v)
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        sched.eps_and_x0(v, xt, t, "x0")


def test_snr_matches_its_closed_form():
    sched = NoiseSchedule(ScheduleConfig())
    t = torch.tensor([0, 9, 249, 499, 749, 989])
    snr = sched.snr(t)
    assert snr.dtype == torch.float64
    for i, step in enumerate((t + 1).tolist()):
        assert snr[i].item() == pytest.approx(closed_form(step) / (1 - closed_form(step)), rel=1e-9)


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0, 1000.0], dtype=torch.float64)
    assert min_snr_weight(snr, 5.0, "eps").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.25, 0.005])
    assert min_snr_weight(snr, 5.0, "v").tolist() == pytest.approx([0.0, 1 / 3, 5 / 6, 5 / 21, 5 / 1001])
    sched = NoiseSchedule(ScheduleConfig())
    t = torch.arange(1000)
    w, snr = sched.loss_weight(t, "eps", 5.0), sched.snr(t)
    assert (w[snr <= 5] == 1).all() and (w[snr > 5] < 1).all() and (snr > 5).sum() > 100
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5])
    assert sched.loss_weight(t, "v", 0.0) is None  # gamma 0: unweighted, today's loss exactly
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        min_snr_weight(snr, 0.0, "eps")


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddpm", 5), ("ddim", 50), ("ddim", 5)])
def test_sampler_with_a_velocity_oracle_recovers_x0(name, steps):
    """If the model returns the exact v of a fixed x0, sampling must land on x0."""
    sched = NoiseSchedule(ScheduleConfig())
    sampler = make_sampler(name, sched, steps, prediction="v")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 8, 27, 27, generator=g) * 2 - 1
    x = torch.randn(2, 8, 27, 27, generator=g)
    # At t = T-1 (alpha_bar ~ 1e-9) v gives x0 exactly; the same output read as eps does not.
    v = oracle_output(sched, x, sampler.timesteps[0].repeat(2), x0, "v")
    assert torch.allclose(sampler.predicted_x0(v, 0, x), x0, atol=1e-5)
    misread = make_sampler(name, sched, steps, prediction="eps").predicted_x0(v, 0, x)
    assert (misread - x0).abs().mean() > 1
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(oracle_output(sched, x, t.repeat(2), x0, "v"), i, x, generator=g)
    assert torch.allclose(x, x0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown prediction"):
        make_sampler(name, sched, steps, prediction="x0")


def test_noise_loss_weighted_by_hand():
    pred = torch.tensor([[0.0, 3.0], [1.0, 0.5]])
    target = torch.zeros(2, 2)
    w = torch.tensor([2.0, 0.5], dtype=torch.float64)
    # huber per element 0, 2.5 | 0.5, 0.125 -> per sample 1.25, 0.3125 -> mean(2 * 1.25, 0.5 * 0.3125)
    assert noise_loss(pred, target, "huber", w).item() == pytest.approx((2.5 + 0.15625) / 2)
    # mse per element 0, 9 | 1, 0.25 -> per sample 4.5, 0.625
    assert noise_loss(pred, target, "mse", w).item() == pytest.approx((9.0 + 0.3125) / 2)
    ones = torch.ones(2)
    for kind in ("huber", "mse"):
        assert noise_loss(pred, target, kind, ones).item() == pytest.approx(noise_loss(pred, target, kind).item())
    with pytest.raises(ValueError, match="one entry per sample"):
        noise_loss(pred, target, "mse", torch.ones(3))


def test_denoising_loss_targets_v_with_min_snr_weights():
    """A zero model: the loss is the weighted mean square of v, drawn in the documented order (t, then noise)."""
    from pokesprite.train.diffusion import denoising_loss

    class Zero(torch.nn.Module):
        def forward(self, x, t, context, mask):
            return torch.zeros_like(x)

    sched = NoiseSchedule(ScheduleConfig())
    z0 = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = denoising_loss(Zero(), sched, z0, None, None, generator=torch.Generator().manual_seed(3), kind="mse",
                          prediction="v", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * z0
    snr = ab.flatten() / (1 - ab.flatten())
    expected = (snr.clamp(max=5.0) / (snr + 1) * v.pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_denoising_loss_without_a_generator_draws_on_the_latents_device(monkeypatch):
    """No host-side random numbers per training step: t and the noise are drawn where z0 lives."""
    from pokesprite.train.diffusion import denoising_loss

    devices = []
    for fn in ("randint", "randn"):
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _real=real, **k: devices.append(k.get("device")) or _real(*a, **k))
    z0 = torch.zeros(3, 2, 4, 4, device="meta")
    loss = denoising_loss(lambda x, t, c, m: torch.zeros_like(x), NoiseSchedule(ScheduleConfig()), z0, None, None)
    assert loss.device.type == "meta"
    assert len(devices) == 2 and all(torch.device(d).type == "meta" for d in devices), devices


def test_a_tiny_unet_learns_v():
    from pokesprite.config import UNetConfig
    from pokesprite.models.unet import UNet
    from pokesprite.train.diffusion import denoising_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 60k-parameter net on 8x8 latents: threads only contend
    try:
        torch.manual_seed(0)
        unet = UNet(UNetConfig(latent_channels=2, channels=(8, 16), attention=(False, True), heads=2, groups=4),
                    context_dim=8)
        sched = NoiseSchedule(ScheduleConfig())
        g = torch.Generator().manual_seed(0)
        z0 = torch.rand(16, 2, 8, 8, generator=g) * 2 - 1
        ctx, mask = torch.randn(16, 3, 8, generator=g), torch.ones(16, 3, dtype=torch.bool)
        args = dict(kind="mse", prediction="v", min_snr_gamma=5.0)

        def fixed_loss():  # fixed t and noise, as validation
            with torch.no_grad():
                return denoising_loss(unet, sched, z0, ctx, mask, generator=torch.Generator().manual_seed(1),
                                      **args).item()

        before = fixed_loss()
        opt = torch.optim.Adam(unet.parameters(), lr=5e-3)
        for _ in range(40):
            loss = denoising_loss(unet, sched, z0, ctx, mask, generator=g, **args)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert fixed_loss() < 0.85 * before
    finally:
        torch.set_num_threads(threads)


def test_config_prediction_and_min_snr_gamma():
    cfg = DiffusionStageConfig()
    assert (cfg.prediction, cfg.min_snr_gamma) == ("eps", 0.0)  # today's objective
    assert from_dict(DiffusionStageConfig, {"prediction": "v", "min_snr_gamma": 5}, "diffusion").min_snr_gamma == 5.0
    with pytest.raises(ConfigError, match="diffusion.prediction must be eps or v"):
        from_dict(DiffusionStageConfig, {"prediction": "x0"}, "diffusion")
    with pytest.raises(ConfigError, match="diffusion.min_snr_gamma"):
        from_dict(DiffusionStageConfig, {"min_snr_gamma": -1.0}, "diffusion")


# --- the pipeline and stage 3 with stand-in models ---

class OracleUNet(torch.nn.Module):
    """Returns the exact eps or v for the clean latent ``x0`` (set by the test); for the empty caption
    that of ``x0_uncond`` when the test sets one."""

    def __init__(self, sched, prediction, channels=3):
        super().__init__()
        self.sched, self.prediction, self.x0, self.x0_uncond = sched, prediction, None, None
        self.cfg = SimpleNamespace(latent_channels=channels)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device

    def forward(self, x, t, context, mask):
        x0 = self.x0
        if self.x0_uncond is not None:  # StubText: context 1 for a caption, 0 for ""
            x0 = torch.where(context[:, :1, :1, None] > 0, self.x0, self.x0_uncond)
        return oracle_output(self.sched, x, t, x0, self.prediction)


class StubText(torch.nn.Module):
    def tokenize(self, captions, device="cpu"):
        ids = [[int(bool(c))] for c in captions]  # 1 for a caption, 0 for ""
        return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
                "attention_mask": torch.ones(len(ids), 1, dtype=torch.long, device=device)}

    def forward(self, input_ids, attention_mask):
        return input_ids.float()[:, :, None].expand(-1, -1, 4)


class IdentityVAE(torch.nn.Module):
    """Decodes a (B, 3, 4, 4) latent to itself, an image in [-1, 1]."""
    cfg = SimpleNamespace(text_conditioning=False)
    latent_size = 4

    def decode(self, z):
        return z


@pytest.mark.parametrize("sampler,guidance", [("ddpm", 1.0), ("ddim", 3.0)])
def test_pipeline_samples_a_v_model_with_guidance(sampler, guidance):
    """A v-oracle for a known image: the pipeline built with prediction=v draws exactly that image.

    With guidance the unconditional oracle knows another image, x0_u; since v is affine in x0 at a
    fixed x_t, guided sampling lands on x0_u + scale (x0_c - x0_u), which is set to be the known image."""
    from pokesprite.config import SampleConfig
    from pokesprite.data.dataset import to_uint8
    from pokesprite.pipeline import SpritePipeline

    sched = NoiseSchedule(ScheduleConfig())
    x0 = ((torch.arange(48) * 5 + 5) / 127.5 - 1).view(1, 3, 4, 4)  # uint8 levels 5, 10, ..., 240
    expected = to_uint8(x0).permute(0, 2, 3, 1).numpy()
    unet = OracleUNet(sched, "v")
    if guidance == 1.0:
        unet.x0 = x0
    else:  # conditional and unconditional images whose guided combination is x0
        unet.x0 = 0.9 * x0
        unet.x0_uncond = (guidance * unet.x0 - x0) / (guidance - 1)
    pipes = {prediction: SpritePipeline(IdentityVAE(), unet, StubText(), sched, latent_scale=1.0,
                                        prediction=prediction,
                                        sample=SampleConfig(sampler=sampler, steps=10, guidance_scale=guidance))
             for prediction in ("v", "eps")}
    assert (pipes["v"](["a sprite"], seed=0) == expected).all()
    # One step from pure noise (t = T-1): v gives x0 exactly, the same output read as eps does not.
    assert (pipes["v"](["a sprite"], seed=0, num_steps=1) == expected).all()
    assert (pipes["eps"](["a sprite"], seed=0, num_steps=1) != expected).mean() > 0.5


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_one_step_objective_follows_the_prediction(prediction):
    """With an oracle U-Net the consistency loss is 0 and the decoded one-step x0 is the clean latent."""
    from pokesprite.config import FinetuneStageConfig, SampleConfig
    from pokesprite.pipeline import SpritePipeline
    from pokesprite.train.finetune import OneStepObjective

    sched = NoiseSchedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    logvar = torch.full_like(mean, -60.0)  # z0 = mean
    unet = OracleUNet(sched, prediction)
    unet.x0 = mean
    pipe = SpritePipeline(IdentityVAE(), unet, StubText(), sched, latent_scale=1.0, sample=SampleConfig(),
                          prediction=prediction)
    decoded = []
    align = SimpleNamespace(logit_scale=torch.tensor(math.log(10.0)),
                            encode_image=lambda images: decoded.append(images) or images.flatten(1)[:, :8])
    obj = OneStepObjective(pipe, align, ["a", "b", "c", "d"], torch.randn(4, 8, generator=g),
                           FinetuneStageConfig(), loss_kind="mse", cond_drop_prob=0.0, device="cpu",
                           min_snr_gamma=5.0)
    _, consistency, _, keep = obj((mean, logvar, torch.arange(4)), torch.Generator().manual_seed(1), train=False)
    assert consistency.item() < 1e-10
    assert keep.tolist() == [True] * 4 and torch.allclose(decoded[0], mean, atol=1e-5)
    # Every caption dropped: every row is still drawn (static shapes), and no pair is left to align.
    obj.cond_drop_prob = 1.0
    alignment, _, emb, keep = obj((mean, logvar, torch.arange(4)), torch.Generator().manual_seed(1), train=True)
    assert emb.shape == (4, 8) and decoded[-1].shape[0] == 4 and not keep.any() and alignment.item() == 0.0
    *_, keep = obj((mean, logvar, torch.arange(4)), torch.Generator().manual_seed(1), train=False)
    assert keep.all()  # validation never drops captions


# --- checkpoints and saved pipelines written before v-prediction load as eps ---

@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT next to the bundled tokenizer files (nothing downloaded)."""
    import shutil

    from transformers import BertConfig, BertModel

    from pokesprite.models.text import resolve_model_path

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_bert")
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(resolve_model_path("bundled")) / f, d / f)
    return d


TINY_UNET = dict(latent_channels=8, channels=(8, 16), attention=(False, True), heads=2, groups=4)


def test_diffusion_checkpoint_without_the_keys_loads_as_eps(tiny_text_dir, tmp_path):
    from pokesprite.config import TextConfig, UNetConfig, to_dict
    from pokesprite.models.text import TextEncoder
    from pokesprite.models.unet import UNet
    from pokesprite.pipeline import load_diffusion_checkpoint

    text_cfg = TextConfig(model=str(tiny_text_dir), max_tokens=16, dim=8)
    text = TextEncoder.from_pretrained(text_cfg.model, dim=8, max_tokens=16)
    unet_cfg = UNetConfig(**TINY_UNET)
    old = {"kind": "diffusion", "unet_config": to_dict(unet_cfg), "unet": UNet(unet_cfg, context_dim=8).state_dict(),
           "text_config": to_dict(text_cfg), "text_proj": text.proj.state_dict(),
           "schedule_config": to_dict(ScheduleConfig()), "loss": "huber"}
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_diffusion_checkpoint(tmp_path / "old.pt")
    assert (ckpt["prediction"], ckpt["min_snr_gamma"]) == ("eps", 0.0)
    torch.save({**old, "prediction": "v", "min_snr_gamma": 5.0}, tmp_path / "new.pt")
    ckpt = load_diffusion_checkpoint(tmp_path / "new.pt")
    assert (ckpt["prediction"], ckpt["min_snr_gamma"]) == ("v", 5.0)
    torch.save({**old, "prediction": "x0"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        load_diffusion_checkpoint(tmp_path / "bad.pt")


def test_saved_pipeline_keeps_its_prediction_and_old_ones_load_as_eps(tiny_text_dir, tmp_path):
    from pokesprite.config import SampleConfig, UNetConfig, VAEConfig
    from pokesprite.models.text import TextEncoder
    from pokesprite.models.unet import UNet
    from pokesprite.models.vae import VAE
    from pokesprite.pipeline import PIPELINE_FILE, SpritePipeline

    pipe = SpritePipeline(VAE(VAEConfig(channels=(8, 8, 8, 8))), UNet(UNetConfig(**TINY_UNET), context_dim=8),
                          TextEncoder.from_pretrained(str(tiny_text_dir), dim=8, max_tokens=16),
                          NoiseSchedule(ScheduleConfig()), latent_scale=1.0, sample=SampleConfig(), prediction="v")
    path = pipe.save(tmp_path / "model")
    assert SpritePipeline.load(path).prediction == "v"
    saved = torch.load(path / PIPELINE_FILE, weights_only=False)
    del saved["prediction"]  # as written before v-prediction existed
    torch.save(saved, path / PIPELINE_FILE)
    assert SpritePipeline.load(path).prediction == "eps"


def test_pipeline_draws_in_bf16_close_to_fp32(tiny_text_dir):
    """precision="bf16" autocasts the U-Net and decoder: same shapes, pixels within a few levels of fp32."""
    from pokesprite.config import SampleConfig, UNetConfig, VAEConfig
    from pokesprite.models.text import TextEncoder
    from pokesprite.models.unet import UNet
    from pokesprite.models.vae import VAE
    from pokesprite.pipeline import SpritePipeline

    torch.manual_seed(0)
    pipe = SpritePipeline(VAE(VAEConfig(channels=(8, 8, 8, 8))), UNet(UNetConfig(**TINY_UNET), context_dim=8),
                          TextEncoder.from_pretrained(str(tiny_text_dir), dim=8, max_tokens=16),
                          NoiseSchedule(ScheduleConfig()), latent_scale=1.0,
                          sample=SampleConfig(sampler="ddim", steps=4, guidance_scale=3.0))
    fp32 = pipe(["a red bird", "a blue fish"], seed=3).astype(int)
    bf16 = pipe(["a red bird", "a blue fish"], seed=3, precision="bf16").astype(int)
    assert bf16.shape == fp32.shape == (2, 215, 215, 3)
    diff = abs(bf16 - fp32)
    assert 0 < diff.mean() < 2.0 and diff.max() <= 16  # bf16 changes values, by little
    with pytest.raises(ValueError, match="precision"):
        pipe(["a red bird"], precision="fp16")


def test_a_sampler_is_known_everywhere_by_its_entry_in_SAMPLERS(monkeypatch):
    """Adding a sampler = a class and an entry in SAMPLERS: the configs accept its name, make_sampler
    builds it, and unknown names are refused with the list."""
    from pokesprite.config import ConfigError, SampleConfig
    from pokesprite.diffusion import samplers

    class Euler(samplers.DDIMSampler):
        pass

    monkeypatch.setitem(samplers.SAMPLERS, "euler", Euler)
    assert SampleConfig(sampler="euler").sampler == "euler"
    assert isinstance(samplers.make_sampler("euler", NoiseSchedule(ScheduleConfig()), 5), Euler)
    monkeypatch.delitem(samplers.SAMPLERS, "euler")
    with pytest.raises(ConfigError, match="one of ddpm, ddim, got 'euler'"):
        SampleConfig(sampler="euler")
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddpm, ddim"):
        samplers.make_sampler("euler", NoiseSchedule(ScheduleConfig()), 5)


def tiny_pipeline(tiny_text_dir, **sample):
    from pokesprite.config import SampleConfig, UNetConfig, VAEConfig
    from pokesprite.models.text import TextEncoder
    from pokesprite.models.unet import UNet
    from pokesprite.models.vae import VAE
    from pokesprite.pipeline import SpritePipeline

    torch.manual_seed(0)
    return SpritePipeline(VAE(VAEConfig(channels=(8, 8, 8, 8))), UNet(UNetConfig(**TINY_UNET), context_dim=8),
                          TextEncoder.from_pretrained(str(tiny_text_dir), dim=8, max_tokens=16),
                          NoiseSchedule(ScheduleConfig(timesteps=100)), latent_scale=1.0,
                          sample=SampleConfig(**{"sampler": "ddim", "steps": 2, **sample}))


def test_requests_are_checked_before_any_work(tiny_text_dir):
    pipe = tiny_pipeline(tiny_text_dir)
    bad = [(dict(prompts=["a", 1]), "prompt 1 is int 1, not text"), (dict(prompts=[None]), "prompt 0 is NoneType"),
           (dict(prompts=[]), "no prompts"), (dict(num_steps=0), r"num_steps must be a whole number in 1\.\.100"),
           (dict(num_steps=101), "in 1..100, got 101"), (dict(num_steps=True), "got True"),
           (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
           (dict(guidance_scale=-1), "got -1"), (dict(sampler="euler"), "sampler must be one of ddpm, ddim")]
    for kwargs, message in bad:
        kwargs = {"prompts": ["a red bird"], **kwargs}
        with pytest.raises(ValueError, match=message):
            pipe(kwargs.pop("prompts"), **kwargs)
    assert pipe.check_request("a red bird", num_steps=100, guidance_scale=0) == ["a red bird"]
    assert pipe([""], seed=0).shape == (1, 215, 215, 3)  # "": the explicit unconditional prompt


def test_each_sprite_has_its_own_seed(tiny_text_dir):
    """Sprite i is drawn with seed + i whatever the request's size and batching: the ddpm sampler draws
    fresh noise at every step, so this also holds the per-step noise to one generator per sprite."""
    pipe = tiny_pipeline(tiny_text_dir, batch=2, sampler="ddpm", steps=3)

    def close(a, b):  # batch size may change the last bits of a convolution: at most 1 level in 255
        return np.abs(a.astype(int) - b.astype(int)).max() <= 1

    three = pipe(["a", "b", "c"], seed=5)  # batches of 2 and 1
    assert close(three, pipe(["a", "b", "c"], seed=5, batch=3))
    for i, prompt in enumerate("abc"):
        assert close(three[i], pipe([prompt], seed=5 + i)[0])
    assert close(three[1:], pipe(["b", "c"], seed=6))
    assert not close(three[0], pipe(["a"], seed=6)[0])  # another seed, other noise
    same = pipe(["a", "a"], seed=0)
    assert not close(same[0], same[1])  # one prompt twice: two different sprites
    with pytest.raises(ValueError, match=r"seed must be a whole number in 0\.\.9223372036854775806 "):
        pipe(["a", "b"], seed=2**63 - 1)  # the second sprite's seed would not fit
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed must be a whole number"):
            pipe(["a"], seed=bad)
    assert pipe(["a"], seed=2**63 - 1).shape == (1, 215, 215, 3)


def test_too_many_steps_are_refused_by_the_request_check(tiny_text_dir):
    pipe = tiny_pipeline(tiny_text_dir)
    with pytest.raises(ValueError, match=r"num_steps must be a whole number in 1\.\.100, got 101"):
        pipe.check_request(["a red bird"], num_steps=101)


def test_infinite_guidance_is_refused_by_the_request_check(tiny_text_dir):
    pipe = tiny_pipeline(tiny_text_dir)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe.check_request(["a red bird"], guidance_scale=float("inf"))
