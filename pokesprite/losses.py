"""Training losses: VGG perceptual distance, free-bits KL with its annealed weight, noise prediction (CLIP's
contrastive loss is in ``pokesprite.contrastive``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.models.vgg import load_vgg


def unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale the channel vector at every position to unit length (LPIPS), so each block counts alike."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Distance between frozen-VGG features of a reconstruction and its target (LPIPS without the
    learned per-channel weights).

    Both images are resized to ``size`` (the VGG's cost grows with its square), fed through the first
    ``blocks`` VGG blocks, and at every position the unit-length channel vectors are compared: squared
    Euclidean distance (0..4), averaged over positions and batch, then over blocks.
    """

    def __init__(self, net: str = "vgg19", size: int = 112, blocks: int = 3, vgg: nn.Module | None = None):
        super().__init__()
        self.vgg = vgg if vgg is not None else load_vgg(net)  # ``vgg``: a ready feature network instead
        self.size = size
        self.blocks = blocks

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-2:] != (self.size, self.size):
            # float32: the antialiased resize has no bfloat16 kernel on the CPU (autocast leaves it alone)
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return [unit_channels(f) for f in self.vgg(x, blocks=self.blocks)]

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """recon, target: (B, 3, H, W) RGB in [-1, 1] -> scalar; gradients flow to ``recon`` only."""
        with torch.no_grad():
            target_feats = self.features(target)
        dists = [(a - b).pow(2).sum(dim=1).mean() for a, b in zip(self.features(recon), target_feats)]
        return torch.stack(dists).mean()

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distances (B,) between two batches in [-1, 1]: the loss above, as a metric."""
        return self.feature_distance(self.features(a), self.features(b))

    @staticmethod
    def feature_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """``distance`` of two batches from their ``features`` (so that each image's are computed once)."""
        return torch.stack([(fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2)) for fa, fb in zip(a, b)]).mean(0)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) in nats, per element (same shape as ``mean``)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_free_bits(mean: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The mean ``gaussian_kl`` of a (B, C, H, W) posterior, with a floor of ``free_bits`` nats per
    latent element, applied channel by channel.

    Each channel's KL (nats per element, averaged over batch and positions) is clamped below at
    ``free_bits`` before averaging over channels, so a channel carrying less information than the
    floor is not pushed further towards the prior (its gradient is zero) - this keeps channels from
    collapsing. With ``free_bits=0`` it is the plain mean KL per element.

    ``reduce`` turns this batch's per-channel KL into the global batch's when the batch is split over
    processes (``distributed.mean``): which channels sit at the floor is then decided as one process
    with the whole batch would decide it.
    """
    per_channel = gaussian_kl(mean, logvar).transpose(0, 1).flatten(1).mean(dim=1)  # (C,)
    decide = reduce(per_channel.detach()) if reduce is not None else per_channel
    return torch.where(decide >= free_bits, per_channel, torch.full_like(per_channel, free_bits)).mean()


def kl_weight_at(epoch: int, final: float, anneal_epochs: int) -> float:
    """Linear KL warm-up: 0 at epoch 0 (counted from 0), ``final`` from ``anneal_epochs`` on."""
    if anneal_epochs <= 0:
        return final
    return final * min(1.0, epoch / anneal_epochs)


def noise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion prediction loss (of eps or v): "huber" (smooth L1, beta 1) or "mse".

    Without ``weight``: the mean over every element. With ``weight`` (B,): each sample's loss is its
    mean over the other dims, and the result is mean_b(weight_b * loss_b) - the batch mean of the
    weighted losses, not divided by the weights' sum, as Min-SNR weighting (Hang et al. 2023) defines it.
    """
    if kind not in ("huber", "mse"):
        raise ValueError(f"unknown noise loss {kind!r}; expected huber or mse")
    reduction = "mean" if weight is None else "none"
    if kind == "huber":
        loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction=reduction)
    else:
        loss = F.mse_loss(pred, target, reduction=reduction)
    if weight is None:
        return loss
    per_sample = loss.flatten(1).mean(dim=1)  # (B,)
    if weight.shape != per_sample.shape:
        raise ValueError(f"noise_loss: weight must have one entry per sample {tuple(per_sample.shape)}, "
                         f"got {tuple(weight.shape)}")
    return (weight.to(per_sample.dtype) * per_sample).mean()
