"""Stage 1: train the VAE.

Loss = l1_weight * L1 + perceptual_weight * VGG feature distance + kl_weight(epoch) * KL with free
bits, where the KL weight rises linearly from 0 over ``kl_anneal_epochs`` (the seed's annealing
against posterior collapse). With ``vae.model.text_conditioning`` the decoder also attends to the
caption's frozen transformer features, computed once before training.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from pokesprite.config import DataConfig, TextConfig, VAEStageConfig, to_dict
from pokesprite.data.augment import augment_batch
from pokesprite.data.dataset import SpriteDataset, to_unit_range, to_uint8
from pokesprite.images import image_grid, save_image_atomic
from pokesprite.losses import PerceptualLoss, gaussian_kl, kl_free_bits, kl_weight_at
from pokesprite.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from pokesprite.evaluation.image_metrics import psnr
from pokesprite.models.vae import VAE
from pokesprite.tracking import Tracker
from pokesprite.train import distributed
from pokesprite.train.batches import batch_indices, steps_per_epoch
from pokesprite.checkpoints import atomic_save, load_checkpoint
from pokesprite.train.common import make_optimizer, optimizer_step, seed_everything
from pokesprite.train.loop import Stage, fit

log = logging.getLogger(__name__)
GRID_IMAGES = 8


class CaptionFeatures:
    """Frozen transformer features of a split's captions, looked up by dataset index (text-conditioned VAE)."""

    def __init__(self, text_cfg: TextConfig, captions: list[str], device):
        from pokesprite.models.text import TextEncoder

        text = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens).to(device)
        self.hidden, self.mask = text.encode_hidden(captions, device=device)
        self.dim = text.hidden
        self.device = device

    def __call__(self, index: torch.Tensor):
        return self.hidden[index].to(self.device), self.mask[index].to(self.device)


def no_context(index):
    return None, None


def in_batches(images: torch.Tensor, batch_size: int):
    """(index, float images in [-1, 1]) batches, in order, of a uint8 (N, 3, S, S) split on any device."""
    for idx in batch_indices(len(images), batch_size, shuffle=False, device=images.device):
        yield idx, to_unit_range(images[idx])


@torch.no_grad()
def latent_std(vae: VAE, images: torch.Tensor, batch_size: int) -> float:
    """Standard deviation of the latents the diffusion stage trains on, z ~ q(z | x) over ``images``:
    by the law of total variance sqrt(Var[mean] + E[exp(logvar)]), exactly, without drawing any z.
    1/std gives the diffusion stage unit-variance latents (the means' spread alone understates it)."""
    means, variances = [], []
    for _, x in in_batches(images, batch_size):
        mean, logvar = vae.encode(x)
        means.append(mean.float())
        variances.append(logvar.float().exp())
    return float((torch.cat(means).var() + torch.cat(variances).mean()).sqrt())


@torch.no_grad()
def evaluate(vae: VAE, images: torch.Tensor, batch_size: int, context=no_context,
             perceptual=None) -> dict[str, float]:
    """Deterministic (posterior-mean) reconstruction error on a held-out split (uint8, on the device)."""
    vae.eval()
    sums = torch.zeros(4, device=images.device)  # l1, psnr, kl, perceptual (summed; one host read)
    n = len(images)
    for idx, x in in_batches(images, batch_size):
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean, *context(idx)).float().clamp(-1, 1)
        sums[0] += F.l1_loss(recon, x, reduction="sum")
        sums[1] += psnr(recon, x, data_range=2.0).sum()  # [-1, 1]: a range of 2
        sums[2] += kl_free_bits(mean.float(), logvar.float()) * len(x)
        if perceptual is not None:
            sums[3] += perceptual(recon, x).float() * len(x)
    l1, psnr_sum, kl, perc = sums.tolist()
    pixels = n * 3 * vae.cfg.image_size ** 2
    out = {"val_l1": l1 / pixels, "val_psnr": psnr_sum / n, "val_kl": kl / n}
    if perceptual is not None:
        out["val_perceptual"] = perc / n
    return out


@torch.no_grad()
def reconstruction_grid(vae: VAE, dataset: SpriteDataset, device, context=no_context):
    """Top row: originals; bottom row: reconstructions."""
    vae.eval()
    idx = torch.arange(min(GRID_IMAGES, len(dataset)))
    x = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
    recon = vae.decode(vae.encode(x)[0], *context(idx))
    images = to_uint8(torch.cat([x, recon])).permute(0, 2, 3, 1).cpu().numpy()
    return image_grid(images, cols=len(x))


