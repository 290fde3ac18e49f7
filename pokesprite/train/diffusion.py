"""Stage 2: train the text-conditioned U-Net as a DDPM on the frozen VAE's latents.

The VAE and the text transformer are frozen, so their outputs are computed once: the posterior
(mean, log-variance) of every training sprite and the transformer's hidden states of every caption.
Each step then samples z from the cached posterior, which keeps the VAE's stochasticity for free.
The text projection (transformer width -> text.dim) is new, so it trains with the U-Net. Captions
are dropped (replaced by "") with probability ``cond_drop_prob`` so that the model also learns the
unconditional prediction that classifier-free guidance needs; an EMA of the weights is what gets
validated, sampled from and saved.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from pokesprite.config import DataConfig, DiffusionStageConfig, ScheduleConfig, TextConfig, UNetConfig, from_dict, to_dict
from pokesprite.data.dataset import SpriteDataset
from pokesprite.diffusion.schedule import NoiseSchedule
from pokesprite.models.text import TextEncoder
from pokesprite.models.unet import UNet
from pokesprite.pipeline import SpritePipeline
from pokesprite.tracking import Tracker
from pokesprite.images import image_grid
from pokesprite.train.common import atomic_save, load_checkpoint, make_optimizer, seed_everything
from pokesprite.train.ema import EMA
from pokesprite.train.vae import load_vae

log = logging.getLogger(__name__)
GRID_PROMPTS = 8


@torch.no_grad()
def encode_latents(vae, dataset: SpriteDataset, device, batch_size: int = 16):
    """Posterior mean and log-variance of every image in ``dataset``: two (N, 8, 27, 27) tensors."""
    means, logvars = [], []
    for x, _ in tqdm(DataLoader(dataset, batch_size=batch_size), desc="encode latents", leave=False, disable=None):
        m, lv = vae.encode(x.to(device))
        means.append(m.cpu())
        logvars.append(lv.cpu())
    return torch.cat(means), torch.cat(logvars)


class LatentCache:
    """Latent posteriors and caption features of one split, held in memory."""

    def __init__(self, vae, text: TextEncoder, dataset: SpriteDataset, device, *, latent_scale: float):
        self.mean, self.logvar = encode_latents(vae, dataset, device)
        self.hidden, self.mask = text.encode_hidden(dataset.captions, device=device)
        self.captions = dataset.captions
        self.latent_scale = latent_scale

    def __len__(self):
        return len(self.mean)

    def loader(self, batch_size: int, *, shuffle: bool, generator=None) -> DataLoader:
        ds = TensorDataset(self.mean, self.logvar, self.hidden, self.mask)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle and len(ds) > batch_size)


def denoising_loss(unet, schedule: NoiseSchedule, z0, context, mask, *, generator=None) -> torch.Tensor:
    """Huber (SmoothL1) loss between the true and predicted noise at uniformly sampled timesteps."""
    t = schedule.sample_timesteps(len(z0), generator, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    eps = unet(schedule.add_noise(z0, noise, t), t, context, mask)
    return F.smooth_l1_loss(eps, noise)


def drop_captions(hidden, mask, empty_hidden, empty_mask, prob: float, generator=None):
    """Replace each caption by the empty caption "" with probability ``prob`` (classifier-free guidance)."""
    drop = torch.rand(len(hidden), generator=generator) < prob
    if drop.any():
        hidden, mask = hidden.clone(), mask.clone()
        hidden[drop], mask[drop] = empty_hidden, empty_mask
    return hidden, mask


def sample_latents(mean, logvar, scale: float, generator=None):
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + torch.exp(0.5 * logvar) * noise) * scale


@torch.no_grad()
def validation_loss(unet, text: TextEncoder, schedule, cache: LatentCache, device, batch_size: int,
                    seed: int = 1234) -> float:
    """Denoising loss with fixed noise and timesteps, so that epochs (and runs) are comparable."""
    unet.eval()
    text.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for mean, logvar, hidden, mask in cache.loader(batch_size, shuffle=False):
        z0 = sample_latents(mean, logvar, cache.latent_scale, g).to(device)
        loss = denoising_loss(unet, schedule, z0, text.proj(hidden.to(device)), mask.to(device), generator=g)
        total += loss.item() * len(mean)
        n += len(mean)
    return total / n


def load_diffusion(path: Path, device="cpu"):
    """Rebuild (U-Net, text encoder with its trained projection, schedule, checkpoint) from a stage-2 checkpoint."""
    ckpt = load_checkpoint(path, "diffusion")
    text_cfg = from_dict(TextConfig, ckpt["text_config"], "text")
    text = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens)
    text.proj.load_state_dict(ckpt["text_proj"])
    unet = UNet(from_dict(UNetConfig, ckpt["unet_config"], "diffusion.unet"), context_dim=text_cfg.dim)
    unet.load_state_dict(ckpt["unet"])
    schedule = NoiseSchedule(from_dict(ScheduleConfig, ckpt["schedule_config"], "diffusion.schedule"))
    return unet.to(device).eval(), text.to(device).eval(), schedule, ckpt


def sample_grid(pipeline: SpritePipeline, prompts: list[str], seed: int = 0):
    return image_grid(pipeline(prompts, seed=seed), cols=len(prompts))


def train_diffusion(cfg: DiffusionStageConfig, data_cfg: DataConfig, text_cfg: TextConfig, *, data_dir: Path,
                    vae_checkpoint: Path, out_dir: Path, seed: int, device: str | torch.device = "cpu",
                    tracker: Tracker | None = None) -> dict:
    """Train the U-Net (and text projection); writes ``best.pt``, ``last.pt`` and ``samples.png``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = seed_everything(seed)
    vae, latent_scale = load_vae(vae_checkpoint, device)
    vae.requires_grad_(False)
    text = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens).to(device)
    text.freeze_transformer(0)

    train_set = SpriteDataset(data_dir, "train", data_cfg, limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val", data_cfg)
    train_cache = LatentCache(vae, text, train_set, device, latent_scale=latent_scale)
    val_cache = LatentCache(vae, text, val_set, device, latent_scale=latent_scale)

    empty_hidden, empty_mask = text.encode_hidden([""], device=device)  # the unconditional "caption"

    schedule = NoiseSchedule(cfg.schedule)
    unet = UNet(cfg.unet, context_dim=text_cfg.dim).to(device)
    trained = nn.ModuleDict({"unet": unet, "proj": text.proj})  # what the optimiser and the EMA see
    params = list(trained.parameters())
    opt = make_optimizer(params, cfg.train.lr, cfg.train.weight_decay)
    ema = EMA(trained, cfg.ema_decay)
    log.info("U-Net: %.2fM parameters, %d train / %d val latents",
             sum(p.numel() for p in unet.parameters()) / 1e6, len(train_cache), len(val_cache))
    pipeline = SpritePipeline(vae, unet, text, schedule, latent_scale=latent_scale, sample=cfg.sample)
    prompts = val_cache.captions[:GRID_PROMPTS]

    best, history = math.inf, []
    for epoch in tqdm(range(1, cfg.train.epochs + 1), desc="diffusion epochs", disable=None):
        unet.train()
        text.train()
        total = 0.0
        loader = train_cache.loader(cfg.train.batch_size, shuffle=True, generator=g)
        for mean, logvar, hidden, mask in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None):
            z0 = sample_latents(mean, logvar, latent_scale, g).to(device)
            hidden, mask = drop_captions(hidden, mask, empty_hidden, empty_mask, cfg.cond_drop_prob, g)
            loss = denoising_loss(unet, schedule, z0, text.proj(hidden.to(device)), mask.to(device), generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            ema.update(trained)
            total += loss.item()
        with ema.averaged(trained):  # validation, samples and the saved model use the EMA weights
            metrics = {"train_loss": total / len(loader),
                       "val_loss": validation_loss(unet, text, schedule, val_cache, device, cfg.train.batch_size)}
            if cfg.train.sample_every and epoch % cfg.train.sample_every == 0:
                tracker.log_image(sample_grid(pipeline, prompts), f"samples/epoch_{epoch:04d}.png")
        tracker.log_metrics(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        log.info("diffusion epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
        state = {"kind": "diffusion", "unet_config": to_dict(cfg.unet), "unet": ema.shadow["unet"].state_dict(),
                 "text_config": to_dict(text_cfg), "text_proj": ema.shadow["proj"].state_dict(),
                 "schedule_config": to_dict(cfg.schedule), "sample": to_dict(cfg.sample),
                 "cond_drop_prob": cfg.cond_drop_prob, "vae_checkpoint": str(vae_checkpoint), "epoch": epoch,
                 "history": history}
        if metrics["val_loss"] < best:
            best = metrics["val_loss"]
            atomic_save(state, out_dir / "best.pt")
        atomic_save({**state, "raw": trained.state_dict(), "optimizer": opt.state_dict(),
                     "ema_updates": ema.num_updates}, out_dir / "last.pt")

    best_ckpt = load_checkpoint(out_dir / "best.pt", "diffusion")
    unet.load_state_dict(best_ckpt["unet"])
    text.proj.load_state_dict(best_ckpt["text_proj"])
    grid = sample_grid(pipeline, prompts)
    grid.save(out_dir / "samples.png")
    tracker.log_image(grid, "samples.png")
    return {**{k: v for k, v in history[-1].items() if k != "epoch"}, "best_val_loss": best}
