"""Training augmentation done on whole batches on the training device: flip, rotation, colour jitter.

The training split stays on the device as uint8; each step indexes a batch and augments it here, so
no per-image Python work (and no host-to-device copy) happens in the training loop. The random draws
come from the device's default generator, whose state every checkpoint saves.

Semantics follow torchvision's ``RandomHorizontalFlip``, ``RandomRotation`` (bilinear, filled with the
background colour) and ``ColorJitter`` (brightness, contrast, saturation as blends with black, the
mean grey level and the grey image), with one difference: the three jitters are applied in a fixed
order (brightness, contrast, saturation) instead of a random order per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pokesprite.config import AugmentConfig

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma."""
    w = torch.tensor(GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor is per image (B,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grey(x), factor)


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by ``degrees`` (B,) about its centre, bilinear.

    Pixels that come from outside the image take the colour ``fill`` (3,); at the border the image
    and the fill are blended by the interpolated coverage, as torchvision does.
    """
    b, _, h, w = x.shape
    theta = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input coordinates (normalised to [-1, 1]); for a square image the
    # counter-clockwise rotation of the picture is the clockwise rotation of the sampling grid.
    matrix = torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                          torch.stack([sin * w / h, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(matrix, (b, 1, h, w), align_corners=False)
    with_mask = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image, coverage = out[:, :3], out[:, 3:]
    return image * coverage + fill.view(1, 3, 1, 1).to(x) * (1 - coverage)


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, background: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> augmented float (B, 3, H, W) in [-1, 1] on that device."""
    x = images.float().div_(255.0)
    n, device = len(x), x.device
    if cfg.hflip_prob > 0:
        flip = torch.rand(n, device=device) < cfg.hflip_prob
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if cfg.rotation_degrees > 0:
        fill = torch.tensor(background, dtype=x.dtype, device=device) / 255.0
        x = rotate(x, _uniform(n, -cfg.rotation_degrees, cfg.rotation_degrees, device), fill)
    if cfg.brightness > 0:
        x = adjust_brightness(x, _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, device))
    if cfg.contrast > 0:
        x = adjust_contrast(x, _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, device))
    if cfg.saturation > 0:
        x = adjust_saturation(x, _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, device))
    return x.mul_(2.0).sub_(1.0)

