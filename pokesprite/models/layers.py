"""Building blocks shared by the VAE and the U-Net."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM's U-Net). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a residual path; optionally shifted by a time embedding."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, time_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return h + self.skip(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: H -> ceil(H / 2), so 27 -> 14 keeps every pixel."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to an exact size (e.g. 7 -> 14 -> 27), then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size: tuple[int, int] | None = None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class CrossAttentionBlock(nn.Module):
    """Self-attention over pixels, then cross-attention from pixels to text tokens, then an MLP.

    x: (B, C, H, W); context: (B, L, D) text tokens; context_mask: (B, L) True where a token is real.
    """

    def __init__(self, c: int, context_dim: int, *, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.proj_in = nn.Linear(c, c)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.self_attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(c, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.proj_out = nn.Linear(c, c)
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        q = self.ln1(tokens)
        tokens = tokens + self.self_attn(q, q, q, need_weights=False)[0]
        pad = None if context_mask is None else ~context_mask.bool()
        tokens = tokens + self.cross_attn(self.ln2(tokens), context, context, key_padding_mask=pad,
                                          need_weights=False)[0]
        tokens = tokens + self.mlp(self.ln3(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
