"""The evaluate stage, as a pure function of one trained pipeline, the scorers and the data.

``evaluate`` measures (with the reference features and scorer of ``reference.py``):

- reconstruction: the VAE's encode (mean) -> decode of the test-split sprites: PSNR, SSIM and the
  VGG (LPIPS-style) distance;
- FID / KID: one sprite per validation and test caption (seeded; ``max_captions`` takes the first N)
  against every real sprite; the
  same numbers for the real validation + test sprites against the real training ones are the floor
  that a perfect generator would reach at this N;
- text alignment: R-precision among ``candidates`` captions with the stage-3 scorer and with the
  independent scorer, after stage 3 and before it (stage-2 text encoder), with real sprites as the
  ceiling;
- text sensitivity and the sample grid: fixed prompts x fixed seeds.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pokesprite.config import DataConfig, EvaluateConfig
from pokesprite.data.dataset import SpriteDataset, read_index, to_uint8, to_unit_range
from pokesprite.evaluation.fid import frechet_distance, kernel_inception_distance
from pokesprite.evaluation.grid import labelled_grid
from pokesprite.evaluation.image_metrics import psnr, ssim
from pokesprite.evaluation.inception import inception_features, load_inception
from pokesprite.evaluation.reference import EVAL_SPLITS, load_reference, r_precision_at
from pokesprite.evaluation.sensitivity import text_sensitivity
from pokesprite.models.alignment import similarity_matrix

log = logging.getLogger(__name__)

@torch.no_grad()
def reconstruct(pipeline, images: torch.Tensor, captions: list[str], batch_size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the VAE's uint8 reconstructions (posterior mean, no sampling)."""
    device, out = pipeline.device, []
    pipeline.vae.eval()
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i:i + batch_size]).to(device)
        mean, _ = pipeline.vae.encode(x)
        tok = pipeline.text.tokenize(captions[i:i + batch_size], device) if pipeline.vae.cfg.text_conditioning else None
        out.append(to_uint8(pipeline.decode(mean * pipeline.latent_scale, tok)).cpu())
    return torch.cat(out)


def sample(pipeline, prompts: list[str], seed: int, cfg: EvaluateConfig) -> np.ndarray:
    """The pipeline's sprites with the evaluation's sampler settings (empty / 0 = the model's own)."""
    return pipeline(prompts, seed=seed, num_steps=cfg.steps or None, sampler=cfg.sampler or None)


def draw(pipeline, prompts: list[str], cfg: EvaluateConfig, desc: str) -> torch.Tensor:
    """One sprite per prompt, batch b drawn with seed ``cfg.seed + b``: uint8 (N, 3, H, W)."""
    from pokesprite.train.loop import progress

    out = []
    starts = range(0, len(prompts), cfg.batch_size)
    for b, i in enumerate(progress(starts, desc=desc, leave=False)):
        out.append(torch.from_numpy(sample(pipeline, prompts[i:i + cfg.batch_size], cfg.seed + b, cfg)))
    return torch.cat(out).permute(0, 3, 1, 2).contiguous()


def _alignment(images: torch.Tensor, feats: torch.Tensor, captions: list[str], alignment, scorer,
               cfg: EvaluateConfig, suffix: str) -> dict:
    sim = similarity_matrix(alignment, to_unit_range(images).to(alignment.device), captions)
    return {f"stage3_scorer_r_precision{suffix}": r_precision_at(sim, cfg),
            f"independent_r_precision{suffix}": r_precision_at(scorer.similarity(feats, captions), cfg)}


