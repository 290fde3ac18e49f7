"""The evaluate stage, as a pure function of one trained pipeline, the scorers and the data.

``evaluate`` measures (with the reference features and scorer of ``reference.py``):

- reconstruction: the VAE's encode (mean) -> decode of the test-split sprites: PSNR, SSIM and the
  VGG (LPIPS-style) distance;
- FID / KID: one sprite per validation and test caption (seeded; ``max_captions`` takes N of them,
  evenly spaced) against every real sprite; ``fid_real`` / ``kid_real``, the same measures for the
  real sprites of those captions, are the floor a perfect generator would reach at this N;
- text alignment: R-precision among ``candidates`` captions with the stage-3 scorer and with the
  independent scorer, after stage 3 and before it (stage-2 text encoder), with real sprites as the
  ceiling;
- text sensitivity and the sample grid: fixed prompts x fixed seeds;
- ``fid_all`` / ``kid_all`` (``fid_all.py``, when ``fid_samples`` > 0): that many sprites, captions of
  every split cycled, against every real sprite;
- memorisation (``memorisation.py``): the share of generated sprites (the ``fid_samples`` set when
  drawn, else the held-out set) nearer to a training sprite than the real held-out sprites are, and
  the picture of the closest pairs;
- the guidance curve (``guidance_curve.py``, when ``guidance_scales`` is set): KID and independent
  R-precision of the held-out set at each guidance scale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pokesprite.config import EvaluateConfig
from pokesprite.data.dataset import SpriteDataset, read_index, spread, to_uint8, to_unit_range
from pokesprite.evaluation import guidance_curve as curve
from pokesprite.evaluation.drawing import draw, sample
from pokesprite.evaluation.fid import frechet_distance, kernel_inception_distance
from pokesprite.evaluation.fid_all import cycled_rows, fid_all
from pokesprite.evaluation.grid import labelled_grid, pairs_grid
from pokesprite.evaluation.image_metrics import psnr, ssim
from pokesprite.evaluation.inception import inception_features, load_inception
from pokesprite.evaluation.memorisation import closest, copy_threshold, memorisation_rate, nearest_neighbours
from pokesprite.evaluation.reference import EVAL_SPLITS, load_reference, r_precision_at
from pokesprite.evaluation.sensitivity import text_sensitivity
from pokesprite.models.alignment import similarity_matrix

log = logging.getLogger(__name__)
MEMORISATION_PAIRS = 8  # rows of memorisation.png: the closest (generated, nearest training sprite) pairs
# Raise when the code changes what the metrics measure (how sprites are seeded, the captions, the
# features): versions registered under another value are then not compared with each other.
PROTOCOL_VERSION = 1


def protocol(cfg: EvaluateConfig, captions: list[str], real_sprites: int) -> dict[str, str]:
    """How KID, FID and R-precision were measured, as ``{"fingerprint", "description"}``: the held-out
    captions (which the dataset, the split and ``max_captions`` decide), the real sprites, the sampler
    settings, the seed, the KID subsets, the candidates and the independent scorer. Two versions'
    numbers compare only under one fingerprint; the grid and the curve's settings are not part of it."""
    parts = {"version": PROTOCOL_VERSION, "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
             "sprites": len(captions), "real": real_sprites, "sampler": cfg.sampler or "model's own",
             "steps": cfg.steps or "model's own", "seed": cfg.seed, "precision": cfg.precision,
             "kid": [cfg.kid_subsets, cfg.kid_subset_size], "candidates": cfg.candidates,
             "scorer": [cfg.scorer_epochs, cfg.scorer_dim]}
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    sampler = cfg.sampler or "the model's sampler"
    steps = f"{cfg.steps} steps" if cfg.steps else "the model's steps"
    description = (f"{len(captions)} held-out captions {parts['captions'][:8]} vs {real_sprites} real, "
                   f"{sampler}, {steps}, seed {cfg.seed}, {cfg.precision}, KID "
                   f"{cfg.kid_subsets}x{cfg.kid_subset_size}, R-precision of {cfg.candidates}, scorer "
                   f"{cfg.scorer_epochs}x{cfg.scorer_dim}, protocol v{PROTOCOL_VERSION} [{fingerprint}]")
    return {"fingerprint": fingerprint, "description": description}


