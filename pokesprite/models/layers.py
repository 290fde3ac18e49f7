"""Building blocks shared by the VAE and the U-Net."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM's U-Net). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a residual path; optionally shifted by a time embedding."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, time_dim: int = 0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
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


def mha_to_attention(state_dict: dict, prefix: str) -> None:
    """Rename, in place, the weights of an ``nn.MultiheadAttention`` stored under ``prefix`` to the
    names ``Attention`` uses, so checkpoints written before it load unchanged.

    MHA keeps q, k, v as one stacked ``in_proj_weight`` (3 dim, dim) when kdim == dim, else as
    ``q_proj_weight`` (dim, dim), ``k_proj_weight`` and ``v_proj_weight`` (dim, kdim); the biases are
    always one stacked ``in_proj_bias`` (3 dim,); the output layer is ``out_proj``.
    """
    if prefix + "in_proj_weight" in state_dict:
        for name, w in zip("qkv", state_dict.pop(prefix + "in_proj_weight").chunk(3)):
            state_dict[f"{prefix}{name}.weight"] = w
    for name in "qkv":
        if f"{prefix}{name}_proj_weight" in state_dict:
            state_dict[f"{prefix}{name}.weight"] = state_dict.pop(f"{prefix}{name}_proj_weight")
    if prefix + "in_proj_bias" in state_dict:
        for name, b in zip("qkv", state_dict.pop(prefix + "in_proj_bias").chunk(3)):
            state_dict[f"{prefix}{name}.bias"] = b
    for kind in ("weight", "bias"):
        if f"{prefix}out_proj.{kind}" in state_dict:
            state_dict[f"{prefix}out.{kind}"] = state_dict.pop(f"{prefix}out_proj.{kind}")


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, sec. 3.2) computed by
    ``F.scaled_dot_product_attention``, which runs a fused kernel (flash, memory-efficient) where it can.

    x: (B, N, dim) queries; context: (B, L, kdim) keys and values (x itself when None);
    mask: (B, L), True where a key is a real token. A row whose keys are all masked attends to
    nothing: its attention output is zero, so the layer returns ``out.bias`` there and never NaN,
    as ``nn.MultiheadAttention`` does.

    It computes what ``nn.MultiheadAttention(dim, heads, kdim=kdim, vdim=kdim, batch_first=True)``
    does, is initialised like it from the same random numbers, and loads its state dicts.
    """

    def __init__(self, dim: int, heads: int, *, kdim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.kdim = kdim or dim
        # Built uninitialised; reset_parameters draws what nn.MultiheadAttention would.
        self.q = skip_init(nn.Linear, dim, dim)
        self.k = skip_init(nn.Linear, self.kdim, dim)
        self.v = skip_init(nn.Linear, self.kdim, dim)
        self.out = skip_init(nn.Linear, dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation, in its order: out_proj as a default nn.Linear, then
        xavier-uniform q, k, v (one stacked (3 dim, dim) matrix when kdim == dim), then zero biases."""
        self.out.reset_parameters()
        dim = self.q.out_features
        if self.kdim == dim:
            bound = math.sqrt(6.0 / (dim + 3 * dim))  # xavier bound of the stacked matrix, drawn row by row
            for lin in (self.q, self.k, self.v):
                nn.init.uniform_(lin.weight, -bound, bound)
        else:
            for lin in (self.q, self.k, self.v):
                nn.init.xavier_uniform_(lin.weight)
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.zeros_(lin.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        mha_to_attention(state_dict, prefix)  # checkpoints of the nn.MultiheadAttention era
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context

        def heads(t):  # (B, S, dim) -> (B, heads, S, dim / heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        attn_mask = has_key = None
        if mask is not None:
            mask = mask.bool()
            has_key = mask.any(-1)  # (B,)
            # A keyless row attends to every key (no -inf-only softmax), then its output is zeroed below.
            attn_mask = (mask | ~has_key[:, None])[:, None, None, :]  # (B, 1, 1, L), broadcast over heads, queries
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, dim / heads)
        if has_key is not None:
            h = h * has_key.to(h.dtype)[:, None, None, None]
        return self.out(h.transpose(1, 2).flatten(2))  # (B, N, dim)


class CrossAttentionBlock(nn.Module):
    """Self-attention over pixels, then cross-attention from pixels to text tokens, then an MLP.

    x: (B, C, H, W); context: (B, L, D) text tokens; context_mask: (B, L) True where a token is real.
    """

    def __init__(self, c: int, context_dim: int, *, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.proj_in = nn.Linear(c, c)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.self_attn = Attention(c, heads)
        self.cross_attn = Attention(c, heads, kdim=context_dim)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.proj_out = nn.Linear(c, c)
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        tokens = tokens + self.self_attn(self.ln1(tokens))
        tokens = tokens + self.cross_attn(self.ln2(tokens), context, context_mask)
        tokens = tokens + self.mlp(self.ln3(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