def evaluate(pipeline, *, before_text, alignment, processed_dir: Path, reference_dir: Path,
             data_cfg: DataConfig, cfg: EvaluateConfig, perceptual) -> tuple[dict, "PIL.Image.Image"]:
    """Every metric of one pipeline (see the module docstring) and its sample grid.

    ``before_text``: the stage-2 text encoder (for the before-stage-3 alignment numbers), or None.
    ``perceptual``: a ``PerceptualLoss`` on the pipeline's device (VGG distance).
    """
    device = pipeline.device
    ref, scorer = load_reference(reference_dir)
    rows = read_index(processed_dir)
    by_number = {n: i for i, n in enumerate(ref["numbers"])}
    if sorted(by_number) != sorted(r["number"] for r in rows):
        raise ValueError(f"{reference_dir}: its sprites differ from {processed_dir}; rerun the reference stage")
    metrics: dict[str, float] = {"candidates": cfg.candidates, "chance_r_precision": 1 / cfg.candidates}

    # Reconstruction of the test split.
    test = SpriteDataset(processed_dir, "test", data_cfg)
    rec = reconstruct(pipeline, test.images, test.captions, cfg.batch_size)
    dist = torch.cat([perceptual.distance(to_unit_range(rec[i:i + 16]).to(device),
                                          to_unit_range(test.images[i:i + 16]).to(device)).cpu()
                      for i in range(0, len(rec), 16)])
    metrics.update({"recon_test_sprites": len(test), "recon_psnr": psnr(rec, test.images).mean().item(),
                    "recon_ssim": ssim(rec, test.images).mean().item(), "recon_vgg_distance": dist.mean().item()})

    # One sprite per validation/test caption; FID/KID against all real sprites.
    held = [r for r in rows if r["split"] in EVAL_SPLITS]
    held = held[:cfg.max_captions] if cfg.max_captions else held
    captions = [r["caption"] for r in held]
    inception = load_inception(device)
    generated = draw(pipeline, captions, cfg, "evaluate: drawing")
    gen_feats = inception_features(inception, generated, device=device)
    real_feats = ref["features"]
    kid, kid_std = kernel_inception_distance(gen_feats, real_feats, subsets=cfg.kid_subsets,
                                             subset_size=cfg.kid_subset_size, seed=cfg.seed)
    metrics.update({"generated_sprites": len(generated), "real_sprites": len(real_feats),
                    "fid": frechet_distance(gen_feats, real_feats), "kid": kid, "kid_std": kid_std})

    # Text alignment: generated after and before stage 3, and the real sprites as the ceiling.
    metrics.update(_alignment(generated, gen_feats, captions, alignment, scorer, cfg, ""))
    real_images = SpriteDataset(processed_dir, None, data_cfg)
    position = {r["number"]: i for i, r in enumerate(real_images.rows)}
    real_held = torch.stack([real_images.images[position[r["number"]]] for r in held])
    real_held_feats = real_feats[[by_number[r["number"]] for r in held]]
    metrics.update(_alignment(real_held, real_held_feats, captions, alignment, scorer, cfg, "_real"))
    if before_text is not None:
        after_text, pipeline.text = pipeline.text, before_text
        try:
            before = draw(pipeline, captions, cfg, "evaluate: drawing before stage 3")
        finally:
            pipeline.text = after_text
        before_feats = inception_features(inception, before, device=device)
        metrics.update(_alignment(before, before_feats, captions, alignment, scorer, cfg, "_before"))

    # Fixed prompts x fixed seeds: the grid and the text sensitivity.
    prompts = list(cfg.grid_prompts) + test.captions[:cfg.grid_test_captions]
    seeds = [cfg.seed + k for k in range(cfg.grid_seeds)]
    # Each sprite is drawn alone, so that one seed gives every prompt the same noise.
    grid = np.stack([np.concatenate([sample(pipeline, [p], s, cfg) for s in seeds]) for p in prompts])  # (P, S, H, W, 3)
    tiles = to_unit_range(torch.from_numpy(grid).permute(0, 1, 4, 2, 3))

    def vgg(a, b):
        return perceptual.distance(a.to(device), b.to(device)).cpu()

    metrics.update(text_sensitivity(tiles, vgg))
    return metrics, labelled_grid(grid, prompts, seeds)
