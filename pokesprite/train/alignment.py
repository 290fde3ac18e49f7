"""Training of the alignment model's heads (``pokesprite.models.alignment``) on cached tower features.

The towers are frozen, so ``train_alignment`` runs them once over the data and trains only the
projection heads and the temperature on the cached features (seconds on a CPU), with open_clip's
contrastive ``ClipLoss``; the state with the lowest validation loss is kept.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pokesprite.config import AlignmentConfig
from pokesprite.evaluation.retrieval import retrieval_metrics
from pokesprite.models.alignment import MAX_LOGIT_SCALE, AlignmentModel, batched_apply, one_thread

logger = logging.getLogger(__name__)


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
def evaluate_cached(model: AlignmentModel, loss_fn, img: torch.Tensor, txt: torch.Tensor,
                    seed: int = 0) -> dict[str, float]:
    """Loss over the whole set at once, plus retrieval metrics, from cached tower features."""
    was_training = model.training
    model.eval()
    zi, zt = model.embed_image(img), model.embed_text(txt)
    metrics = {"loss": loss_fn(zi, zt, model.scale).item(), **retrieval_metrics((zi @ zt.T).cpu(), seed)}
    model.train(was_training)
    return metrics


def fit_heads(model: AlignmentModel, cfg: AlignmentConfig, train: tuple[torch.Tensor, torch.Tensor],
              val: tuple[torch.Tensor, torch.Tensor] | None = None, *, seed: int,
              log: Callable[[dict, int], None] | None = None, weight_decay: float = 0.1) -> list[dict]:
    """Train the heads and temperature on cached (image, text) tower features; returns per-epoch metrics.

    AdamW (cosine-decayed ``cfg.lr``; weight decay on the weight matrices only) with open_clip's
    ``ClipLoss`` for ``cfg.epochs`` epochs over seeded shuffled batches of ``cfg.batch_size``; the
    temperature is clamped at 100 after each step, as in CLIP. The heads' standardisation is fitted
    on ``train`` first. The state with the lowest validation ClipLoss (the whole validation set as one
    batch) is restored at the end; without ``val`` (or with fewer than 2 pairs) the last one is kept.
    ``log(metrics, epoch)`` (e.g. ``Tracker.log_metrics``) receives each epoch's metrics.
    """
    from open_clip.loss import ClipLoss

    tr_img, tr_txt = train
    has_val = val is not None and len(val[0]) >= 2
    model.image_head.fit_stats(tr_img)
    model.text_head.fit_stats(tr_txt)
    loss_fn = ClipLoss()
    head_params = [p for head in (model.text_head, model.image_head) for p in head.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in head_params if p.ndim > 1], "weight_decay": weight_decay},
                             {"params": [p for p in head_params if p.ndim <= 1] + [model.logit_scale],
                              "weight_decay": 0.0}], lr=cfg.lr)
    n = len(tr_img)  # a final batch of a single pair has nothing to contrast with: skipped
    batches = [(i, min(i + cfg.batch_size, n)) for i in range(0, n, cfg.batch_size) if n - i >= 2]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(batches)))
    g = torch.Generator().manual_seed(seed)

    history, best, best_loss = [], None, float("inf")
    t0 = time.perf_counter()
    model.train()
    with one_thread(tr_img.device):
        for epoch in range(1, cfg.epochs + 1):
            metrics = _train_epoch(model, loss_fn, opt, sched, tr_img, tr_txt, batches, g)
            if has_val:
                metrics.update({f"val_{k}": v for k, v in evaluate_cached(model, loss_fn, *val, seed).items()})
                if metrics["val_loss"] < best_loss:
                    best_loss, best = metrics["val_loss"], model.trained_state()
            history.append({"epoch": epoch, **metrics, "elapsed_s": time.perf_counter() - t0})
            if log is not None:
                log(metrics, epoch)
            logger.debug("alignment epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
    if best is not None:
        model.load_trained_state(best)
    model.eval()
    return history


def _train_epoch(model, loss_fn, opt, sched, img, txt, batches, generator) -> dict[str, float]:
    """One shuffled pass of ClipLoss steps over cached features; the temperature is clamped at 100."""
    perm = torch.randperm(len(img), generator=generator).to(img.device)
    total = 0.0
    for start, end in batches:
        idx = perm[start:end]
        loss = loss_fn(model.embed_image(img[idx]), model.embed_text(txt[idx]), model.scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        total += loss.item() * len(idx)
    return {"train_loss": total / max(1, sum(e - s for s, e in batches)), "logit_scale": model.scale.item()}


def train_alignment(cfg: AlignmentConfig, train_images: torch.Tensor, train_captions: list[str],
                    val_images: torch.Tensor | None, val_captions: list[str] | None, *, seed: int, device="cpu",
                    log: Callable[[dict, int], None] | None = None, weight_decay: float = 0.1,
                    **model_kwargs) -> tuple[AlignmentModel, list[dict]]:
    """Build an ``AlignmentModel``, cache its towers' features once, train its heads; return it frozen.

    Images are (N, 3, H, W) in [-1, 1]. See ``fit_heads`` for the training and the model selection
    (lowest validation ClipLoss). ``model_kwargs`` go to ``AlignmentModel`` (e.g. ``head_hidden``,
    ``vgg_blocks``). Reseeds torch's global RNG with ``seed`` (head initialisation, dropout).
    """
    torch.manual_seed(seed)
    model = AlignmentModel(dim=cfg.dim, image_size=cfg.image_size, **model_kwargs).to(device)
    t0 = time.perf_counter()
    train = tuple(t.to(device) for t in cache_features(model, train_images, train_captions, cfg.batch_size))
    val = None
    if val_images is not None and val_captions:
        val = tuple(t.to(device) for t in cache_features(model, val_images, val_captions, cfg.batch_size))
    logger.info("alignment: cached %d train / %d val tower features in %.1fs", len(train[0]),
                len(val[0]) if val else 0, time.perf_counter() - t0)
    history = fit_heads(model, cfg, train, val, seed=seed, log=log, weight_decay=weight_decay)
    best = min(history, key=lambda h: h.get("val_loss", float("inf")))
    logger.info("alignment: trained heads for %d epochs in %.1fs; best %s", cfg.epochs,
                history[-1]["elapsed_s"], {k: round(v, 4) for k, v in best.items()})
    return model.freeze(), history