@dataclass
class Evaluation:
    """What ``evaluate`` measured and drew."""
    metrics: dict[str, float]
    images: dict[str, Image.Image]  # file name -> picture: sample_grid.png, memorisation.png, guidance_curve.png
    guidance_curve: list[dict] = field(default_factory=list)  # one {scale, kid, kid_std, r_precision} per scale
    protocol: dict[str, str] = field(default_factory=dict)  # how the metrics were measured (``protocol``)


@contextlib.contextmanager
def phase(what: str):
    """Log how long a part of the evaluation took: ``evaluate: <what> in 12.3 s``."""
    start = time.perf_counter()
    yield
    log.info("evaluate: %s in %.1f s", what, time.perf_counter() - start)


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


def same_encoder(a, b, captions: list[str]) -> bool:
    """Whether two text encoders are the same function of ``captions``: equal weights (transformer and
    projection) and equal tokens."""
    wa, wb = a.state_dict(), b.state_dict()
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k].to(wa[k].device)) for k in wa):
        return False
    ta, tb = a.tokenize(captions), b.tokenize(captions)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@torch.no_grad()
def vgg_distances(perceptual, tiles: torch.Tensor, device, batch_size: int = 16):
    """A (P, S) grid of tile indices and the VGG distance between the tiles of two index batches, for
    ``text_sensitivity``: the VGG features of each of the P x S ``tiles`` (in [-1, 1]) are computed
    once, not once for every pair the tile is in."""
    flat = tiles.flatten(0, 1)
    chunks = [perceptual.features(flat[i:i + batch_size].to(device)) for i in range(0, len(flat), batch_size)]
    features = [torch.cat(block) for block in zip(*chunks)]

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return perceptual.feature_distance([f[a] for f in features], [f[b] for f in features]).cpu()

    return torch.arange(len(flat)).view(tiles.shape[:2]), distance


def _alignment(images: torch.Tensor, feats: torch.Tensor, captions: list[str], alignment, scorer,
               cfg: EvaluateConfig, suffix: str = "") -> dict:
    sim = similarity_matrix(alignment, to_unit_range(images).to(alignment.device), captions)
    return {f"stage3_scorer_r_precision{suffix}": r_precision_at(sim, cfg),
            f"independent_r_precision{suffix}": r_precision_at(scorer.similarity(feats, captions), cfg)}


def memorisation_report(gen_images: torch.Tensor, gen_feats: torch.Tensor, gen_numbers: list[int], ref: dict,
                        real_images: SpriteDataset, cfg: EvaluateConfig) -> tuple[dict, Image.Image]:
    """Memorisation metrics of the generated set and the picture of its closest training pairs.

    ``gen_numbers``: the Pokedex number each sprite was drawn for (its caption's). Distances are
    cosine distances of Inception pool features (``memorisation.py``).
    """
    splits = np.asarray(ref["splits"])
    train = np.flatnonzero(splits == "train")
    held = np.flatnonzero(np.isin(splits, EVAL_SPLITS))
    bank = ref["features"][train]
    threshold = copy_threshold(ref["features"][held], bank, cfg.copy_percentile)
    dist, index = nearest_neighbours(gen_feats, bank)
    real_dist, _ = nearest_neighbours(ref["features"][held], bank)
    metrics = {"memorisation_sprites": len(dist), "memorisation_threshold": threshold,
               "memorisation_rate": memorisation_rate(dist, threshold),
               "memorisation_distance_median": float(dist.median()),
               "memorisation_distance_median_real": float(real_dist.median())}

    position = {r["number"]: i for i, r in enumerate(real_images.rows)}
    top = closest(dist, MEMORISATION_PAIRS).tolist()
    d, nearest = dist.tolist(), [ref["numbers"][train[i]] for i in index[top].tolist()]
    labels = [f"cosine distance {d[k]:.4f} {'<=' if d[k] <= threshold else '>'} {threshold:.4f}"
              f"{' NEAR COPY' if d[k] <= threshold else ''} | drawn for #{gen_numbers[k]}, nearest training "
              f"sprite #{n}" for k, n in zip(top, nearest)]
    left = gen_images[top].permute(0, 2, 3, 1).numpy()
    right = torch.stack([real_images.images[position[n]] for n in nearest]).permute(0, 2, 3, 1).numpy()
    return metrics, pairs_grid(left, right, labels, ("generated", "nearest training sprite"))


