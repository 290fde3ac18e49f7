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
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from pokesprite.config import DiffusionStageConfig, TextConfig, to_dict
from pokesprite.data.dataset import SpriteDataset
from pokesprite.diffusion.schedule import NoiseSchedule
from pokesprite.models.text import TextEncoder
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE, sample_posterior
from pokesprite.pipeline import SpritePipeline
from pokesprite.progress import progress
from pokesprite.tracking import Tracker
from pokesprite.images import image_grid, save_image_atomic
from pokesprite.losses import noise_loss
from pokesprite.train import distributed
from pokesprite.train.batches import batch_indices, steps_per_epoch
from pokesprite.checkpoints import load_checkpoint
from pokesprite.train.common import seed_everything
from pokesprite.train.ema import decay_for_half_life
from pokesprite.train.loop import Stage, fit

log = logging.getLogger(__name__)
GRID_PROMPTS = 8
VAL_SEED = 1234  # the fixed noise and timesteps of validation in stages 2 and 3


@torch.no_grad()
def encode_latents(vae, dataset: SpriteDataset, device, batch_size: int = 16):
    """Posterior mean and log-variance of every image in ``dataset``: two (N, 8, 27, 27) tensors."""
    means, logvars = [], []
    for x, _ in progress(DataLoader(dataset, batch_size=batch_size), desc="encode latents", leave=False):
        m, lv = vae.encode(x.to(device))
        means.append(m.cpu())
        logvars.append(lv.cpu())
    return torch.cat(means), torch.cat(logvars)


class LatentCache:
    """Latent posteriors and caption features of one split, held on the training device."""

    def __init__(self, vae, text: TextEncoder, dataset: SpriteDataset, device, *, latent_scale: float):
        mean, logvar = encode_latents(vae, dataset, device)
        self.mean, self.logvar = mean.to(device), logvar.to(device)
        self.hidden, self.mask = text.encode_hidden(dataset.captions, device=device)  # on the device too
        self.captions = dataset.captions
        self.latent_scale = latent_scale

    def __len__(self):
        return len(self.mean)

    def take(self, idx: torch.Tensor):
        """(mean, logvar, hidden, mask) of the items ``idx`` (an index tensor on the cache's device)."""
        return self.mean[idx], self.logvar[idx], self.hidden[idx], self.mask[idx]

    def loader(self, batch_size: int, *, shuffle: bool, generator=None):
        """Batches of ``take``: in order, or shuffled with the last short batch dropped."""
        for idx in batch_indices(len(self), batch_size, shuffle=shuffle, generator=generator,
                                 device=self.mean.device):
            yield self.take(idx)


def denoise(unet, schedule: NoiseSchedule, z0, context, mask, *, generator=None, kind: str = "huber",
            prediction: str = "eps", min_snr_gamma: float = 0.0, t_range: tuple[int, int] | None = None,
            shard=None):
    """One denoising step of training: noise z0 at uniform timesteps (``NoiseSchedule.noised``; within
    ``t_range`` when given), run the U-Net, and score its ``prediction`` (eps, or v of Salimans & Ho
    2022) with Huber as the seed says, or MSE; each sample weighted by Min-SNR-gamma (Hang et al.
    2023) when ``min_snr_gamma`` > 0. Returns (loss, the U-Net's output, x_t, t).

    With ``shard`` (``distributed.shard``), ``z0`` is the global batch: its timesteps and noise are
    drawn for all of it, and the U-Net sees this process's rows (``context`` and ``mask`` are those rows).
    """
    t, noise, zt = schedule.noised(z0, generator, t_range)
    target, weight = schedule.target(z0, noise, t, prediction), schedule.loss_weight(t, prediction, min_snr_gamma)
    if shard is not None:
        t, zt, target = shard(t), shard(zt), shard(target)
        weight = shard(weight) if weight is not None else None
    out = unet(zt, t, context, mask)
    return noise_loss(out, target, kind, weight), out, zt, t


