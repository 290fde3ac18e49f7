import copy
import io

import pytest
import torch

from pokesprite.config import UNetConfig, VAEConfig
from pokesprite.models.layers import Attention, CrossAttentionBlock, mha_to_attention, timestep_embedding
from pokesprite.models.unet import UNet
from pokesprite.losses import kl_free_bits
from pokesprite.models.vae import VAE

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


def test_vae_for_inference_computes_the_same_in_channels_last():
    torch.manual_seed(0)
    vae = VAE(TINY_VAE).eval()
    x = torch.rand(2, 3, 215, 215) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean)
        fast = copy.deepcopy(vae).for_inference("cpu")
        assert fast.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        mean2, logvar2 = fast.encode(x)
        recon2 = fast.decode(mean2)
    assert mean2.is_contiguous() and recon2.is_contiguous()  # plain layout for whatever comes next
    assert torch.allclose(mean, mean2, atol=1e-5) and torch.allclose(logvar, logvar2, atol=1e-5)
    assert torch.allclose(recon, recon2, atol=1e-4)


def test_kl_closed_form():
    zero = torch.zeros(1, 8, 27, 27)
    assert kl_free_bits(zero, zero).item() == 0.0
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element
    assert abs(kl_free_bits(zero + 1, zero).item() - 0.5) < 1e-7
    # KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2
    assert abs(kl_free_bits(zero, zero + 1).item() - (torch.e - 2) / 2) < 1e-6


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


# ----------------------------------------------------------------------------- attention

class LegacyCrossAttentionBlock(torch.nn.Module):
    """The block as it was built on nn.MultiheadAttention (the reference the new one must match)."""

    def __init__(self, c, context_dim, *, heads, groups):
        super().__init__()
        nn = torch.nn
        self.norm = nn.GroupNorm(groups, c)
        self.proj_in = nn.Linear(c, c)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.self_attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(c, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.proj_out = nn.Linear(c, c)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        q = self.ln1(tokens)
        tokens = tokens + self.self_attn(q, q, q, need_weights=False)[0]
        pad = None if context_mask is None else ~context_mask.bool()
        tokens = tokens + self.cross_attn(self.ln2(tokens), context, context, key_padding_mask=pad,
                                          need_weights=False)[0]
        tokens = tokens + self.mlp(self.ln3(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


def attention_inputs(dim=16, kdim=16, b=3, n=5, tokens=7):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    mask[0, 4:] = False  # padded caption
    mask[2, 1:] = False  # a single real token
    return torch.randn(b, n, dim, generator=g), torch.randn(b, tokens, kdim, generator=g), mask


@pytest.mark.parametrize("kdim", [16, 12])
def test_attention_equals_multihead_attention_with_its_weights(kdim):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, batch_first=True)
    for p in mha.parameters():  # non-zero biases, so a misplaced bias or head split shows
        torch.nn.init.normal_(p, std=0.3)
    attn = Attention(16, 4, kdim=kdim)
    attn.load_state_dict(mha.state_dict())  # MHA's keys, converted on load
    x, ctx, mask = attention_inputs(kdim=kdim)
    expected = mha(x, ctx, ctx, need_weights=False)[0]
    assert torch.allclose(attn(x, ctx), expected, atol=1e-5)
    expected = mha(x, ctx, ctx, key_padding_mask=~mask, need_weights=False)[0]
    assert torch.allclose(attn(x, ctx, mask), expected, atol=1e-5)
    assert (attn(x, ctx, mask) - attn(x, ctx)).abs().max() > 1e-3  # the mask matters
    if kdim == 16:  # self-attention
        assert torch.allclose(attn(x), mha(x, x, x, need_weights=False)[0], atol=1e-5)


@pytest.mark.parametrize("kdim", [16, 12])
def test_attention_is_initialised_like_multihead_attention(kdim):
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, batch_first=True)
    after_mha = torch.rand(1)
    torch.manual_seed(3)
    attn = Attention(16, 4, kdim=kdim)
    assert torch.equal(torch.rand(1), after_mha)  # the same number of random draws
    converted = dict(mha.state_dict())
    mha_to_attention(converted, "")
    assert converted.keys() == attn.state_dict().keys()
    for name, value in attn.state_dict().items():
        assert torch.equal(value, converted[name]), name


def test_attention_to_no_key_returns_the_output_bias():
    torch.manual_seed(0)
    attn = Attention(16, 4, kdim=12)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, ctx, mask = attention_inputs(kdim=12)
    mask[1] = False  # every key of row 1 is padding
    ctx.requires_grad_(True)
    out = attn(x, ctx, mask)
    assert torch.allclose(out[1], attn.out.bias.expand(5, 16))  # zero attention, then the out layer
    out.square().sum().backward()
    assert torch.isfinite(ctx.grad).all() and ctx.grad[1].abs().max() == 0
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_checkpoint_of_the_multihead_attention_block_loads_into_the_new_one():
    torch.manual_seed(0)
    old = LegacyCrossAttentionBlock(16, 12, heads=4, groups=4)
    for p in old.parameters():  # proj_out starts at zero, which would hide the attention
        torch.nn.init.normal_(p, std=0.3)
    buffer = io.BytesIO()
    torch.save(old.state_dict(), buffer)
    buffer.seek(0)
    new = CrossAttentionBlock(16, 12, heads=4, groups=4)
    new.load_state_dict(torch.load(buffer, weights_only=True))  # strict: every key accounted for
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 5, 5, generator=g), torch.randn(2, 6, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(new(x, ctx, mask), old(x, ctx, mask), atol=1e-5)
    assert torch.allclose(new(x, ctx), old(x, ctx), atol=1e-5)


def test_unet_of_the_multihead_attention_era_loads_and_is_built_alike(monkeypatch):
    """A whole U-Net saved with the old blocks loads into today's, and the same seed builds the same weights."""
    import pokesprite.models.unet as unet_module

    torch.manual_seed(0)
    new = UNet(TINY_UNET, context_dim=32)
    monkeypatch.setattr(unet_module, "CrossAttentionBlock", LegacyCrossAttentionBlock)
    torch.manual_seed(0)
    old = UNet(TINY_UNET, context_dim=32)
    monkeypatch.undo()
    assert any(k.endswith("cross_attn.k_proj_weight") for k in old.state_dict())
    loaded = UNet(TINY_UNET, context_dim=32)
    loaded.load_state_dict(old.state_dict())
    for name, value in new.state_dict().items():  # same seed, same draws: identical initial weights
        assert torch.equal(value, loaded.state_dict()[name]), name
    randomised(old)
    new.load_state_dict(old.state_dict())
    x, t, ctx = unet_inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    assert torch.allclose(new(x, t, ctx, mask), old(x, t, ctx, mask), atol=1e-4)


def test_unet_depends_on_the_timestep():
    """The noise level reaches the network: the same noisy latent at another step gives another output
    (a U-Net blind to t could not denoise, yet every shape and text test would pass)."""
    unet = randomised(UNet(TINY_UNET, context_dim=32))
    x, t, ctx = unet_inputs()
    out = unet(x, t, ctx)
    assert (unet(x, t.flip(0), ctx) - out).abs().max().item() > 1e-4
    assert torch.equal(unet(x, t, ctx), out)  # deterministic: the difference is the timestep's
