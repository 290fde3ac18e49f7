"""Training-step time of pokesprite's U-Net and VAE against diffusers models of equal configuration.

    python benchmarks/peer.py [--params params.yaml] [--device cpu] [--threads N] [--warmup 2]
        [--repeats 5] [--models unet vae vae-matched] [--diffusers-geglu] [--breakdown] [--default-malloc]
        [--json PATH]

Needs the ``bench`` extra (``pip install -e ".[bench]"``: diffusers). Every model is built from its
configuration alone; nothing is downloaded.

One training step is forward, loss, backward and a fused AdamW step (``make_optimizer``, the trainers'
optimiser, same lr and weight decay on both sides), at the params file's batch sizes:

* unet: noise-prediction loss (``denoise``: timesteps and noise drawn from the cosine schedule, the
  params file's Huber/MSE loss) on (B, latent_channels, 27, 27) latents, with a random (B, L, dim)
  caption context (L = text.max_tokens, dim = text.dim) and an attention mask with L/2 to L real tokens;
* vae: encode -> sample the posterior -> decode, L1 + free-bits KL. The perceptual (VGG) loss is
  left out of both sides, so that network is measured against network. Our VAE takes the 215 px
  images and pads them to 216 itself; diffusers' AutoencoderKL has no such padding, so it is fed the
  same images already padded to 216 px (replicated last row and column), the size our encoder runs at.

Both models of a pair see the same inputs; their steps are interleaved (warm-up, then the timed
repeats, alternating which runs first), in one process with the same threads and the C allocator
settings pokesprite's commands use (``malloc_settings.for_commands``; ``--default-malloc``: glibc's
defaults). The table gives the
median wall-clock seconds per step, ratio = diffusers time / our time (above 1: ours is faster),
parameters, GFLOPs of one forward + backward (convolutions, matrix products and attention,
``FlopCounterMode``)
the ratio of the median CPU seconds of this process (on a shared machine it counts less of the time
other processes take; with several threads it still counts threads spinning while one waits) and
the ratio of each side's fastest step (the one least disturbed by other processes).

``--breakdown`` then profiles a few more steps of each side (``torch.profiler``) and splits a step's
wall time into convolutions (forward and backward), matrix products, the attention kernel and the
rest (normalisations, activations, copies, the optimiser, Python): it shows how much of a step is
the same kernels on both sides, and so how fast either could get without doing less work.

How the diffusers models are configured, and what still differs:

U-Net (``UNet2DConditionModel``): block_out_channels = unet.channels, layers_per_block =
num_res_blocks, CrossAttn{Down,Up}Block2D where unet.attention is true (else {Down,Up}Block2D),
the cross-attention mid block, unet.heads heads of width channels / heads (diffusers' legacy
``attention_head_dim`` holds the head count), norm_num_groups = unet.groups, cross_attention_dim =
text.dim, linear proj_in/proj_out (``use_linear_projection``), time embedding 4 x channels[0] from a
channels[0]-wide sinusoid. Remaining differences:

* the feed-forward of each transformer block: diffusers builds GEGLU (Linear(c, 8c), gated GELU,
  Linear(4c, c)); ours is Linear(c, 4c), GELU, Linear(4c, c). Its config cannot change that, so each
  block's ``ff`` is replaced by diffusers' own ``FeedForward(c, activation_fn="gelu")``, the same
  layer as ours; ``--diffusers-geglu`` keeps the stock GEGLU (more parameters and FLOPs);
* diffusers' attention q, k and v projections have no bias (ours have, as nn.MultiheadAttention);
* diffusers' sinusoid puts cos first and its transformer GroupNorm uses eps 1e-6 (ours 1e-5): no
  effect on cost;
* initialisation differs (ours zeroes the output conv and each attention block's proj_out);
* diffusers' ResNet blocks divide their output by ``output_scale_factor`` (1.0 here): one
  elementwise pass more per block (in both models).

VAE (``AutoencoderKL``): block_out_channels = vae.channels, layers_per_block = num_res_blocks,
latent_channels, norm_num_groups = vae.groups, no mid-block attention (``mid_block_add_attention``
false: ours has none), no quant_conv / post_quant_conv 1x1 convolutions (ours has none). Two rows:

* vae: that AutoencoderKL as its config builds it. Its decoder has layers_per_block + 1 ResNet
  blocks per resolution where ours has num_res_blocks, so it does notably more work (GFLOPs column);
* vae-matched: the same, with the decoder rebuilt from diffusers' own ``Decoder`` class with
  layers_per_block - 1, i.e. num_res_blocks ResNet blocks per resolution, as ours.

Remaining differences in both rows:

* diffusers' mid blocks (encoder and decoder) have two ResNet blocks at 27 px, ours one each (two
  128-channel 3x3 convolutions more per mid block: about 10% of vae-matched's FLOPs);
* diffusers' downsampling pads (0, 1, 0, 1) then runs a stride-2 conv without padding; ours a
  stride-2 conv with padding 1 (the same output size and cost); its GroupNorms use eps 1e-6 (ours 1e-5);
* the L1 loss: ours on the 215 px crop it returns, diffusers' on the 216 px image it decodes.

Only text_conditioning false is compared (the decoder's cross-attention has no AutoencoderKL
counterpart).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pokesprite import malloc_settings
from pokesprite.config import load_params
from pokesprite.diffusion.schedule import NoiseSchedule
from pokesprite.losses import kl_free_bits
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE, sample_posterior
from pokesprite.train.common import make_optimizer
from pokesprite.train.diffusion import denoising_loss


PAIRS = ("unet", "vae", "vae-matched")


@dataclass
class Contender:
    model: nn.Module
    loss: Callable[[], torch.Tensor]  # one forward pass and the training loss


def diffusers_unet(p, geglu: bool) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import FeedForward

    cfg = p.diffusion.unet
    unet = UNet2DConditionModel(
        sample_size=27, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=cfg.heads, norm_num_groups=cfg.groups,
        cross_attention_dim=p.text.dim, use_linear_projection=True)
    if not geglu:
        for name, block in unet.named_modules():
            if hasattr(block, "ff") and isinstance(block.ff, FeedForward):
                block.ff = FeedForward(block.ff.net[-1].out_features, activation_fn="gelu")
    return unet


def diffusers_vae(p, matched_decoder: bool) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder

    cfg = p.vae.model
    n = len(cfg.channels)
    kw = dict(up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.channels),
              norm_num_groups=cfg.groups, mid_block_add_attention=False)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.latent_channels, sample_size=cfg.image_size,
        use_quant_conv=False, use_post_quant_conv=False, **kw)
    if matched_decoder:  # (layers_per_block - 1) + 1 = num_res_blocks ResNet blocks per resolution, as ours
        vae.decoder = Decoder(in_channels=cfg.latent_channels, out_channels=3, layers_per_block=cfg.num_res_blocks - 1,
                              **kw)
    return vae


def unet_batch(p, device, masked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random (latents, caption features, attention mask) of the U-Net's training batch size."""
    cfg, b, L = p.diffusion.unet, p.diffusion.train.batch_size, p.text.max_tokens
    z0 = torch.randn(b, cfg.latent_channels, 27, 27, device=device)
    context = torch.randn(b, L, p.text.dim, device=device)
    # Real captions have a median of 131 tokens (README), so most rows fill all L; some are shorter.
    mask = torch.arange(L, device=device)[None] < torch.randint(L // 2, L + 1, (b, 1), device=device)
    return z0, context, mask if masked else None


def _denoising(p, model, batch) -> Callable[[], torch.Tensor]:
    schedule = NoiseSchedule(p.diffusion.schedule)
    kw = {"kind": p.diffusion.loss, "prediction": p.diffusion.prediction, "min_snr_gamma": p.diffusion.min_snr_gamma}
    return lambda: denoising_loss(model, schedule, *batch, **kw)


def our_unet(p, device, batch) -> Contender:
    """pokesprite's U-Net at the params file's sizes, with its denoising loss on ``batch``."""
    ours = UNet(p.diffusion.unet, context_dim=p.text.dim).to(device)
    return Contender(ours, _denoising(p, ours, batch))


def unet_pair(p, device, geglu: bool) -> tuple[Contender, Contender]:
    batch = unet_batch(p, device)
    theirs = diffusers_unet(p, geglu).to(device)

    def call_theirs(zt, t, ctx, m):
        return theirs(zt, t, encoder_hidden_states=ctx, encoder_attention_mask=m).sample

    return our_unet(p, device, batch), Contender(theirs, _denoising(p, call_theirs, batch))


def _vae_loss(p, recon, target, mean, logvar) -> torch.Tensor:
    w = p.vae.loss
    return w.l1_weight * F.l1_loss(recon, target) + w.kl_weight * kl_free_bits(mean, logvar, w.free_bits)


def vae_images(p, device) -> torch.Tensor:
    """Random images in [-1, 1] of the VAE's training batch size and image size."""
    size = p.vae.model.image_size
    return torch.rand(p.vae.train.batch_size, 3, size, size, device=device) * 2 - 1


def our_vae(p, device, images: torch.Tensor) -> Contender:
    """pokesprite's VAE at the params file's sizes, with L1 + free-bits KL (no perceptual term) on
    ``images``."""
    cfg = p.vae.model
    ours = VAE(cfg).to(device)
    captions = (torch.randn(len(images), p.text.max_tokens, p.text.dim, device=device)
                if cfg.text_conditioning else None)

    def loss():
        recon, mean, logvar = ours(images, context=captions)
        return _vae_loss(p, recon, images, mean, logvar)

    return Contender(ours, loss)


def vae_pair(p, device, matched_decoder: bool) -> tuple[Contender, Contender]:
    x = vae_images(p, device)
    ours = our_vae(p, device, x)
    theirs = diffusers_vae(p, matched_decoder).to(device)
    pad = ours.model.padded - p.vae.model.image_size
    x_padded = F.pad(x, (0, pad, 0, pad), mode="replicate")

    def theirs_loss():
        posterior = theirs.encode(x_padded).latent_dist
        recon = theirs.decode(sample_posterior(posterior.mean, posterior.logvar)).sample
        return _vae_loss(p, recon, x_padded, posterior.mean, posterior.logvar)

    return ours, Contender(theirs, theirs_loss)


def step_fn(c: Contender, lr: float, weight_decay: float) -> Callable[[], None]:
    opt = make_optimizer(c.model.parameters(), lr, weight_decay)

    def step():
        opt.zero_grad(set_to_none=True)
        c.loss().backward()
        opt.step()

    return step


def timed(step, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# FlopCounterMode knows the GPU attention kernels only; the CPU's fused one does the same products.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def gflops(c: Contender) -> float:
    """Forward + backward FLOPs of one training step, in units of 1e9."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        c.loss().backward()
    c.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


KINDS = ("convolution", "matmul", "attention", "rest")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind_of(op_name: str) -> str:
    """Which part of a step a profiled op belongs to (one of KINDS)."""
    if "convolution" in op_name:  # forward, backward and their aten wrappers
        return "convolution"
    if "scaled_dot_product" in op_name:
        return "attention"
    return "matmul" if op_name in MATMULS else "rest"


def breakdown(step, steps: int = 3) -> dict:
    """Seconds per step of each of KINDS on the CPU: the ops' own time of the three kernel kinds, and
    the rest of the (profiled) step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - wall) / steps
    out = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        out[kind_of(event.key)] += event.self_cpu_time_total / 1e6 / steps
    out["rest"] = wall - out["convolution"] - out["matmul"] - out["attention"]
    out["step"] = wall
    return out


def race(pair: tuple[Contender, Contender], train_cfg, device, warmup: int, repeats: int) -> dict:
    steps = [step_fn(c, train_cfg.lr, train_cfg.weight_decay) for c in pair]
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for i in range(warmup + repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for j in order:
            w, c = timed(steps[j], device)
            if i >= warmup:
                wall[j].append(w)
                cpu[j].append(c)
    return {
        "ours_s": statistics.median(wall[0]), "diffusers_s": statistics.median(wall[1]),
        "ours_cpu_s": statistics.median(cpu[0]), "diffusers_cpu_s": statistics.median(cpu[1]),
        "ours_times": wall[0], "diffusers_times": wall[1], "ours_cpu_times": cpu[0], "diffusers_cpu_times": cpu[1],
        "ours_params": sum(q.numel() for q in pair[0].model.parameters()),
        "diffusers_params": sum(q.numel() for q in pair[1].model.parameters()),
        "ours_gflops": gflops(pair[0]), "diffusers_gflops": gflops(pair[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file whose model sizes and batch sizes are used")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps of each model (the median is reported)")
    ap.add_argument("--models", nargs="+", choices=PAIRS, default=list(PAIRS),
                    help="which comparisons to run (default: all)")
    ap.add_argument("--diffusers-geglu", action="store_true",
                    help="keep diffusers' GEGLU feed-forward instead of the GELU one ours has")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile each side and split its step into convolutions, matmuls, attention, "
                         "rest (CPU only)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default malloc settings (by default both sides run under "
                         "pokesprite.malloc_settings.for_commands(), as pokesprite's commands do)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()

    if not args.default_malloc:
        malloc_settings.for_commands()
    p = load_params(args.params)
    if p.vae.model.text_conditioning and any(m.startswith("vae") for m in args.models):
        ap.error("the VAE comparison needs vae.model.text_conditioning false (AutoencoderKL has no text)")
    device = torch.device(args.device)
    if args.breakdown and device.type != "cpu":
        ap.error("--breakdown splits CPU time; on a GPU, profile with benchmarks/gpu_throughput.py --profile-trace")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import diffusers

    load_before = os.getloadavg()
    results = {}
    for name in args.models:
        if name == "unet":
            pair = unet_pair(p, device, args.diffusers_geglu)
        else:
            pair = vae_pair(p, device, matched_decoder=name == "vae-matched")
        train_cfg = p.diffusion.train if name == "unet" else p.vae.train
        results[name] = {"batch": train_cfg.batch_size,
                         **race(pair, train_cfg, device, args.warmup, args.repeats)}
        results[name]["ratio"] = results[name]["diffusers_s"] / results[name]["ours_s"]
        results[name]["cpu_ratio"] = results[name]["diffusers_cpu_s"] / results[name]["ours_cpu_s"]
        results[name]["fastest_ratio"] = min(results[name]["diffusers_times"]) / min(results[name]["ours_times"])
        if args.breakdown:
            results[name]["breakdown"] = {side: breakdown(step_fn(c, train_cfg.lr, train_cfg.weight_decay))
                                          for side, c in zip(("ours", "diffusers"), pair)}
    load_after = os.getloadavg()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.warmup} warm-up + {args.repeats} timed steps each")
    print(f"load average (1, 5, 15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")
    header = (f"{'model':<11} {'batch':>5} {'ours s/step':>12} {'diffusers s/step':>17} {'ratio':>6} "
              f"{'params ours / diffusers':>24} {'GFLOPs ours / diffusers':>24} {'CPU-time ratio':>15} "
              f"{'fastest ratio':>14}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        params = f"{r['ours_params'] / 1e6:.2f}M / {r['diffusers_params'] / 1e6:.2f}M"
        flops = f"{r['ours_gflops']:.1f} / {r['diffusers_gflops']:.1f}"
        print(f"{name:<11} {r['batch']:>5} {r['ours_s']:>12.3f} {r['diffusers_s']:>17.3f} {r['ratio']:>5.2f}x "
              f"{params:>24} {flops:>24} {r['cpu_ratio']:>14.2f}x {r['fastest_ratio']:>13.2f}x")
    print("ratio = diffusers time / our time (medians of wall-clock seconds); GFLOPs of one forward + backward;\n"
          "CPU-time ratio: the same of this process's CPU seconds; fastest ratio: of each side's fastest step\n"
          "(the two are less disturbed by other processes on a shared machine)")

    if args.breakdown:
        print("\nwhere a step goes (torch.profiler; seconds per step, the ops' own time; 'rest' is the step's wall\n"
              "time less the three kernel kinds: norms, activations, copies, the optimiser, Python)")
        print(f"{'model':<11} {'side':<10} " + " ".join(f"{k:>12}" for k in KINDS) + f" {'step':>8}")
        for name, r in results.items():
            for side, b in r.get("breakdown", {}).items():
                print(f"{name:<11} {side:<10} " + " ".join(f"{b[k]:>12.3f}" for k in KINDS) + f" {b['step']:>8.3f}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device),
                       "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
                       "params_file": args.params, "diffusers_geglu": args.diffusers_geglu,
                       "loadavg_before": load_before, "loadavg_after": load_after, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
