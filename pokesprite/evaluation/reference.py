"""The reference stage: what the evaluation compares against, computed from the real sprites only.

Experiments that change training do not redo it: Inception features of every real sprite (the
FID/KID reference) and the independent scorer (``scorer.py``) trained on the training split, with
its R-precision on the real validation + test sprites.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pokesprite.config import EvaluateConfig
from pokesprite.data.dataset import SpriteDataset
from pokesprite.evaluation.inception import inception_features, load_inception
from pokesprite.evaluation.scorer import IndependentScorer
from pokesprite.evaluation.retrieval import r_precision
from pokesprite.checkpoints import atomic_save, read

log = logging.getLogger(__name__)
FEATURES_FILE = "inception_features.pt"
SCORER_FILE = "independent_scorer.pt"
EVAL_SPLITS = ("val", "test")


def r_precision_at(sim: torch.Tensor, cfg: EvaluateConfig) -> float:
    return r_precision(sim, cfg.candidates, generator=torch.Generator().manual_seed(cfg.seed))


def build_reference(processed_dir: Path, cfg: EvaluateConfig, *, out_dir: Path,
                    device: str | torch.device = "cpu") -> dict:
    """Inception features of all real sprites + the independent scorer; returns their metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = SpriteDataset(processed_dir, None)
    splits = np.array([r["split"] for r in ds.rows])
    captions = ds.captions
    log.info("reference: Inception features of %d real sprites", len(ds))
    feats = inception_features(load_inception(device), ds.images, device=device)
    train = np.flatnonzero(splits == "train")
    held = np.flatnonzero(np.isin(splits, EVAL_SPLITS))
    scorer = IndependentScorer.fit(feats[train], [captions[i] for i in train], dim=cfg.scorer_dim,
                                   epochs=cfg.scorer_epochs, seed=cfg.seed)
    atomic_save({"numbers": [r["number"] for r in ds.rows], "splits": splits.tolist(), "features": feats},
                out_dir / FEATURES_FILE)
    scorer.save(out_dir / SCORER_FILE)
    sim = scorer.similarity(feats[held], [captions[i] for i in held])
    return {"real_sprites": len(ds), "scorer_train_sprites": len(train),
            "independent_r_precision_real": r_precision_at(sim, cfg)}


def load_reference(ref_dir: Path) -> tuple[dict, IndependentScorer]:
    ref_dir = Path(ref_dir)
    path = ref_dir / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the reference stage first (dvc repro reference)")
    return read(path), IndependentScorer.load(ref_dir / SCORER_FILE)
