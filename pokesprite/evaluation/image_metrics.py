"""PSNR and SSIM of RGB images (the sprites composited onto their background).

Both are per image, over all three channels, of uint8 images (data range 255); PSNR also takes float
images with their data range (2 for the models' [-1, 1]), which is how the VAE stage validates. PSNR
of identical images is infinite; it is capped at ``PSNR_CAP`` dB so that means stay finite. SSIM
(Wang et al. 2004) uses an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over the valid
region of each channel.
"""
from __future__ import annotations


import torch

PSNR_CAP = 100.0


def _float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
    return images.double()


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float | None = None) -> torch.Tensor:
    """(N,) PSNR in dB of image pairs, capped at PSNR_CAP: uint8 images (data range 255), or float
    images of ``data_range`` (computed in their dtype, on their device)."""
    if data_range is None:
        a, b, data_range = _float(a), _float(b), 255.0
    elif a.dtype == torch.uint8 or b.dtype == torch.uint8 or a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"data_range is for float (N, C, H, W) pairs, got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    mse = (a - b).square().mean(dim=(1, 2, 3))
    value = 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-30))
    return value.clamp(max=PSNR_CAP)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - k + 1, n) matrix whose row i holds the k-tap filter ``g`` at columns i..i+k-1: its product
    with a length-n signal is the signal's valid correlation with ``g``."""
    k = len(g)
    rows = torch.arange(n - k + 1, device=g.device)[:, None]
    band = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    band[rows, rows + torch.arange(k, device=g.device)] = g
    return band


def _blur(t: torch.Tensor) -> torch.Tensor:
    """Valid 11x11 Gaussian blur of every channel of (N, C, H, W): the window is separable, so it is
    two banded matrix products (H then W), about 15x faster on the CPU than a depthwise 2-D convolution
    in float64 and equal to it to 1e-12."""
    g = _gaussian().to(t.device)
    return _band(t.shape[-2], g).to(t.dtype) @ t @ _band(t.shape[-1], g).to(t.dtype).T


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) mean SSIM of image pairs (1 = identical)."""
    x, y = _float(a), _float(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = _blur(x), _blur(y)
    var_x = _blur(x * x) - mu_x.square()
    var_y = _blur(y * y) - mu_y.square()
    cov = _blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))

