"""Text-conditioned U-Net that predicts the noise (or v, ``diffusion.prediction``) in 27x27x8 latents.

Resolutions 27 -> 14 -> 7 (stride-2 convs round up, upsampling resizes to the skip's exact size,
so no pixel is dropped). The U-Net knows nothing of the noise schedule: it maps
(noisy latent, timestep, text tokens) -> predicted noise or v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.config import UNetConfig
from pokesprite.models.layers import CrossAttentionBlock, Downsample, ResBlock, Upsample, timestep_embedding


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, context_dim: int):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.channels, cfg.groups
        self.time_dim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], self.time_dim), nn.SiLU(),
                                      nn.Linear(self.time_dim, self.time_dim))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)

        def res(a, b):
            return ResBlock(a, b, groups=g, time_dim=self.time_dim)

        def attn(c, on):
            return CrossAttentionBlock(c, context_dim, heads=cfg.heads, groups=g) if on else None

        self.down = nn.ModuleList()
        skip_ch = [ch[0]]
        c_prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                self.down.append(nn.ModuleList([res(c_prev, c), attn(c, cfg.attention[i])]))
                c_prev = c
                skip_ch.append(c)
            if i < len(ch) - 1:
                self.down.append(Downsample(c))
                skip_ch.append(c)

        self.mid1 = res(c_prev, c_prev)
        self.mid_attn = CrossAttentionBlock(c_prev, context_dim, heads=cfg.heads, groups=g)
        self.mid2 = res(c_prev, c_prev)

        self.up = nn.ModuleList()
        for i in reversed(range(len(ch))):
            c = ch[i]
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(nn.ModuleList([res(c_prev + skip_ch.pop(), c), attn(c, cfg.attention[i])]))
                c_prev = c
            if i > 0:
                self.up.append(Upsample(c))

        self.norm_out = nn.GroupNorm(g, c_prev)
        self.conv_out = nn.Conv2d(c_prev, cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting zero noise
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 8, 27, 27); t: (B,) integer steps; context: (B, L, D); mask: (B, L) -> (B, 8, 27, 27)."""
        t_emb = self.time_mlp(timestep_embedding(t, self.cfg.channels[0]))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = block(h, t_emb)
                if attn is not None:
                    h = attn(h, context, context_mask)
            skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, t_emb), context, context_mask), t_emb)

        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, size=skips[-1].shape[-2:])
            else:
                block, attn = layer
                h = block(torch.cat([h, skips.pop()], dim=1), t_emb)
                if attn is not None:
                    h = attn(h, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
