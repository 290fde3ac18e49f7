"""Batches of a split that lives on the training device: shuffled index tensors, no DataLoader."""
from __future__ import annotations

import torch


def batch_indices(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Index tensors (on ``device``) that split ``n`` items into batches of ``batch_size``.

    Shuffled with ``generator`` (a seeded CPU generator, checkpointed with the stage). When shuffling
    and ``n > batch_size`` the last short batch is dropped, so every training step sees a full batch
    and an epoch is exactly ``steps_per_epoch(n, batch_size)`` steps; in order, every item is kept.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    drop_last = shuffle and n > batch_size
    stop = n - n % batch_size if drop_last else n
    return list(order[:stop].split(batch_size))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps in one shuffled epoch of ``n`` items (see ``batch_indices``)."""
    return n // batch_size if n > batch_size else 1
