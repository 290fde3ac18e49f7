"""A patch discriminator for the VAE's adversarial loss (pix2pix's PatchGAN, as latent diffusion uses it).

Isola et al. (2017) judge overlapping patches instead of whole images: a stack of 4x4 stride-2
convolutions whose output is one real/fake logit per receptive field (70 px for 3 layers). Latent
diffusion's autoencoders (Rombach et al. 2022, after Esser et al. 2021) add it to the L1 + perceptual
loss to restore the high-frequency detail that those losses blur. GroupNorm instead of BatchNorm, so
that small batches and evaluation mode behave alike.
"""
from __future__ import annotations

import torch
from torch import nn

from pokesprite.config import DiscriminatorConfig


class PatchDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = cfg.channels
        for i in range(1, cfg.layers + 1):
            c_out = cfg.channels * min(2 ** i, 8)
            stride = 2 if i < cfg.layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, h, w) patch logits."""
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), halved."""
    return 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(D(G(z)))."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, reduce=None) -> torch.Tensor:
    """Esser et al. (2021, eq. 7): ||grad rec|| / (||grad g|| + 1e-4) at the decoder's last layer, so the
    adversarial term pulls on the decoder about as hard as the reconstruction term does. Detached.
    ``reduce`` averages the two gradients over the processes that share a batch (``distributed.mean``)."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    if reduce is not None:
        rec_grad, g_grad = reduce(rec_grad), reduce(g_grad)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()
