"""VAE: 215x215x3 images <-> 27x27x8 latents.

The image is padded to 216 (replicating the last row and column) so that three stride-2
downsamples give 216 -> 108 -> 54 -> 27 exactly; the decoder returns 216 and crops back to 215.

With ``VAEConfig.text_conditioning`` the decoder also attends to the caption's token features (at 27
and 54 px), as the seed model did; by default it is the plain latent-diffusion autoencoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.checkpoints import load_checkpoint, require_weights
from pokesprite.config import VAEConfig, from_dict
from pokesprite.models.layers import CrossAttentionBlock, Downsample, ResBlock, Upsample

LOGVAR_RANGE = (-30.0, 20.0)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.groups
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c_prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c_prev, c, groups=g))
                c_prev = c
            if i < len(ch) - 1:
                blocks.append(Downsample(c))
        blocks.append(ResBlock(c_prev, c_prev, groups=g))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, c_prev)
        self.conv_out = nn.Conv2d(c_prev, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent_channels, 27, 27)


class Decoder(nn.Module):
    """Latent -> 216 px image; with ``context_dim`` it cross-attends to text after the mid block
    (27 px) and after the first upsample (54 px). Without, its modules are exactly the plain decoder's."""

    def __init__(self, cfg: VAEConfig, context_dim: int = 0):
        super().__init__()
        ch, g = cfg.channels[::-1], cfg.groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = ResBlock(ch[0], ch[0], groups=g)
        blocks: list[nn.Module] = []
        c_prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c_prev, c, groups=g))
                c_prev = c
            if i < len(ch) - 1:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, c_prev)
        self.conv_out = nn.Conv2d(c_prev, 3, 3, padding=1)
        self.first_up = next(i for i, b in enumerate(blocks) if isinstance(b, Upsample))
        self.text = context_dim > 0
        if self.text:
            if ch[0] % cfg.heads:
                raise ValueError(f"vae.model: decoder width {ch[0]} is not divisible by heads={cfg.heads}")
            self.mid_attn = CrossAttentionBlock(ch[0], context_dim, heads=cfg.heads, groups=g)
            self.up_attn = CrossAttentionBlock(ch[0], context_dim, heads=cfg.heads, groups=g)

    def forward(self, z, context=None, mask=None):
        check_context(self.text, context, mask)
        h = self.mid(self.conv_in(z))
        if self.text:
            h = self.mid_attn(h, context, mask)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.text and i == self.first_up:
                h = self.up_attn(h, context, mask)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 216, 216)


def check_context(text_conditioned: bool, context, mask) -> None:
    """A text-conditioned decoder needs the caption features; a plain one must not be given any."""
    if text_conditioned and context is None:
        raise ValueError("this VAE is text-conditioned (vae.model.text_conditioning): pass the caption "
                         "features as context=(B, L, context_dim) (and their mask) to decode/forward")
    if not text_conditioned and (context is not None or mask is not None):
        raise ValueError("this VAE is not text-conditioned (vae.model.text_conditioning is false) "
                         "but was given a context/mask; pass neither")


class VAE(nn.Module):
    """Image autoencoder; ``context_dim`` (the caption token width) is required when
    ``cfg.text_conditioning`` is set and ignored otherwise."""

    latent_scale: float = 1.0  # what the diffusion model multiplies latents by; set by from_checkpoint

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "VAE":
        """The VAE of a finished VAE stage's checkpoint (best.pt), from the file alone: in eval mode on
        ``device``, with the stage's ``latent_scale``, weights channels-last (``for_inference``)."""
        ckpt = require_weights(load_checkpoint(path, "vae"), path, "state_dict")
        if "latent_scale" not in ckpt:
            raise ValueError(f"{path}: has no latent scale; use the best.pt that the finished VAE stage writes")
        vae = cls(from_dict(VAEConfig, ckpt["config"], "vae.model"), context_dim=ckpt.get("context_dim") or 0)
        vae.load_state_dict(ckpt["state_dict"])
        vae.latent_scale = float(ckpt["latent_scale"])
        return vae.for_inference(device)

    def for_inference(self, device="cpu") -> "VAE":
        """This VAE in eval mode on ``device`` with channels-last weights: its convolutions then run
        channels-last, which encodes and decodes about 1.5x faster on 2 CPU cores (oneDNN; measured in
        the note of the change) also when gradients flow to the latents (stage 3). Training the VAE's
        own weights gains nothing from it, so the VAE stage keeps ``vae.train.channels_last``."""
        return self.to(device, memory_format=torch.channels_last).eval()

    def __init__(self, cfg: VAEConfig, context_dim: int = 0):
        super().__init__()
        if cfg.text_conditioning and context_dim <= 0:
            raise ValueError("vae.model.text_conditioning is true: build the VAE with "
                             "VAE(cfg, context_dim=<width of the caption token features>)")
        self.cfg = cfg
        self.context_dim = context_dim if cfg.text_conditioning else 0
        self.padded = cfg.image_size + (-cfg.image_size) % 8
        self.latent_size = self.padded // 8
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, self.context_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 215, 215) in [-1, 1] -> mean, logvar, each (B, latent_channels, 27, 27)."""
        pad = self.padded - x.shape[-1]
        x = F.pad(x, (0, pad, 0, pad), mode="replicate")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(*LOGVAR_RANGE).contiguous()  # whatever layout the convs used

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, latent_channels, 27, 27) -> (B, 3, 215, 215), unbounded (clamp to [-1, 1] for display).

        context (B, L, context_dim) and mask (B, L, True = real token): only for a text-conditioned VAE.
        """
        s = self.cfg.image_size
        return self.decoder(z, context, mask)[..., :s, :s].contiguous()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                context: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                noise: torch.Tensor | None = None):
        mean, logvar = self.encode(x)
        return self.decode(sample_posterior(mean, logvar, generator, noise), context, mask), mean, logvar


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) by reparameterisation (gradients flow to mean and logvar). The noise
    is ``noise`` when given, else drawn from ``generator`` on its device, else from the default
    generator of mean's device."""
    if noise is None:
        on = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=on, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
