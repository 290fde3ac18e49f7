import torch

from pokesprite.config import UNetConfig, VAEConfig
from pokesprite.models.layers import timestep_embedding
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE, kl_divergence

TINY_VAE = VAEConfig(channels=(8, 8, 16, 16))
TINY_UNET = UNetConfig(channels=(16, 16, 32), heads=2)


def test_vae_shapes():
    vae = VAE(TINY_VAE)
    x = torch.rand(2, 3, 215, 215) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 8, 27, 27)
    assert vae.decode(mean).shape == (2, 3, 215, 215)
    recon, m, lv = vae(x)
    assert recon.shape == x.shape


def test_kl_closed_form():
    zero = torch.zeros(1, 8, 27, 27)
    assert kl_divergence(zero, zero).item() == 0.0
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element
    assert abs(kl_divergence(zero + 1, zero).item() - 0.5) < 1e-7
    # KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2
    assert abs(kl_divergence(zero, zero + 1).item() - (torch.e - 2) / 2) < 1e-6


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0, 1]), 8)
    assert torch.equal(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert abs(e[1, 0].item() - torch.cos(torch.tensor(1.0)).item()) < 1e-6  # frequency 1 first
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


def randomised(unet):
    """Re-draw every weight: the output layers start at zero, which would hide the text path."""
    torch.manual_seed(0)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return unet


def unet_inputs(b=2, tokens=6, dim=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 8, 27, 27, generator=g), torch.tensor([3, 900][:b]),
            torch.randn(b, tokens, dim, generator=g))


def test_unet_keeps_the_odd_27x27_shape():
    unet = UNet(TINY_UNET, context_dim=32)
    x, t, ctx = unet_inputs()
    assert unet(x, t, ctx).shape == (2, 8, 27, 27)


def test_unet_depends_on_text_and_ignores_padding():
    unet = randomised(UNet(TINY_UNET, context_dim=32))
    x, t, ctx = unet_inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    out = unet(x, t, ctx, mask)
    changed_pad = ctx.clone()
    changed_pad[:, 4:] += 10.0
    pad_diff = (unet(x, t, changed_pad, mask) - out).abs().max().item()
    changed_real = ctx.clone()
    changed_real[:, 0] += 1.0
    real_diff = (unet(x, t, changed_real, mask) - out).abs().max().item()
    assert pad_diff < 1e-6 < 1e-4 < real_diff


def test_unet_gradient_reaches_the_text():
    unet = randomised(UNet(TINY_UNET, context_dim=32))
    x, t, ctx = unet_inputs()
    ctx.requires_grad_(True)
    unet(x, t, ctx).square().mean().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