def denoising_loss(unet, schedule: NoiseSchedule, z0, context, mask, **kwargs) -> torch.Tensor:
    """The loss of ``denoise`` (stage 2's objective)."""
    return denoise(unet, schedule, z0, context, mask, **kwargs)[0]


def drop_captions(captions: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], prob: float,
                  generator=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Replace each caption by the empty caption "" with probability ``prob`` (classifier-free guidance).

    ``captions``: tensors with one row per caption (hidden states, attention mask, token ids, ...);
    ``empty``: the same keys for "", one row that broadcasts. Decided on the device, no host sync (the
    draw comes from ``generator`` on its device, else from the rows' device). Returns the captions with
    the dropped rows replaced, and the (N,) bool of which were dropped.
    """
    first = next(iter(captions.values()))
    on = generator.device if generator is not None else first.device
    drop = (torch.rand(len(first), generator=generator, device=on) < prob).to(first.device)
    out = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty[k].to(v.dtype), v) for k, v in captions.items()}
    return out, drop


def sample_latents(mean, logvar, scale: float, generator=None, clamp: float = 0.0):
    """z ~ q(z | x) (``sample_posterior``), times the latent scale; clamped to +-``clamp`` (the seed's
    +-3) when clamp > 0."""
    z = sample_posterior(mean, logvar, generator) * scale
    return z.clamp(-clamp, clamp) if clamp > 0 else z


@torch.no_grad()
def validation_loss(unet, text: TextEncoder, schedule, cache: LatentCache, device, batch_size: int,
                    seed: int = VAL_SEED, kind: str = "huber", clamp: float = 0.0, prediction: str = "eps",
                    min_snr_gamma: float = 0.0) -> float:
    """The training objective (``denoising_loss``: same target and weighting) with fixed noise and
    timesteps, so that epochs (and runs with the same objective) are comparable."""
    unet.eval()
    text.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for mean, logvar, hidden, mask in cache.loader(batch_size, shuffle=False):
        z0 = sample_latents(mean, logvar, cache.latent_scale, g, clamp).to(device)
        loss = denoising_loss(unet, schedule, z0, text.proj(hidden.to(device)), mask.to(device), generator=g,
                              kind=kind, prediction=prediction, min_snr_gamma=min_snr_gamma)
        total += loss.item() * len(mean)
        n += len(mean)
    return total / n


def sample_grid(pipeline: SpritePipeline, prompts: list[str], seed: int = 0):
    return image_grid(pipeline(prompts, seed=seed), cols=len(prompts))


def train_diffusion(cfg: DiffusionStageConfig, text_cfg: TextConfig, *, data_dir: Path,
                    vae_checkpoint: Path, out_dir: Path, seed: int, device: str | torch.device = "cpu",
                    tracker: Tracker | None = None, resume: Path | None = None) -> dict:
    """Train the U-Net (and text projection); writes ``best.pt``, ``last.pt``, ``epoch_*.pt`` and ``samples.png``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    g = seed_everything(seed)
    vae = VAE.from_checkpoint(vae_checkpoint, device)
    latent_scale = vae.latent_scale
    vae.requires_grad_(False)
    text = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens).to(device)
    text.freeze_transformer(0)

    train_set = SpriteDataset(data_dir, "train", limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val")
    train_cache = LatentCache(vae, text, train_set, device, latent_scale=latent_scale)
    val_cache = LatentCache(vae, text, val_set, device, latent_scale=latent_scale)
    empty_hidden, empty_mask = text.encode_hidden([""], device=device)  # the unconditional "caption"

    schedule = NoiseSchedule(cfg.schedule)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    unet = UNet(cfg.unet, context_dim=text_cfg.dim).to(device, memory_format=memory_format)
    if cfg.train.compile:
        unet.compile()  # in place: the state dict keeps its names
    trained = nn.ModuleDict({"unet": unet, "proj": text.proj})  # what the optimiser and the EMA see
    log.info("U-Net: %.2fM parameters, %d train / %d val latents",
             sum(p.numel() for p in unet.parameters()) / 1e6, len(train_cache), len(val_cache))
    pipeline = SpritePipeline(vae, unet, text, schedule, latent_scale=latent_scale, sample=cfg.sample,
                              latent_clamp=cfg.latent_clamp, prediction=cfg.prediction)
    prompts = val_cache.captions[:GRID_PROMPTS]
    bs = cfg.train.batch_size
    ema_decay = cfg.ema_decay
    if cfg.ema_half_life > 0:
        total_steps = cfg.train.epochs * steps_per_epoch(len(train_cache), bs)
        ema_decay = decay_for_half_life(cfg.ema_half_life * total_steps)
        log.info("EMA decay %.6f: half-life %.0f of %d steps", ema_decay, cfg.ema_half_life * total_steps,
                 total_steps)

    def loss(idx, epoch):  # everything on the device, random numbers from its default generator
        # drawn for the whole batch; this process's rows go through the U-Net (distributed.py)
        mean, logvar, hidden, mask = train_cache.take(idx)
        z0 = sample_latents(mean, logvar, latent_scale, None, cfg.latent_clamp)
        z0 = z0.contiguous(memory_format=memory_format)
        kept, _ = drop_captions({"hidden": hidden, "mask": mask}, {"hidden": empty_hidden, "mask": empty_mask},
                                cfg.cond_drop_prob)
        hidden, mask = distributed.shard(kept["hidden"]), distributed.shard(kept["mask"])
        return denoising_loss(unet, schedule, z0, text.proj(hidden), mask, kind=cfg.loss,
                              prediction=cfg.prediction, min_snr_gamma=cfg.min_snr_gamma,
                              shard=distributed.shard), {}

    def validate(epoch):  # runs with the EMA weights
        text.eval()
        return {"val_loss": validation_loss(unet, text, schedule, val_cache, device, bs, kind=cfg.loss,
                                            clamp=cfg.latent_clamp, prediction=cfg.prediction,
                                            min_snr_gamma=cfg.min_snr_gamma)}

    def on_epoch_end(epoch, metrics):
        if cfg.train.sample_every and epoch % cfg.train.sample_every == 0:
            tracker.log_image(sample_grid(pipeline, prompts), f"samples/epoch_{epoch:04d}.png")

    def export():  # the inference weights; inside fit's EMA context these are the averaged ones
        return {"unet_config": to_dict(cfg.unet), "unet": unet.state_dict(), "text_config": to_dict(text_cfg),
                "text_proj": text.proj.state_dict(), "schedule_config": to_dict(cfg.schedule),
                "sample": to_dict(cfg.sample), "cond_drop_prob": cfg.cond_drop_prob, "loss": cfg.loss,
                "latent_clamp": cfg.latent_clamp, "prediction": cfg.prediction,
                "min_snr_gamma": cfg.min_snr_gamma, "vae_checkpoint": str(vae_checkpoint)}

    stage = Stage(
        name="diffusion", model=trained, loss=loss, validate=validate, export=export, generator=g,
        batches=lambda epoch: batch_indices(len(train_cache), bs, shuffle=True, generator=g, device=device),
        steps_per_epoch=steps_per_epoch(len(train_cache), bs), ema_decay=ema_decay,
        on_epoch_end=on_epoch_end, config={**to_dict(cfg), "text": to_dict(text_cfg)},
        device=torch.device(device))
    result = fit(stage, cfg.train, out_dir=out_dir, tracker=tracker, resume=resume)
    if not distributed.is_main():
        return {}  # process 0 finishes the stage

    best_ckpt = load_checkpoint(out_dir / "best.pt", "diffusion")
    unet.load_state_dict(best_ckpt["unet"])
    text.proj.load_state_dict(best_ckpt["text_proj"])
    grid = sample_grid(pipeline, prompts)
    save_image_atomic(grid, out_dir / "samples.png")
    tracker.log_image(grid, "samples.png")
    last = {k: v for k, v in result.history[-1].items() if k != "epoch"}
    return {**last, "best_val_loss": result.best, "best_epoch": result.best_epoch,
            "skipped_batches": result.skipped_batches, "grad_explosions": result.explosions}
