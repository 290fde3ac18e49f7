"""Text-image retrieval metrics of a similarity matrix (row i = image i, column j = caption j).

Used by the evaluation (R-precision of generated sprites with both scorers), by stage 3's validation
and by the alignment model's training.
"""
from __future__ import annotations

import torch


def _wins(sim: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: does the diagonal beat every masked-in off-diagonal entry (ties count as losses)?"""
    others = sim.masked_fill(~mask, float("-inf"))
    return sim.diagonal() > others.amax(1)


def retrieval_accuracy(sim: torch.Tensor) -> float:
    """Top-1 image->text retrieval over all N captions: the rate at which an image's own caption
    scores strictly highest in its row (a tie with another caption counts as a miss)."""
    off_diag = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    return _wins(sim, off_diag).float().mean().item()


def r_precision(sim: torch.Tensor, candidates: int = 32, generator: torch.Generator | None = None) -> float:
    """R-precision (R=1): for each image, the rate at which its own caption ranks strictly first among
    itself and ``candidates - 1`` other captions drawn at random (without replacement) per image.

    With N < ``candidates`` every caption is a candidate, which equals ``retrieval_accuracy``.
    """
    n = len(sim)
    k = min(candidates, n) - 1
    noise = torch.rand(n, n, generator=generator).to(sim.device)
    noise.fill_diagonal_(float("inf"))  # never draw an image's own caption as a distractor
    picked = noise.topk(k, dim=1, largest=False).indices
    mask = torch.zeros(n, n, dtype=torch.bool, device=sim.device).scatter_(1, picked, True)
    return _wins(sim, mask).float().mean().item()


def mean_matched_cosine(sim: torch.Tensor) -> float:
    """Mean cosine of each image with its own caption (the diagonal)."""
    return sim.diagonal().mean().item()


def retrieval_metrics(sim: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Top-1, R-precision@32 (seeded candidates) and mean matched cosine of a similarity matrix."""
    return {"top1": retrieval_accuracy(sim),
            "r_precision": r_precision(sim, generator=torch.Generator().manual_seed(seed)),
            "matched_cosine": mean_matched_cosine(sim)}
