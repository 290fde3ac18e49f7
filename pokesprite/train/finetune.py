"""Stage 3: fine-tune the text encoder with the VAE and U-Net frozen, then save the combined model.

The objective here is the denoising loss back-propagated into the text encoder: the captions'
token features are tuned so that the frozen U-Net predicts the noise better from them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pokesprite.config import DataConfig, FinetuneStageConfig, SampleConfig, from_dict
from pokesprite.data.dataset import SpriteDataset
from pokesprite.models.text import TextEncoder
from pokesprite.pipeline import SpritePipeline
from pokesprite.tracking import Tracker
from pokesprite.train.common import make_optimizer, seed_everything
from pokesprite.train.diffusion import denoising_loss, encode_latents, load_diffusion, sample_grid, sample_latents
from pokesprite.train.vae import load_vae

log = logging.getLogger(__name__)
GRID_PROMPTS = 8


class CaptionLatents(torch.utils.data.Dataset):
    """(latent mean, latent logvar, caption) triples; captions are tokenised per batch."""

    def __init__(self, mean, logvar, captions):
        self.mean, self.logvar, self.captions = mean, logvar, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.mean[i], self.logvar[i], self.captions[i]


def caption_loss(unet, text: TextEncoder, schedule, batch, latent_scale, device, generator=None,
                 drop_prob: float = 0.0):
    """Denoising loss with live text features; captions become "" with ``drop_prob``, as in stage 2."""
    mean, logvar, captions = batch
    z0 = sample_latents(mean, logvar, latent_scale, generator).to(device)
    drop = (torch.rand(len(captions), generator=generator) < drop_prob).tolist()
    tok = text.tokenize(["" if d else c for c, d in zip(captions, drop)], device)
    return denoising_loss(unet, schedule, z0, text(**tok), tok["attention_mask"], generator=generator)


@torch.no_grad()
def validation_loss(unet, text, schedule, loader, latent_scale, device, seed: int = 1234) -> float:
    text.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for batch in loader:
        total += caption_loss(unet, text, schedule, batch, latent_scale, device, g).item() * len(batch[2])
        n += len(batch[2])
    return total / n


def train_finetune(cfg: FinetuneStageConfig, data_cfg: DataConfig, *, data_dir: Path, vae_checkpoint: Path,
                   diffusion_checkpoint: Path, out_dir: Path, seed: int, device: str | torch.device = "cpu",
                   tracker: Tracker | None = None) -> dict:
    """Fine-tune the text encoder; writes the combined model folder ``model/`` and ``samples.png``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = seed_everything(seed)
    vae, latent_scale = load_vae(vae_checkpoint, device)
    unet, text, schedule, diff = load_diffusion(diffusion_checkpoint, device)
    text.freeze_transformer(cfg.train_layers)
    for m in (vae, unet):
        m.requires_grad_(False).eval()

    train_set = SpriteDataset(data_dir, "train", data_cfg, limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val", data_cfg)
    train_data = CaptionLatents(*encode_latents(vae, train_set, device), train_set.captions)
    val_data = CaptionLatents(*encode_latents(vae, val_set, device), val_set.captions)
    train_loader = DataLoader(train_data, batch_size=cfg.train.batch_size, shuffle=True, generator=g,
                              drop_last=len(train_data) > cfg.train.batch_size)
    val_loader = DataLoader(val_data, batch_size=cfg.train.batch_size)
    params = [p for p in text.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
    log.info("fine-tuning %.2fM text-encoder parameters (top %d layers + projection)",
             sum(p.numel() for p in params) / 1e6, cfg.train_layers)

    before = validation_loss(unet, text, schedule, val_loader, latent_scale, device)
    tracker.log_metrics({"val_loss": before}, step=0)
    best, history = before, [{"epoch": 0, "val_loss": before}]
    best_state = {k: v.detach().clone() for k, v in text.state_dict().items()}
    for epoch in tqdm(range(1, cfg.train.epochs + 1), desc="finetune epochs", disable=None):
        text.train()
        total = 0.0
        for batch in tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=None):
            loss = caption_loss(unet, text, schedule, batch, latent_scale, device, g, diff["cond_drop_prob"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            total += loss.item()
        metrics = {"train_loss": total / len(train_loader),
                   "val_loss": validation_loss(unet, text, schedule, val_loader, latent_scale, device)}
        tracker.log_metrics(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        log.info("finetune epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
        if metrics["val_loss"] < best:
            best = metrics["val_loss"]
            best_state = {k: v.detach().clone() for k, v in text.state_dict().items()}

    text.load_state_dict(best_state)
    pipeline = SpritePipeline(vae, unet, text, schedule, latent_scale=latent_scale,
                              sample=from_dict(SampleConfig, diff["sample"], "diffusion.sample"))
    pipeline.save(out_dir / "model")
    grid = sample_grid(pipeline, val_set.captions[:GRID_PROMPTS])
    grid.save(out_dir / "samples.png")
    tracker.log_image(grid, "samples.png")
    return {"val_loss_before": before, "val_loss_after": best, "epochs": cfg.train.epochs}
