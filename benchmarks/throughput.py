"""Training throughput (images/s) and peak memory of the VAE and U-Net at the sizes in a params file.

    python benchmarks/throughput.py [--params params.yaml] [--device cpu] [--steps 3]

Random inputs of the real shapes; one warm-up step, then ``--steps`` timed optimiser steps.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from pokesprite.config import load_params
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE


def bench(step, batch: int, steps: int, device) -> float:
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file whose sizes are timed (default: params.yaml)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model (default: 3)")
    args = ap.parse_args()
    p = load_params(args.params)
    device = torch.device(args.device)
    torch.manual_seed(0)

    vae = VAE(p.vae.model).to(device)
    opt = torch.optim.AdamW(vae.parameters())
    b = p.vae.train.batch_size
    x = torch.rand(b, 3, 215, 215, device=device) * 2 - 1

    def vae_step():
        recon, _, _ = vae(x)
        opt.zero_grad()
        (recon - x).abs().mean().backward()
        opt.step()

    unet = UNet(p.diffusion.unet, context_dim=p.text.dim).to(device)
    opt2 = torch.optim.AdamW(unet.parameters())
    b2 = p.diffusion.train.batch_size
    z = torch.randn(b2, p.diffusion.unet.latent_channels, 27, 27, device=device)
    ctx = torch.randn(b2, p.text.max_tokens, p.text.dim, device=device)
    t = torch.randint(0, 1000, (b2,), device=device)

    def unet_step():
        opt2.zero_grad()
        (unet(z, t, ctx) - z).square().mean().backward()
        opt2.step()

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for name, model, step, batch in (("vae", vae, vae_step, b), ("unet", unet, unet_step, b2)):
        n = sum(q.numel() for q in model.parameters()) / 1e6
        rate = bench(step, batch, args.steps, device)
        print(f"{name}: {n:.2f}M params, batch {batch}: {rate:.1f} train img/s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