def before_stage3(pipeline, before_text, captions: list[str], generated: torch.Tensor, gen_feats: torch.Tensor,
                  inception, cfg: EvaluateConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out set drawn with the stage-2 text encoder ``before_text``, and its Inception features.

    When stage 3 kept the stage-2 encoder (no epoch beat it), the same weights, tokens and seeds draw
    the same sprites: those drawn after stage 3 (``generated``, ``gen_feats``) are returned.
    """
    if same_encoder(before_text, pipeline.text, captions + [""]):
        log.info("evaluate: stage 3 kept the stage-2 text encoder; its sprites are the ones before it")
        return generated, gen_feats
    after_text, pipeline.text = pipeline.text, before_text
    try:
        before = draw(pipeline, captions, cfg, "evaluate: drawing before stage 3")
    finally:
        pipeline.text = after_text
    return before, inception_features(inception, before, device=pipeline.device)


def guidance_curve_points(pipeline, captions: list[str], held_feats: torch.Tensor, inception,
                          real_feats: torch.Tensor, scorer, cfg: EvaluateConfig) -> list[dict]:
    """One {scale, kid, kid_std, r_precision} per ``cfg.guidance_scales``, in that order.

    ``held_feats``: the held-out set drawn at the model's own scale, reused when a scale equals it.
    """
    points = []
    for scale in cfg.guidance_scales:
        if scale == pipeline.sample.guidance_scale:
            feats = held_feats
        else:
            images = draw(pipeline, captions, cfg, f"evaluate: guidance {scale:g}", guidance_scale=scale)
            feats = inception_features(inception, images, device=pipeline.device)
        kid, kid_std = kernel_inception_distance(feats, real_feats, subsets=cfg.kid_subsets,
                                                 subset_size=cfg.kid_subset_size, seed=cfg.seed)
        points.append({"scale": scale, "kid": kid, "kid_std": kid_std,
                       "r_precision": r_precision_at(scorer.similarity(feats, captions), cfg)})
        log.info("evaluate: guidance %g: KID %.4f +- %.4f, independent R-precision %.3f", scale, kid, kid_std,
                 points[-1]["r_precision"])
    return points


def evaluate(pipeline, *, before_text, alignment, processed_dir: Path, reference_dir: Path,
             cfg: EvaluateConfig, perceptual) -> Evaluation:
    """Every metric of one pipeline (see the module docstring), its sample grid and other pictures.

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
    test = SpriteDataset(processed_dir, "test")
    with phase(f"reconstruction of {len(test)} test sprites"):
        rec = reconstruct(pipeline, test.images, test.captions, cfg.batch_size)
        dist = torch.cat([perceptual.distance(to_unit_range(rec[i:i + 16]).to(device),
                                              to_unit_range(test.images[i:i + 16]).to(device)).cpu()
                          for i in range(0, len(rec), 16)])
        metrics.update({"recon_test_sprites": len(test), "recon_psnr": psnr(rec, test.images).mean().item(),
                        "recon_ssim": ssim(rec, test.images).mean().item(), "recon_vgg_distance": dist.mean().item()})

    # One sprite per validation/test caption; FID/KID against all real sprites.
    held = [r for r in rows if r["split"] in EVAL_SPLITS]
    held = spread(held, cfg.max_captions)
    captions = [r["caption"] for r in held]
    inception = load_inception(device)
    with phase(f"drawing {len(captions)} sprites"):
        generated = draw(pipeline, captions, cfg, "evaluate: drawing")
    with phase(f"Inception features of {len(generated)} sprites, FID and KID"):
        gen_feats = inception_features(inception, generated, device=device)
        real_feats = ref["features"]
        kid, kid_std = kernel_inception_distance(gen_feats, real_feats, subsets=cfg.kid_subsets,
                                                 subset_size=cfg.kid_subset_size, seed=cfg.seed)
        metrics.update({"generated_sprites": len(generated), "real_sprites": len(real_feats),
                        "fid": frechet_distance(gen_feats, real_feats), "kid": kid, "kid_std": kid_std})
        # The floor: a generator that drew each caption's real sprite, under the same protocol and N.
        real_held_feats = real_feats[[by_number[r["number"]] for r in held]]
        kid_real, kid_real_std = kernel_inception_distance(real_held_feats, real_feats, subsets=cfg.kid_subsets,
                                                           subset_size=cfg.kid_subset_size, seed=cfg.seed)
        metrics.update({"fid_real": frechet_distance(real_held_feats, real_feats), "kid_real": kid_real,
                        "kid_real_std": kid_real_std})

    # Text alignment: generated after and before stage 3, and the real sprites as the ceiling.
    with phase("text alignment of the generated and the real sprites"):
        generated_alignment = _alignment(generated, gen_feats, captions, alignment, scorer, cfg)
        metrics.update(generated_alignment)
        real_images = SpriteDataset(processed_dir, None)
        position = {r["number"]: i for i, r in enumerate(real_images.rows)}
        real_held = torch.stack([real_images.images[position[r["number"]]] for r in held])
        metrics.update(_alignment(real_held, real_held_feats, captions, alignment, scorer, cfg, "_real"))
    if before_text is not None:
        with phase("text alignment before stage 3"):
            before, before_feats = before_stage3(pipeline, before_text, captions, generated, gen_feats, inception, cfg)
            # The same sprites as after stage 3 score the same.
            before_alignment = generated_alignment if before is generated else \
                _alignment(before, before_feats, captions, alignment, scorer, cfg)
            metrics.update({f"{k}_before": v for k, v in before_alignment.items()})

    # Fixed prompts x fixed seeds: the grid and the text sensitivity.
    prompts = list(cfg.grid_prompts) + test.captions[:cfg.grid_test_captions]
    seeds = [cfg.seed + k for k in range(cfg.grid_seeds)]
    with phase(f"sample grid of {len(prompts)} prompts x {len(seeds)} seeds and text sensitivity"):
        # Each sprite is drawn alone, so that one seed gives every prompt the same noise.
        grid = np.stack([np.concatenate([sample(pipeline, [p], s, cfg) for s in seeds])
                         for p in prompts])  # (P, S, H, W, 3)
        tiles = to_unit_range(torch.from_numpy(grid).permute(0, 1, 4, 2, 3))
        metrics.update(text_sensitivity(*vgg_distances(perceptual, tiles, device)))
        sampler, steps = cfg.sampler or pipeline.sample.sampler, cfg.steps or pipeline.sample.steps
        title = (f"pokesprite: {sampler}, {steps} steps, guidance {pipeline.sample.guidance_scale:g}; "
                 "a column per seed, a row per prompt")
        images = {"sample_grid.png": labelled_grid(grid, prompts, seeds, title=title)}

    # Many sprites (captions of every split cycled) against every real sprite; these, when drawn, are
    # also the set checked for memorisation (uint8 in memory: 139 kB a sprite, 0.7 GB for 5000).
    mem_images, mem_feats, mem_numbers = generated, gen_feats, [r["number"] for r in held]
    if cfg.fid_samples:
        with phase(f"fid_all of {cfg.fid_samples} sprites"):
            many = cycled_rows(rows, cfg.fid_samples)
            mem_images = draw(pipeline, [r["caption"] for r in many], cfg, "evaluate: drawing for fid_all")
            mem_feats = inception_features(inception, mem_images, device=device)
            mem_numbers = [r["number"] for r in many]
            metrics.update(fid_all(mem_feats, real_feats, subsets=cfg.kid_subsets,
                                   subset_size=cfg.kid_subset_size, seed=cfg.seed))
    with phase("memorisation"):
        mem_metrics, images["memorisation.png"] = memorisation_report(mem_images, mem_feats, mem_numbers, ref,
                                                                      real_images, cfg)
    metrics.update(mem_metrics)

    points = []
    if cfg.guidance_scales:
        with phase(f"guidance curve at {len(cfg.guidance_scales)} scales"):
            points = guidance_curve_points(pipeline, captions, gen_feats, inception, real_feats, scorer, cfg)
            metrics.update(curve.curve_metrics(points))
            images[curve.IMAGE_FILE] = curve.curve_image(points)
    return Evaluation(metrics, images, points, protocol(cfg, captions, len(real_feats)))
