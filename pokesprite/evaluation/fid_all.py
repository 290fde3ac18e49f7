"""FID/KID of many generated sprites against every real sprite: the few-shot GAN protocol.

With a few hundred training images, the few-shot GAN literature (DiffAugment, Zhao et al. 2020;
ADA, Karras et al. 2020; FastGAN, Liu et al. 2021) draws thousands of images and compares them with
ALL the real images of the dataset, so that the generated side of FID carries little sampling noise
and the numbers compare with theirs. Here: ``evaluate.fid_samples`` sprites whose captions cycle
through every caption of the dataset (all splits, ascending Pokedex number), against the Inception
features of all real sprites that the reference stage stored. The held-out ``fid`` / ``kid``
(one sprite per validation and test caption) are reported beside it unchanged.
"""
from __future__ import annotations

import torch

from pokesprite.evaluation.fid import frechet_distance, kernel_inception_distance


def cycled_rows(rows: list[dict], n: int) -> list[dict]:
    """``n`` index rows (caption and number): every row in ascending ``number`` order, repeated from the
    start as often as needed; the evaluation draws one sprite per row, with ``row["caption"]``."""
    if n < 0:
        raise ValueError(f"cannot draw {n} sprites")
    if not rows and n:
        raise ValueError("no captions to cycle through")
    ordered = sorted(rows, key=lambda r: r["number"])
    return [ordered[i % len(ordered)] for i in range(n)]


def fid_all(gen_feats: torch.Tensor, all_real_feats: torch.Tensor, *, subsets: int, subset_size: int,
            seed: int) -> dict[str, float]:
    """``fid_all``, ``kid_all``, ``kid_all_std`` of (N, D) generated against (M, D) real features."""
    kid, kid_std = kernel_inception_distance(gen_feats, all_real_feats, subsets=subsets,
                                             subset_size=subset_size, seed=seed)
    return {"fid_all_generated_sprites": len(gen_feats), "fid_all": frechet_distance(gen_feats, all_real_feats),
            "kid_all": kid, "kid_all_std": kid_std}
