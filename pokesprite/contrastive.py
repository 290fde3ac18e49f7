"""CLIP's contrastive loss and its temperature (Radford et al. 2021): the alignment scorer's training,
stage 3 and the evaluation's independent scorer share them. Torch only, so that a stage that scores
text against images depends on nothing else here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CLIP_SCALE = 100.0  # CLIP (Radford et al. 2021) clamps exp(logit_scale) at 100


def clip_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The CLIP temperature that multiplies the cosines: exp(logit_scale), clamped at 100 as in CLIP."""
    return logit_scale.exp().clamp(max=MAX_CLIP_SCALE)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021) of N (image, caption) pairs: the mean of
    the cross-entropies of each image over all captions and of each caption over all images, the
    matching pair being the target. ``scale`` multiplies the cosines (``clip_scale``).

    Without ``keep`` it computes exactly what open_clip's ``ClipLoss()`` (one process) does. With
    ``keep`` (N,) bool, only the rows where it is true take part, computed on all N rows: shapes never
    depend on ``keep`` and nothing is read on the host; 0 when fewer than two rows are kept (a
    contrastive loss needs two pairs). Left-out rows and columns get a logit of -1e4 instead of -inf,
    so that no softmax is over -inf alone (its gradient would be NaN); with logits of at most
    |scale| <= 100 they weigh exp(-1e4) = 0.
    """
    if keep is None:
        target = torch.arange(len(image_emb), device=image_emb.device)
        per_image = scale * image_emb @ text_emb.T  # (N, N): image i against caption j
        per_text = scale * text_emb @ image_emb.T
        return (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2
    logits = scale * image_emb.float() @ text_emb.float().T  # (N, N): image i against caption j
    pair = keep[:, None] & keep[None, :]
    logits = logits.masked_fill(~pair, -1e4)
    diag = logits.diagonal()
    per_row = (torch.logsumexp(logits, dim=1) - diag + torch.logsumexp(logits, dim=0) - diag) / 2
    kept = keep.sum()
    loss = torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / kept.clamp(min=1)
    return torch.where(kept >= 2, loss, torch.zeros_like(loss))
