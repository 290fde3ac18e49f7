"""Memorisation: is a generated sprite a near copy of a training sprite?

Each generated sprite is matched to its nearest training sprite in Inception pool space under the
cosine distance 1 - cos(a, b), as in the memorisation-informed FID (Bai et al. 2021, "On Training
Sample Memorization", KDD): cosine ignores the feature norm, which differs between blurry
generated sprites and sharp real ones, and compares what the features point at.

"Near copy" is calibrated on real data, not chosen by hand: real held-out (validation + test)
sprites were never trained on, so the distances from them to their nearest training sprites are
what a new, original sprite scores. The threshold is a low percentile of those distances (the
1st by default): a generated sprite closer than that to a training sprite is closer than 99% of
genuinely new Pokemon are, and counts as a near copy. ``memorisation_rate`` is the share of
generated sprites at or below the threshold ("at": an exact copy still counts when the threshold is
0, as it is when a held-out sprite duplicates a training one). A generator whose sprites are as new
as the real held-out ones scores about the percentile (0.01); one that copies scores more.
"""
from __future__ import annotations

import torch


def cosine_distances(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) float64 distances 1 - cos, in [0, 2] (a zero vector is at 1 from all)."""
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) of one width, got {tuple(query.shape)} "
                         f"and {tuple(bank.shape)}")
    q = torch.nn.functional.normalize(query.double(), dim=1)
    b = torch.nn.functional.normalize(bank.double(), dim=1)
    return (1.0 - q @ b.T).clamp(min=0.0)  # clamp: round-off makes identical vectors -1e-16 apart


def nearest_neighbours(query_feats: torch.Tensor, bank_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the cosine distance to its nearest bank row and that row's index: (N,), (N,).

    Ties go to the lowest bank index.
    """
    if len(bank_feats) == 0:
        raise ValueError("nearest_neighbours needs a non-empty bank")
    dist, index = cosine_distances(query_feats, bank_feats).min(dim=1)
    return dist, index


def copy_threshold(held_feats: torch.Tensor, train_feats: torch.Tensor, percentile: float = 1.0) -> float:
    """The ``percentile``-th percentile of the held-out sprites' nearest-training-neighbour distances.

    Percentiles interpolate linearly between order statistics (numpy's default): with the n sorted
    distances d_0 <= ... <= d_{n-1}, position p / 100 * (n - 1).
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    dist, _ = nearest_neighbours(held_feats, train_feats)
    return float(torch.quantile(dist, percentile / 100.0))


def memorisation_rate(dist: torch.Tensor, threshold: float) -> float:
    """Share of generated sprites whose nearest-training distance is at most ``threshold``."""
    if len(dist) == 0:
        raise ValueError("memorisation_rate needs at least one distance")
    return float((dist <= threshold).double().mean())


def closest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest distances (fewer if there are fewer), closest first; ties by index."""
    order = torch.sort(dist, stable=True).indices
    return order[:k]
