"""1x1 convolutions as oneDNN convolutions or as batched matrix products (``PointwiseConv``), on the CPU.

    python benchmarks/pointwise.py [--params params.yaml] [--threads 2] [--repeats 7] [--json PATH]

Two tables, both forward + backward, medians of ``--repeats`` timed runs after two warm-ups:

* layers: every 1x1 convolution of the params file's VAE and U-Net (the ResNet blocks' skip
  projections), at the shape and batch size it trains at, run by ``nn.Conv2d``'s forward and by
  ``PointwiseConv``'s on the same weights and inputs;
* steps: one training step of each whole model (forward, a loss, backward, fused AdamW;
  ``training_steps``), with every ``PointwiseConv`` of the model switched to ``nn.Conv2d``'s forward
  and back, interleaved step by step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.config import load_params
from pokesprite.diffusion.schedule import NoiseSchedule
from pokesprite.losses import kl_free_bits
from pokesprite.models.layers import PointwiseConv
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE
from pokesprite.train.common import make_optimizer
from pokesprite.train.diffusion import denoising_loss


def training_steps(p) -> dict[str, tuple[nn.Module, Callable[[], torch.Tensor], float, float]]:
    """The VAE and the U-Net at the params file's sizes, each with a loss on fixed random inputs of
    its training batch size, and its learning rate and weight decay: name -> (model, loss, lr, wd).

    VAE: L1 + free-bits KL (no perceptual term); U-Net: the denoising loss on random latents and
    caption features (as ``benchmarks/peer.py``)."""
    vcfg, vb = p.vae.model, p.vae.train.batch_size
    vae = VAE(vcfg)
    images = torch.rand(vb, 3, vcfg.image_size, vcfg.image_size) * 2 - 1
    captions = torch.randn(vb, p.text.max_tokens, p.text.dim) if vcfg.text_conditioning else None
    w = p.vae.loss

    def vae_loss():
        recon, mean, logvar = vae(images, context=captions)
        return w.l1_weight * F.l1_loss(recon, images) + w.kl_weight * kl_free_bits(mean, logvar, w.free_bits)

    ucfg, ub = p.diffusion.unet, p.diffusion.train.batch_size
    unet = UNet(ucfg, context_dim=p.text.dim)
    schedule = NoiseSchedule(p.diffusion.schedule)
    z0 = torch.randn(ub, ucfg.latent_channels, 27, 27)
    context = torch.randn(ub, p.text.max_tokens, p.text.dim)
    kw = {"kind": p.diffusion.loss, "prediction": p.diffusion.prediction, "min_snr_gamma": p.diffusion.min_snr_gamma}

    def unet_loss():
        return denoising_loss(unet, schedule, z0, context, None, **kw)

    return {"vae": (vae, vae_loss, p.vae.train.lr, p.vae.train.weight_decay),
            "unet": (unet, unet_loss, p.diffusion.train.lr, p.diffusion.train.weight_decay)}


def use_conv2d(model: nn.Module, on: bool) -> None:
    """Run every PointwiseConv of ``model`` with nn.Conv2d's forward (on) or its own (off)."""
    for m in model.modules():
        if isinstance(m, PointwiseConv):
            if on:
                m.forward = types.MethodType(nn.Conv2d.forward, m)
            else:
                m.__dict__.pop("forward", None)


def median_seconds(fns: list[Callable[[], None]], repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, run in turns (first one first, then the other first)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        for j in order:
            start = time.perf_counter()
            fns[j]()
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def skip_shapes(model: nn.Module, example: Callable[[], torch.Tensor]) -> list[tuple[PointwiseConv, tuple]]:
    """Each PointwiseConv of the model with the input shape it sees in one forward pass."""
    seen: list[tuple[PointwiseConv, tuple]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, PointwiseConv)]
    with torch.no_grad():
        example()
    for h in hooks:
        h.remove()
    return seen


def layer_rows(name: str, model: nn.Module, example: Callable[[], torch.Tensor], repeats: int) -> list[dict]:
    rows = []
    for layer, shape in skip_shapes(model, example):
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape[0], layer.out_channels, *shape[2:])

        def run(forward):
            def fn():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                forward(layer, x).backward(grad)
            return fn

        conv, product = median_seconds([run(nn.Conv2d.forward), run(PointwiseConv.forward)], repeats)
        rows.append({"model": name, "input": list(shape), "out_channels": layer.out_channels,
                     "conv2d_ms": conv * 1e3, "product_ms": product * 1e3})
    return rows


def step_row(name: str, model: nn.Module, loss: Callable[[], torch.Tensor], lr: float, wd: float,
             repeats: int) -> dict:
    opt = make_optimizer(model.parameters(), lr, wd)

    def step(conv2d: bool):
        def fn():
            use_conv2d(model, conv2d)
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
        return fn

    conv, product = median_seconds([step(True), step(False)], repeats)
    use_conv2d(model, False)
    return {"model": name, "conv2d_s": conv, "product_s": product}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file whose model and batch sizes are used")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of each variant (the median is reported)")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    p = load_params(args.params)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = training_steps(p)
    layers = [row for name, (model, loss, *_) in models.items() for row in layer_rows(name, model, loss, args.repeats)]
    steps = [step_row(name, *m, args.repeats) for name, m in models.items()]

    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, medians of {args.repeats} "
          f"(after 2 warm-ups), forward + backward")
    print(f"\n{'model':<5} {'input':<20} {'out':>4} {'Conv2d ms':>10} {'product ms':>11} {'speed-up':>9}")
    for r in layers:
        print(f"{r['model']:<5} {'x'.join(map(str, r['input'])):<20} {r['out_channels']:>4} "
              f"{r['conv2d_ms']:>10.1f} {r['product_ms']:>11.1f} {r['conv2d_ms'] / r['product_ms']:>8.2f}x")
    print(f"\n{'training step':<13} {'Conv2d s':>9} {'product s':>10} {'speed-up':>9}")
    for r in steps:
        print(f"{r['model']:<13} {r['conv2d_s']:>9.3f} {r['product_s']:>10.3f} {r['conv2d_s'] / r['product_s']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                       "params_file": args.params, "layers": layers, "steps": steps}, f, indent=2)


if __name__ == "__main__":
    main()
