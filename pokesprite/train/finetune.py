"""Stage 3: fine-tune the text encoder for text-image alignment, with the VAE and U-Net frozen.

For each training pair (sprite, caption): noise the sprite's latent to a timestep in
[t_min, t_max], let the frozen U-Net predict the noise from the *live* caption features, turn that
into a one-step estimate of the clean latent, decode it with the frozen VAE decoder and score the
picture against the caption with a frozen CLIP-style alignment model (open_clip's contrastive loss
over the batch). Gradients flow through the scorer, the decoder and the U-Net into the text encoder
only. A consistency term - the stage-2 denoising loss on the same prediction, with the same caption
dropout - keeps the encoder from trading denoising quality (and the unconditional "" features that
guidance needs) for alignment.

Validation reports, on the validation split with fixed noise and timesteps, the denoising loss, the
CLIP loss and the alignment of the one-step sprites with their captions: top-1 retrieval among all
validation captions, R-precision among 32 candidates and the mean matched cosine. Epoch 0 is the
encoder before fine-tuning, so before/after is in the history.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pokesprite.config import FinetuneStageConfig, to_dict
from pokesprite.data.dataset import SpriteDataset
from pokesprite.contrastive import clip_loss, clip_scale
from pokesprite.evaluation.retrieval import r_precision, retrieval_accuracy
from pokesprite.images import save_image_atomic
from pokesprite.pipeline import SpritePipeline, load_diffusion_checkpoint
from pokesprite.tracking import Tracker
from pokesprite.train import distributed
from pokesprite.train.batches import batch_indices, steps_per_epoch
from pokesprite.checkpoints import load_checkpoint
from pokesprite.train.common import seed_everything
from pokesprite.train.diffusion import VAL_SEED, denoise, drop_captions, encode_latents, sample_grid, sample_latents
from pokesprite.train.loop import Stage, fit, load_trained_state, trained_state

log = logging.getLogger(__name__)
GRID_PROMPTS = 8


class CaptionLatents:
    """Latent posteriors of one split; captions and their embeddings are looked up by index."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def __len__(self):
        return len(self.mean)

    def take(self, idx: torch.Tensor):
        """(latent mean, latent logvar, idx) of the items ``idx`` (a CPU index tensor)."""
        return self.mean[idx], self.logvar[idx], idx


class OneStepObjective:
    """Everything stage 3 computes for a batch of (latent posterior, caption) pairs.

    The U-Net's output is of the kind ``pipeline.prediction`` says (eps or v): the consistency loss
    compares it with that target, Min-SNR-gamma weighted as in stage 2 when ``min_snr_gamma`` > 0, and
    the one-step x0 comes from the matching formula (``NoiseSchedule.eps_and_x0``).
    """

    def __init__(self, pipeline: SpritePipeline, align, captions: list[str], caption_embeddings: torch.Tensor,
                 cfg: FinetuneStageConfig, *, loss_kind: str, cond_drop_prob: float, device,
                 min_snr_gamma: float = 0.0):
        self.p, self.align, self.cfg = pipeline, align, cfg
        self.captions, self.caption_emb = captions, caption_embeddings.to(device)
        self.loss_kind, self.cond_drop_prob, self.device = loss_kind, cond_drop_prob, device
        self.min_snr_gamma = min_snr_gamma
        # Every caption and "" tokenized once, on the device: a step indexes them (no tokenizer in the loop).
        self.tokens = pipeline.text.tokenize(list(captions), device)
        self.empty = pipeline.text.tokenize([""], device)

    def __call__(self, batch, generator, *, train: bool):
        """Returns (alignment loss, consistency loss, one-step image embeddings of every row, the rows
        whose caption was kept: a (N,) bool on the device). Shapes do not depend on which captions were
        dropped, and nothing is read on the host: a dropped row is drawn too (from the empty caption)
        and left out of the alignment loss only.

        In training under ``torchrun``, random numbers are drawn for the global batch, this process's
        rows go through the encoder, U-Net, decoder and scorer, and the contrastive loss compares the
        gathered embeddings of the whole batch (``distributed``)."""
        p, device = self.p, self.device
        mean, logvar, idx = batch
        split = distributed.shard if train else None
        rows = split or (lambda x: x)
        # Random numbers from ``generator`` (validation's fixed CPU generator), else from the device's own.
        idx_dev = idx.to(device)
        tok, drop = drop_captions({k: v[idx_dev] for k, v in self.tokens.items()}, self.empty,
                                  self.cond_drop_prob if train else 0.0, generator)
        tok = {k: rows(v) for k, v in tok.items()}
        with distributed.private_rng(device):  # the encoder's dropout masks: this process's rows only
            context = p.text(**tok)
        z0 = sample_latents(mean.to(device), logvar.to(device), p.latent_scale, generator, p.latent_clamp)
        consistency, out, zt, t = denoise(p.unet, p.schedule, z0, context, tok["attention_mask"],
                                          generator=generator, kind=self.loss_kind, prediction=p.prediction,
                                          min_snr_gamma=self.min_snr_gamma, t_range=(self.cfg.t_min, self.cfg.t_max),
                                          shard=split)
        _, x0 = p.schedule.eps_and_x0(out, zt, t, p.prediction)
        if p.latent_clamp > 0:
            x0 = x0.clamp(-p.latent_clamp, p.latent_clamp)
        # clamped as every drawn sprite is (to_uint8): the scorer must not be pleased by pixels no one sees
        image_emb = self.align.encode_image(p.decode(x0, tok).clamp(-1, 1))
        if train:
            image_emb = distributed.gather(image_emb)
        keep = ~drop
        alignment = clip_loss(image_emb, self.caption_emb[idx_dev], clip_scale(self.align.logit_scale), keep)
        return alignment, consistency, image_emb, keep


