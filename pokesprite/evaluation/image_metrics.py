"""PSNR and SSIM of RGB images (the sprites composited onto their background).

Both are per image, over all three channels, of uint8 images (data range 255); PSNR also takes float
images with their data range (2 for the models' [-1, 1]), which is how the VAE stage validates. PSNR
of identical images is infinite; it is capped at ``PSNR_CAP`` dB so that means stay finite. SSIM (Wang et al. 2004) uses an
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over the valid region of each channel.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

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


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) mean SSIM of image pairs (1 = identical)."""
    x, y = _float(a), _float(b)
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda t: F.conv2d(t, w, groups=3)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))

