import pytest
import torch

from pokesprite.config import VAEConfig
from pokesprite.models.layers import CrossAttentionBlock
from pokesprite.models.vae import VAE

# 40 px images -> 5 px latents; the decoder attends at 5 and 10 px
TINY = VAEConfig(image_size=40, channels=(8, 8, 16, 16), heads=2)
TEXT = VAEConfig(image_size=40, channels=(8, 8, 16, 16), heads=2, text_conditioning=True)
DIM = 12


def randomised(vae):
    """Re-draw every weight: the attention output layers start at zero, which would hide the text."""
    torch.manual_seed(0)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return vae.eval()


def caption(b=2, tokens=5):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * b, dtype=torch.bool)
    return torch.randn(b, tokens, DIM, generator=g), mask


def latent(b=2):
    return torch.randn(b, 8, 5, 5, generator=torch.Generator().manual_seed(2))


def test_default_vae_has_no_text_modules():
    plain = VAE(TINY)
    assert not any(isinstance(m, CrossAttentionBlock) for m in plain.modules())
    assert VAE(TINY, context_dim=DIM).state_dict().keys() == plain.state_dict().keys()  # ignored


def test_text_vae_places_attention_at_27_and_54_px_equivalents():
    vae = VAE(TEXT, context_dim=DIM)
    assert isinstance(vae.decoder.mid_attn, CrossAttentionBlock)
    assert isinstance(vae.decoder.up_attn, CrossAttentionBlock)
    seen = []
    for block in (vae.decoder.mid_attn, vae.decoder.up_attn):
        block.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape[-2:])))
    ctx, mask = caption()
    out = vae.decode(latent(), ctx, mask)
    assert out.shape == (2, 3, 40, 40)
    assert seen == [(5, 5), (10, 10)]


def test_text_vae_depends_on_caption_but_not_on_padding():
    vae = randomised(VAE(TEXT, context_dim=DIM))
    z, (ctx, mask) = latent(), caption()
    with torch.no_grad():
        out = vae.decode(z, ctx, mask)
        padded = ctx.clone()
        padded[:, 3:] += 10.0  # masked-out tokens
        pad_diff = (vae.decode(z, padded, mask) - out).abs().max().item()
        real = ctx.clone()
        real[:, 0] += 1.0
        real_diff = (vae.decode(z, real, mask) - out).abs().max().item()
    assert pad_diff < 1e-5 and real_diff > 1e-3


def test_text_vae_forward_passes_context_through():
    vae = randomised(VAE(TEXT, context_dim=DIM))
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    ctx, mask = caption()
    with torch.no_grad():
        a = vae(x, torch.Generator().manual_seed(0), context=ctx, mask=mask)[0]
        b = vae(x, torch.Generator().manual_seed(0), context=ctx + 1.0, mask=mask)[0]
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3


def test_context_errors():
    with pytest.raises(ValueError, match="context_dim"):
        VAE(TEXT)
    text, plain = VAE(TEXT, context_dim=DIM), VAE(TINY)
    ctx, mask = caption()
    with pytest.raises(ValueError, match="caption features"):
        text.decode(latent())
    with pytest.raises(ValueError, match="caption features"):
        text(torch.zeros(2, 3, 40, 40))
    with pytest.raises(ValueError, match="not text-conditioned"):
        plain.decode(latent(), ctx, mask)
    with pytest.raises(ValueError, match="not text-conditioned"):
        plain(torch.zeros(2, 3, 40, 40), context=ctx)