def train_finetune(cfg: FinetuneStageConfig, *, data_dir: Path, vae_checkpoint: Path,
                   diffusion_checkpoint: Path, alignment, out_dir: Path, seed: int,
                   device: str | torch.device = "cpu", tracker: Tracker | None = None,
                   resume: Path | None = None) -> dict:
    """Fine-tune the text encoder against ``alignment`` (a frozen scorer); writes ``model/`` and ``samples.png``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    g = seed_everything(seed)
    diff = load_diffusion_checkpoint(diffusion_checkpoint)
    pipeline = SpritePipeline.from_checkpoints(vae_checkpoint, diff, device)
    vae, unet, text = pipeline.vae, pipeline.unet, pipeline.text
    text.freeze_transformer(cfg.train_layers)
    if vae.cfg.text_conditioning:
        log.warning("the VAE decoder reads the text encoder's features, which fine-tuning its top %d layers "
                    "changes: the pipeline will decode with features the decoder was not trained on",
                    cfg.train_layers)
    for m in (vae, unet):
        m.requires_grad_(False).eval()

    train_set = SpriteDataset(data_dir, "train", limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val")
    with torch.no_grad():
        train_emb = alignment.encode_text(train_set.captions).cpu()
        val_emb = alignment.encode_text(val_set.captions).cpu()
    train_data = CaptionLatents(*encode_latents(vae, train_set, device))
    val_data = CaptionLatents(*encode_latents(vae, val_set, device))
    kind = diff.get("loss", "huber")
    drop = diff.get("cond_drop_prob", 0.0)
    gamma = diff.get("min_snr_gamma", 0.0)  # older checkpoints: unweighted
    train_obj = OneStepObjective(pipeline, alignment, train_set.captions, train_emb, cfg, loss_kind=kind,
                                 cond_drop_prob=drop, device=device, min_snr_gamma=gamma)
    val_obj = OneStepObjective(pipeline, alignment, val_set.captions, val_emb, cfg, loss_kind=kind,
                               cond_drop_prob=drop, device=device, min_snr_gamma=gamma)
    bs = cfg.train.batch_size
    n_trainable = sum(p.numel() for p in text.parameters() if p.requires_grad)
    log.info("fine-tuning %.2fM text-encoder parameters (top %d layers + projection) against %s",
             n_trainable / 1e6, cfg.train_layers, type(alignment).__name__)

    def loss(batch, epoch):
        text.train()
        alignment_loss, consistency, _, _ = train_obj(batch, None, train=True)  # the device's generator
        total = cfg.alignment_weight * alignment_loss + cfg.consistency_weight * consistency
        return total, {"clip": alignment_loss.detach(), "consistency": consistency.detach()}

    @torch.no_grad()
    def validate(epoch):
        text.eval()
        vg = torch.Generator().manual_seed(VAL_SEED)
        clip = cons = 0.0
        embeddings, order = [], []
        for batch in (val_data.take(idx) for idx in batch_indices(len(val_data), bs, shuffle=False)):
            a, c, emb, keep = val_obj(batch, vg, train=False)  # validation drops no caption
            clip += a.item() * len(emb)
            cons += c.item() * len(emb)
            embeddings.append(emb[keep].cpu())
            order.append(batch[2][keep.cpu()])
        n = len(val_data)
        sim = torch.cat(embeddings) @ val_emb[torch.cat(order)].T
        return {"val_loss": (cfg.alignment_weight * clip + cfg.consistency_weight * cons) / n,
                "val_clip": clip / n, "val_consistency": cons / n,
                "val_retrieval_top1": retrieval_accuracy(sim),
                "val_r_precision_32": r_precision(sim, 32, torch.Generator().manual_seed(VAL_SEED)),
                "val_matched_cosine": float(sim.diagonal().mean())}

    def export():
        # the trained layers only: the frozen ones are the bundled model's, stored once in model/
        return {"text_state": trained_state(text), "train_layers": cfg.train_layers}

    before_state = {k: v.detach().clone() for k, v in text.state_dict().items()}
    before = validate(0)
    tracker.log_metrics(before, step=0)
    log.info("finetune before: %s", {k: round(v, 4) for k, v in before.items()})
    stage = Stage(
        name="finetune", model=text, loss=loss, validate=validate, export=export, generator=g,
        batches=lambda epoch: (train_data.take(idx) for idx in batch_indices(len(train_data), bs, shuffle=True,
                                                                             generator=g)),
        steps_per_epoch=steps_per_epoch(len(train_data), bs), config=to_dict(cfg), device=torch.device(device))
    result = fit(stage, cfg.train, out_dir=out_dir, tracker=tracker, resume=resume)
    if not distributed.is_main():
        return {}  # process 0 finishes the stage

    # The encoder before fine-tuning competes too: if no epoch beat it, it stays.
    if result.best < before["val_loss"]:
        best_file = out_dir / "best.pt"
        load_trained_state(text, load_checkpoint(best_file, "finetune")["text_state"], str(best_file))
        after = next(h for h in result.history if h["epoch"] == result.best_epoch)
    else:
        text.load_state_dict(before_state)
        after = {"epoch": 0, **before}
    pipeline.save(out_dir / "model")
    grid = sample_grid(pipeline, val_set.captions[:GRID_PROMPTS])
    save_image_atomic(grid, out_dir / "samples.png")
    tracker.log_image(grid, "samples.png")
    keys = ("val_loss", "val_clip", "val_consistency", "val_retrieval_top1", "val_r_precision_32",
            "val_matched_cosine")
    return {**{f"{k}_before": before[k] for k in keys}, **{f"{k}_after": after[k] for k in keys},
            "best_epoch": after["epoch"], "skipped_batches": result.skipped_batches,
            "grad_explosions": result.explosions}
