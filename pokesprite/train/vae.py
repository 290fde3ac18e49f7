"""Stage 1: train the VAE (images only; the text encoder plays no part yet)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pokesprite.config import DataConfig, VAEConfig, VAEStageConfig, from_dict, to_dict
from pokesprite.data.dataset import SpriteDataset, to_uint8
from pokesprite.models.vae import VAE, kl_divergence
from pokesprite.tracking import Tracker
from pokesprite.images import image_grid
from pokesprite.train.common import atomic_save, load_checkpoint, make_optimizer, seed_everything

log = logging.getLogger(__name__)
GRID_IMAGES = 8


def load_vae(path: Path, device="cpu") -> tuple[VAE, float]:
    """Rebuild the VAE from its checkpoint alone; returns (model in eval mode, latent scale)."""
    ckpt = load_checkpoint(path, "vae")
    vae = VAE(from_dict(VAEConfig, ckpt["config"], "vae.model"))
    vae.load_state_dict(ckpt["state_dict"])
    return vae.to(device).eval(), float(ckpt["latent_scale"])


@torch.no_grad()
def latent_std(vae: VAE, dataset: SpriteDataset, device, batch_size: int) -> float:
    """Standard deviation of the posterior means over ``dataset``: 1/std makes latents ~unit variance."""
    means = [vae.encode(x.to(device))[0].cpu() for x, _ in DataLoader(dataset, batch_size=batch_size)]
    return float(torch.cat(means).std())


@torch.no_grad()
def evaluate(vae: VAE, loader: DataLoader, device) -> dict[str, float]:
    """Deterministic (posterior-mean) reconstruction error on a held-out split."""
    vae.eval()
    l1 = mse = kl = 0.0
    n = 0
    for x, _ in loader:
        x = x.to(device)
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean).clamp(-1, 1)
        l1 += F.l1_loss(recon, x, reduction="sum").item()
        mse += F.mse_loss(recon, x, reduction="sum").item()
        kl += kl_divergence(mean, logvar).item() * len(x)
        n += len(x)
    pixels = n * 3 * vae.cfg.image_size ** 2
    mse /= pixels
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")  # signal range [-1, 1] has peak 2
    return {"val_l1": l1 / pixels, "val_psnr": psnr, "val_kl": kl / n}


@torch.no_grad()
def reconstruction_grid(vae: VAE, dataset: SpriteDataset, device):
    """Top row: originals; bottom row: reconstructions."""
    vae.eval()
    x = torch.stack([dataset[i][0] for i in range(min(GRID_IMAGES, len(dataset)))]).to(device)
    recon = vae.decode(vae.encode(x)[0])
    images = to_uint8(torch.cat([x, recon])).permute(0, 2, 3, 1).cpu().numpy()
    return image_grid(images, cols=len(x))


def train_vae(cfg: VAEStageConfig, data_cfg: DataConfig, *, data_dir: Path, out_dir: Path, seed: int,
              device: str | torch.device = "cpu", tracker: Tracker | None = None) -> dict:
    """Train the VAE; writes ``best.pt``, ``last.pt`` and ``reconstructions.png`` to ``out_dir``."""
    tracker = tracker or Tracker()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = seed_everything(seed)
    train_set = SpriteDataset(data_dir, "train", data_cfg, augment=True, limit=cfg.train.max_train_items)
    val_set = SpriteDataset(data_dir, "val", data_cfg)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, generator=g,
                              drop_last=len(train_set) > cfg.train.batch_size)
    val_loader = DataLoader(val_set, batch_size=cfg.train.batch_size)

    vae = VAE(cfg.model).to(device)
    opt = make_optimizer(vae.parameters(), cfg.train.lr, cfg.train.weight_decay)
    log.info("VAE: %.2fM parameters, %d train / %d val images", sum(p.numel() for p in vae.parameters()) / 1e6,
             len(train_set), len(val_set))

    best, history = math.inf, []
    for epoch in tqdm(range(1, cfg.train.epochs + 1), desc="vae epochs", disable=None):
        vae.train()
        sums = {"l1": 0.0, "kl": 0.0, "loss": 0.0}
        for x, _ in tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=None):
            x = x.to(device)
            recon, mean, logvar = vae(x, generator=None)
            l1 = F.l1_loss(recon, x)
            kl = kl_divergence(mean, logvar)
            loss = l1 + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.train.grad_clip)
            opt.step()
            for k, v in (("l1", l1), ("kl", kl), ("loss", loss)):
                sums[k] += v.item()
        metrics = {f"train_{k}": v / len(train_loader) for k, v in sums.items()}
        metrics.update(evaluate(vae, val_loader, device))
        tracker.log_metrics(metrics, step=epoch)
        history.append({"epoch": epoch, **metrics})
        log.info("vae epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
        if cfg.train.sample_every and epoch % cfg.train.sample_every == 0:
            tracker.log_image(reconstruction_grid(vae, val_set, device), f"reconstructions/epoch_{epoch:04d}.png")

        if metrics["val_l1"] < best:
            best = metrics["val_l1"]
            best_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        atomic_save({"kind": "vae", "config": to_dict(cfg.model), "state_dict": vae.state_dict(),
                     "optimizer": opt.state_dict(), "epoch": epoch, "history": history}, out_dir / "last.pt")

    # The best weights (by validation L1) become the stage's output, with the latent scale the
    # diffusion stage multiplies latents by so that they have roughly unit variance.
    vae.load_state_dict(best_state)
    scale = 1.0 / latent_std(vae, train_set, device, cfg.train.batch_size)
    atomic_save({"kind": "vae", "config": to_dict(cfg.model), "state_dict": best_state, "history": history,
                 "latent_scale": scale}, out_dir / "best.pt")
    grid = reconstruction_grid(vae, val_set, device)
    grid.save(out_dir / "reconstructions.png")
    tracker.log_image(grid, "reconstructions.png")
    final = {**{k: v for k, v in history[-1].items() if k != "epoch"}, "best_val_l1": best, "latent_scale": scale}
    return final

