"""Cost of the VAE's perceptual loss: forward + backward time per image at a few VGG input sizes.

    python benchmarks/perceptual.py [--net vgg19] [--sizes 112 215] [--batch 8] [--repeats 3] [--threads 2]

Random 215 px reconstructions and targets (as the VAE sees them); one warm-up step per size, then
``--repeats`` timed steps of loss(recon, target).backward(). CPU only.
"""
from __future__ import annotations

import argparse
import time

import torch

from pokesprite.losses import PerceptualLoss


def time_per_image(loss: PerceptualLoss, batch: int, repeats: int, image_size: int = 215) -> float:
    """Mean seconds per image of one forward + backward pass (after a warm-up step)."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    recon = (target + 0.1 * torch.randn(target.shape, generator=g)).requires_grad_(True)

    def step():
        recon.grad = None
        loss(recon, target).backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="vgg19", choices=["vgg16", "vgg19"], help="feature network (default: vgg19)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 215],
                    help="input sizes in pixels to time (default: 112 215)")
    ap.add_argument("--blocks", type=int, default=3, help="VGG blocks whose features are compared (default: 3)")
    ap.add_argument("--batch", type=int, default=8, help="images per timed batch (default: 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per size (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for size in args.sizes:
        loss = PerceptualLoss(args.net, size=size, blocks=args.blocks)
        rows.append((loss.vgg.name, size, time_per_image(loss, args.batch, args.repeats)))

    print(f"perceptual loss, CPU, {args.threads} threads, batch {args.batch}, blocks {args.blocks}, "
          f"{args.repeats} timed repeats")
    print(f"{'net':<6} {'size':>5} {'ms/image (fwd+bwd)':>20}")
    for name, size, seconds in rows:
        print(f"{name:<6} {size:>5} {seconds * 1000:>20.1f}")


if __name__ == "__main__":
    main()
