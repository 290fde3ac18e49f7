"""FID and KID between two sets of Inception features.

FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)), from the means and
covariances of the features. It is biased upwards for small sets (a few hundred images), so KID is
reported beside it.

KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; its standard deviation over the subsets is
reported with it. Identical distributions give ~0 for both. (A set compared with itself gives a KID
slightly below 0: its random subsets share points, and the cross term counts their self-similarity.)
"""
from __future__ import annotations

import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets ``a`` (N, D) and ``b`` (M, D).

    With A and B the centred features, C_a = A^T A / (N - 1) and C_b = B^T B / (M - 1). The non-zero
    eigenvalues of C_a C_b are the squared singular values of K = A B^T / sqrt((N - 1)(M - 1)), so
    Tr((C_a C_b)^(1/2)) is the sum of K's singular values, and Tr(C_a) is ||A||^2 / (N - 1). That is
    the same number without a D x D matrix (D = 2048) or its square root: an SVD of N x M, exact and
    free of the round-off a matrix square root leaves, in a fraction of the time when N, M < D.
    """
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs two sets of >= 2 features of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    n, m = len(a) - 1, len(b) - 1
    tr_sqrt = torch.linalg.svdvals(a @ b.T).sum() / (n * m) ** 0.5
    value = (mu_a - mu_b).square().sum() + a.square().sum() / n + b.square().sum() / m - 2 * tr_sqrt
    return float(value.clamp(min=0))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, *, subsets: int = 100, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) over ``subsets`` pairs of random subsets of ``subset_size`` (capped at the smaller set)."""
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    a, b = a.double(), b.double()
    values = torch.tensor([_mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:size]],
                                          b[torch.randperm(len(b), generator=g)[:size]])
                           for _ in range(subsets)], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0
