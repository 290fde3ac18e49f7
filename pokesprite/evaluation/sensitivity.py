"""Text sensitivity: does the sprite change more with the prompt than with the seed?

Given a P x S grid of sprites (P prompts, S seeds), with a distance d between two sprites:

    prompt_change = mean of d(sprite[p, s], sprite[q, s]) over seeds s and prompt pairs p < q
    seed_change   = mean of d(sprite[p, s], sprite[p, t]) over prompts p and seed pairs s < t
    sensitivity   = prompt_change / seed_change

A model that ignores its text scores 0; one whose sprites vary as much with the prompt as with the
seed scores about 1; above 1, the prompt decides more than the noise does.
"""
from __future__ import annotations

from itertools import combinations
from typing import Callable

import torch


def text_sensitivity(grid: torch.Tensor, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
    """``grid``: (P, S, ...) items; ``distance(a, b)``: batched distances (K,) of item batches a, b (K, ...)."""
    p, s = grid.shape[:2]
    if p < 2 or s < 2:
        raise ValueError(f"text sensitivity needs at least 2 prompts and 2 seeds, got {p} x {s}")
    pairs_p = list(combinations(range(p), 2))
    pairs_s = list(combinations(range(s), 2))
    prompt_change = torch.cat([distance(grid[[i for i, _ in pairs_p], k], grid[[j for _, j in pairs_p], k])
                               for k in range(s)]).mean().item()
    seed_change = torch.cat([distance(grid[k, [i for i, _ in pairs_s]], grid[k, [j for _, j in pairs_s]])
                             for k in range(p)]).mean().item()
    ratio = prompt_change / seed_change if seed_change > 0 else float("inf")
    return {"prompt_change": prompt_change, "seed_change": seed_change, "text_sensitivity": ratio}