def train_vae(cfg: VAEStageConfig, data_cfg: DataConfig, *, data_dir: Path, out_dir: Path, seed: int,
              device: str | torch.device = "cpu", tracker: Tracker | None = None,
              text_cfg: TextConfig | None = None, resume: Path | None = None) -> dict:
    """Train the VAE; writes ``best.pt`` (+ latent scale), ``last.pt``, ``epoch_*.pt`` and ``reconstructions.png``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    g = seed_everything(seed)
    train_set = SpriteDataset(data_dir, "train", limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val")
    bs = cfg.train.batch_size
    # Both splits stay on the device as uint8 (718 sprites at 215 px are 100 MB); batches are indexed
    # and augmented there.
    train_images, val_images = train_set.images.to(device), val_set.images.to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    train_ctx = val_ctx = no_context
    context_dim = 0
    if cfg.model.text_conditioning:
        if text_cfg is None:
            raise ValueError("vae.model.text_conditioning needs the text config (params.text)")
        train_ctx = CaptionFeatures(text_cfg, train_set.captions, device)
        val_ctx = CaptionFeatures(text_cfg, val_set.captions, device)
        context_dim = train_ctx.dim

    vae = VAE(cfg.model, context_dim=context_dim).to(device, memory_format=memory_format)
    if cfg.train.compile:
        vae.compile()  # in place: the state dict keeps its names
    w = cfg.loss
    perceptual = PerceptualLoss(w.perceptual_net, size=w.perceptual_size).to(device) \
        if w.perceptual_weight > 0 else None
    log.info("VAE: %.2fM parameters, %d train / %d val images, perceptual net %s",
             sum(p.numel() for p in vae.parameters()) / 1e6, len(train_set), len(val_set),
             perceptual.vgg.name if perceptual is not None else "off")

    dcfg = cfg.discriminator
    disc = d_opt = None
    if dcfg.weight > 0:
        disc = PatchDiscriminator(dcfg).to(device, memory_format=memory_format)
        d_opt = make_optimizer(disc.parameters(), dcfg.lr, cfg.train.weight_decay)

    def adversarial(x, recon, rec_loss):
        """One discriminator step on (x, recon), then the decoder's adaptively weighted hinge loss."""
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        distributed.average_gradients(disc.parameters())
        # a non-finite batch (in any process) leaves the discriminator as it was
        optimizer_step(d_opt, torch.isfinite(distributed.mean(d_loss)))
        g_loss = hinge_g_loss(disc(recon)).float()
        weight = adaptive_weight(rec_loss, g_loss, vae.decoder.conv_out.weight, reduce=distributed.mean)
        return dcfg.weight * weight * g_loss, {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                                               "adaptive_weight": weight}

    def loss(idx, epoch):
        # Random numbers are drawn for the whole batch and each process keeps its rows (distributed.py).
        x = augment_batch(train_images[idx], data_cfg.augment, data_cfg.background)
        x = distributed.shard(x).contiguous(memory_format=memory_format)
        noise = torch.randn((len(idx), vae.cfg.latent_channels, vae.latent_size, vae.latent_size), device=x.device)
        recon, mean, logvar = vae(x, None, *train_ctx(distributed.shard(idx)), noise=distributed.shard(noise))
        l1 = F.l1_loss(recon.float(), x)
        kl = kl_free_bits(mean.float(), logvar.float(), w.free_bits, reduce=distributed.mean)
        kl_weight = kl_weight_at(epoch - 1, w.kl_weight, w.kl_anneal_epochs)
        rec = w.l1_weight * l1
        # "kl": the plain KL, as validation measures it; "kl_floored": what the loss weighs (free bits)
        extra = {"l1": l1.detach(), "kl": gaussian_kl(mean.detach().float(), logvar.detach().float()).mean(),
                 "kl_floored": kl.detach(), "kl_weight": kl_weight}
        if perceptual is not None:
            p = perceptual(recon, x).float()
            rec = rec + w.perceptual_weight * p
            extra["perceptual"] = p.detach()
        total = rec + kl_weight * kl
        if disc is not None and epoch >= dcfg.start_epoch:
            adv, adv_extra = adversarial(x, recon, rec)
            total = total + adv
            extra.update(adv_extra)
        return total, extra

    def validate(epoch):
        m = evaluate(vae, val_images, bs, val_ctx, perceptual)
        # Reconstruction objective only: the KL weight changes with the epoch, so it would not compare.
        m["val_loss"] = w.l1_weight * m["val_l1"] + w.perceptual_weight * m.get("val_perceptual", 0.0)
        return m

    def on_epoch_end(epoch, metrics):
        if cfg.train.sample_every and epoch % cfg.train.sample_every == 0:
            tracker.log_image(reconstruction_grid(vae, val_set, device, val_ctx),
                              f"reconstructions/epoch_{epoch:04d}.png")

    def export():
        return {"config": to_dict(cfg.model), "context_dim": context_dim, "state_dict": vae.state_dict()}

    stage = Stage(
        name="vae", model=vae, loss=loss, validate=validate, export=export, generator=g,
        batches=lambda epoch: batch_indices(len(train_images), bs, shuffle=True, generator=g, device=device),
        steps_per_epoch=steps_per_epoch(len(train_images), bs), on_epoch_end=on_epoch_end,
        config={**to_dict(cfg), "text": to_dict(text_cfg) if text_cfg else None}, device=torch.device(device),
        extra_state=(lambda: {"disc": disc.state_dict(), "d_opt": d_opt.state_dict()}) if disc else None,
        load_extra_state=(lambda st: (disc.load_state_dict(st["disc"]), d_opt.load_state_dict(st["d_opt"])))
        if disc else None)
    result = fit(stage, cfg.train, out_dir=out_dir, tracker=tracker, resume=resume)
    if not distributed.is_main():
        return {}  # process 0 finishes the stage

    # The best weights (by validation loss) become the stage's output, with the latent scale the
    # diffusion stage multiplies latents by so that they have roughly unit variance.
    best = load_checkpoint(out_dir / "best.pt", "vae")
    vae.load_state_dict(best["state_dict"])
    scale = 1.0 / latent_std(vae, train_images, bs)
    best["latent_scale"] = scale
    atomic_save(best, out_dir / "best.pt")
    grid = reconstruction_grid(vae, val_set, device, val_ctx)
    save_image_atomic(grid, out_dir / "reconstructions.png")
    tracker.log_image(grid, "reconstructions.png")
    last = {k: v for k, v in result.history[-1].items() if k != "epoch"}
    return {**last, "best_val_loss": result.best, "best_epoch": result.best_epoch, "latent_scale": scale,
            "skipped_batches": result.skipped_batches, "grad_explosions": result.explosions}
