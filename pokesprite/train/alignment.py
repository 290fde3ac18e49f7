"""Training of the alignment model's heads (``pokesprite.models.alignment``) on cached tower features.

The towers are frozen, so ``train_alignment`` runs them once over the data and trains only the
projection heads and the temperature on the cached features (seconds on a CPU), with CLIP's
contrastive loss (``pokesprite.contrastive.clip_loss``), on the shared training loop
(``pokesprite.train.loop.fit``); the epoch with the lowest validation loss is kept.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pokesprite.checkpoints import load_checkpoint
from pokesprite.config import AlignmentConfig, TrainConfig
from pokesprite.evaluation.retrieval import retrieval_metrics
from pokesprite.contrastive import clip_loss
from pokesprite.models.alignment import AlignmentModel, batched_apply, one_thread
from pokesprite.tracking import Tracker
from pokesprite.train import distributed
from pokesprite.train.batches import batch_indices, steps_per_epoch
from pokesprite.train.loop import Stage, fit

logger = logging.getLogger(__name__)
HEADS_KIND = "alignment_heads"  # the checkpoints fit writes while training the heads
WEIGHT_DECAY = 0.1  # AdamW on the heads: ~700 pairs overfit fast (the first version's value, untuned)


def cache_features(model: AlignmentModel, images: torch.Tensor, captions: list[str],
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen towers once: (N, image_dim) and (N, text_dim) features on CPU."""
    was_training = model.training
    model.eval()
    img = batched_apply(model.image_features, images, batch_size, model.device)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # batches of similar length pad less
    by_length = batched_apply(model.text_features, [captions[i] for i in order], batch_size, model.device)
    txt = torch.empty_like(by_length)
    txt[order] = by_length
    model.train(was_training)
    return img, txt


@torch.no_grad()
def evaluate_cached(model: AlignmentModel, img: torch.Tensor, txt: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Loss over the whole set at once, plus retrieval metrics, from cached tower features."""
    was_training = model.training
    model.eval()
    zi, zt = model.embed_image(img), model.embed_text(txt)
    metrics = {"loss": clip_loss(zi, zt, model.scale).item(), **retrieval_metrics((zi @ zt.T).cpu(), seed)}
    model.train(was_training)
    return metrics


class Heads(nn.Module):
    """What training changes in an ``AlignmentModel`` (its two heads and the temperature), shared with
    it, as the model that ``fit`` trains and checkpoints (the frozen towers stay out of checkpoints)."""

    def __init__(self, model: AlignmentModel):
        super().__init__()
        self.text_head, self.image_head, self.logit_scale = model.text_head, model.image_head, model.logit_scale


def fit_heads(model: AlignmentModel, cfg: AlignmentConfig, train: tuple[torch.Tensor, torch.Tensor],
              val: tuple[torch.Tensor, torch.Tensor] | None = None, *, seed: int, tracker: Tracker | None = None,
              out_dir: Path | None = None) -> list[dict]:
    """Train the heads and temperature on cached (image, text) tower features with the shared ``fit``
    (AdamW with ``WEIGHT_DECAY``, one-cycle learning rate peaking at ``cfg.lr``, the stability guard);
    returns its history.

    Each step is ``clip_loss`` (open_clip's ``ClipLoss``) over a seeded shuffled batch of ``cfg.batch_size`` pairs (the
    temperature's exponential is capped at 100, as in CLIP). The heads' standardisation is fitted on
    ``train`` first. Each epoch is validated on the whole validation set as one batch (``val_loss``,
    ``val_top1``, ``val_r_precision``, ``val_matched_cosine``; on the training set when there is no
    validation set of 2 or more pairs), and the epoch with the lowest ``val_loss`` is restored at the
    end. Checkpoints go to ``out_dir`` (a temporary folder when None).

    Under ``torchrun`` every process computes the whole batch (the heads are a few matrix products on
    cached features: splitting them would cost more in communication than it saves), so dropout and
    the contrastive loss are exactly one process's; DDP's average of equal gradients is that gradient.
    """
    tr_img, tr_txt = train
    check = val if val is not None and len(val[0]) >= 2 else train
    model.image_head.fit_stats(tr_img)
    model.text_head.fit_stats(tr_txt)
    heads = Heads(model)
    g = torch.Generator().manual_seed(seed)
    n, bs = len(tr_img), min(cfg.batch_size, len(tr_img))

    def loss(idx, epoch):
        idx = idx.to(tr_img.device)
        value = clip_loss(model.embed_image(tr_img[idx]), model.embed_text(tr_txt[idx]), model.scale)
        return value, {"logit_scale": model.scale.detach()}

    def validate(epoch):
        return {f"val_{k}": v for k, v in evaluate_cached(model, *check, seed).items()}

    stage = Stage(name=HEADS_KIND, model=heads, loss=loss, validate=validate,
                  export=lambda: {"heads": model.trained_state()}, generator=g,
                  batches=lambda epoch: batch_indices(n, bs, shuffle=True, generator=g),
                  steps_per_epoch=steps_per_epoch(n, bs), config=asdict(cfg), device=model.device)
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=bs, lr=cfg.lr, weight_decay=WEIGHT_DECAY,
                            save_every=cfg.epochs, checkpoint_every=0)
    model.train()
    with contextlib.ExitStack() as stack:
        folder = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        with one_thread(tr_img.device):
            result = fit(stage, train_cfg, out_dir=folder, tracker=tracker)
        if distributed.is_main():  # under torchrun the others stop here (process 0 writes the scorer)
            model.load_trained_state(load_checkpoint(folder / "best.pt", HEADS_KIND)["heads"])
    model.eval()
    return result.history


def train_alignment(cfg: AlignmentConfig, train_images: torch.Tensor, train_captions: list[str],
                    val_images: torch.Tensor | None, val_captions: list[str] | None, *, seed: int, device="cpu",
                    tracker: Tracker | None = None) -> tuple[AlignmentModel, list[dict]]:
    """Build an ``AlignmentModel``, cache its towers' features once, train its heads; return it frozen.

    Images are (N, 3, H, W) in [-1, 1]. See ``fit_heads`` for the training and the model selection
    (lowest validation CLIP loss). Reseeds torch's global RNG with ``seed`` (head initialisation, dropout).
    """
    torch.manual_seed(seed)
    model = AlignmentModel(dim=cfg.dim, image_size=cfg.image_size).to(device)
    t0 = time.perf_counter()
    train = tuple(t.to(device) for t in cache_features(model, train_images, train_captions, cfg.batch_size))
    val = None
    if val_images is not None and val_captions:
        val = tuple(t.to(device) for t in cache_features(model, val_images, val_captions, cfg.batch_size))
    logger.info("alignment: cached %d train / %d val tower features in %.1fs", len(train[0]),
                len(val[0]) if val else 0, time.perf_counter() - t0)
    t0 = time.perf_counter()
    history = fit_heads(model, cfg, train, val, seed=seed, tracker=tracker)
    best = min(history, key=lambda h: h["val_loss"])
    logger.info("alignment: trained heads for %d epochs in %.1fs; best %s", len(history), time.perf_counter() - t0,
                {k: round(v, 4) for k, v in best.items()})
    return model.freeze(), history
