"""Text -> sprites: the combined model (text encoder + U-Net + schedule + VAE decoder).

Used by the training stages for sample grids, by the registered MLflow model and by the CLI.
A saved pipeline is one folder, loadable without the repository or the network:

    pipeline.pt      VAE, U-Net and text projection weights, the configs that built them,
                     the schedule config, what the U-Net predicts (eps or v), the latent scale
                     and the default sampling settings
    text_encoder/    the (fine-tuned) transformer and its tokenizer, in Hugging Face format
"""
from __future__ import annotations

from pathlib import Path

import contextlib
import math
import time

import numpy as np
import torch

from pokesprite.config import (MAX_PROMPT_CHARS, MAX_SEED, SampleConfig, ScheduleConfig, TextConfig, UNetConfig,
                               VAEConfig, from_dict, to_dict)
from pokesprite.data.dataset import to_uint8
from pokesprite.diffusion.samplers import gaussian, make_sampler
from pokesprite.diffusion.schedule import PREDICTIONS, NoiseSchedule, check_prediction
from pokesprite.models.text import TextEncoder
from pokesprite.models.unet import UNet
from pokesprite.models.vae import VAE
from pokesprite.checkpoints import atomic_save, load_checkpoint, require_weights
from pokesprite.files import atomic_folder

PIPELINE_FILE = "pipeline.pt"
TEXT_DIR = "text_encoder"


class DrawingTimeout(TimeoutError):
    """A request's deadline passed while its sprites were being drawn; the drawing stopped there."""


def load_diffusion_checkpoint(path: Path) -> dict:
    """A stage-2 checkpoint, always with ``prediction`` and ``min_snr_gamma``: older ones, written before
    these existed, trained eps without weighting, so they read as "eps" and 0."""
    ckpt = require_weights(load_checkpoint(path, "diffusion"), path, "unet", "text_proj")
    ckpt.setdefault("prediction", "eps")
    ckpt.setdefault("min_snr_gamma", 0.0)
    if ckpt["prediction"] not in PREDICTIONS:
        raise ValueError(f"{path}: unknown prediction {ckpt['prediction']!r}; expected one of {', '.join(PREDICTIONS)}")
    return ckpt


def guided_output(unet, x, t, context, mask, uncond_context, uncond_mask, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + scale * (out_c - out_u).

    The conditional and unconditional predictions run as one batch; scale 1 gives out_c. The output may
    be eps or v: at a fixed x_t, v = (eps - sqrt(1 - ab) x_t) / sqrt(ab) is affine in eps and the two
    weights (1 - scale, scale) sum to 1, so guiding v is guiding eps.
    """
    n = x.shape[0]
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_context, context]),
               torch.cat([uncond_mask, mask]))
    out_u, out_c = out[:n].float(), out[n:].float()  # combined in fp32 under autocast too
    return out_u + scale * (out_c - out_u)


class SpritePipeline:
    def __init__(self, vae: VAE, unet: UNet, text: TextEncoder, schedule: NoiseSchedule, *,
                 latent_scale: float, sample: SampleConfig, latent_clamp: float = 3.0, prediction: str = "eps"):
        self.vae, self.unet, self.text, self.schedule = vae, unet, text, schedule
        self.latent_scale = latent_scale
        self.sample = sample
        self.latent_clamp = latent_clamp  # predicted x0 (scaled latents) clamped to +-this; 0 = off
        self.prediction = check_prediction(prediction)  # what the U-Net outputs: eps or v

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> "SpritePipeline":
        """Move every network to ``device``; returns the pipeline."""
        for m in (self.vae, self.unet, self.text):
            m.to(device)
        return self

    def check_request(self, prompts, *, seed: int = 0, num_steps: int | None = None,
                      guidance_scale: float | None = None, sampler: str | None = None) -> list[str]:
        """The prompts as a list, after checking a request before any work: ValueError naming the problem.

        Prompts are text ("" is the explicit unconditional prompt); the seed a whole number with every
        sprite's seed (``seed + i``) in 0..MAX_SEED; steps within the schedule; guidance a finite
        number >= 0; a known sampler.
        """
        from pokesprite.diffusion.samplers import SAMPLERS

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is {type(p).__name__} {p!r}, not text")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt {i} is {len(p)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
        if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
                and 0 <= seed <= MAX_SEED - (len(prompts) - 1)):
            raise ValueError(f"seed must be a whole number in 0..{MAX_SEED - (len(prompts) - 1)} "
                             f"(sprite i is drawn with seed + i), got {seed!r}")
        if num_steps is not None and not (isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
                                          and 1 <= num_steps <= self.schedule.timesteps):
            raise ValueError(f"num_steps must be a whole number in 1..{self.schedule.timesteps}, got {num_steps!r}")
        if guidance_scale is not None:
            try:
                ok = math.isfinite(float(guidance_scale)) and float(guidance_scale) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError("guidance_scale must be a finite number >= 0 (1 = no guidance), "
                                 f"got {guidance_scale!r}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        return prompts

    def truncation_notes(self, prompts: list[str]) -> list[str]:
        """One line per distinct prompt longer than the text encoder reads (``text.max_tokens``, [CLS] and
        [SEP] included), naming its first index."""
        limit, first = self.text.max_tokens, {}
        for i, p in enumerate(prompts):
            first.setdefault(p, i)
        counts = self.text.token_counts(list(first))
        return [f"prompt {i} is {n} tokens long; only its first {limit} are read (text.max_tokens), the rest "
                "is ignored" for i, n in zip(first.values(), counts) if n > limit]

    @torch.no_grad()
    def __call__(self, prompts: list[str], *, seed: int = 0, num_steps: int | None = None,
                 guidance_scale: float | None = None, sampler: str | None = None,
                 precision: str = "fp32", batch: int | None = None, deadline: float | None = None) -> np.ndarray:
        """Draw one sprite per prompt: (N, 215, 215, 3) uint8.

        Sprite i is drawn with its own seed, ``seed + i``, from a noise generator of its own: it is the
        same sprite whatever else the request holds (``seed=s + i`` with ``prompts[i]`` alone redraws
        it; equal up to the last bits of float arithmetic, which batch size can change).
        ``num_steps``, ``guidance_scale`` and ``sampler`` default to ``self.sample``; the request is
        checked first (``check_request``). At most ``batch`` (default ``self.sample.batch``) sprites are
        drawn at a time. ``precision="bf16"``
        runs the U-Net and the decoder under bf16 autocast; the sampler's update stays fp32.
        ``deadline`` (a ``time.monotonic()`` value) stops the drawing with ``DrawingTimeout`` at the
        first step that starts after it.
        """
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        prompts = self.check_request(prompts, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale,
                                     sampler=sampler)
        batch = batch or self.sample.batch
        scale = self.sample.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.sample.steps if num_steps is None else int(num_steps)
        modules = (self.vae, self.unet, self.text)
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return np.concatenate([self._draw(prompts[i:i + batch], int(seed) + i, steps, scale,
                                              sampler or self.sample.sampler, precision, deadline)
                                   for i in range(0, len(prompts), batch)])
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)

    def _draw(self, prompts: list[str], seed: int, steps: int, scale: float, sampler: str,
              precision: str, deadline: float | None = None) -> np.ndarray:
        """One batch; sprite j is seeded with ``seed + j``."""
        device, n = self.device, len(prompts)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        g = [torch.Generator().manual_seed(seed + j) for j in range(n)]
        tok = self.text.tokenize(prompts, device)
        context, mask = self.text(**tok), tok["attention_mask"]  # (N, L, dim), (N, L)
        if scale != 1.0:
            empty = self.text.tokenize([""] * n, device)
            uncond, uncond_mask = self.text(**empty), empty["attention_mask"]
        sampler_ = make_sampler(sampler, self.schedule, steps, self.latent_clamp, prediction=self.prediction)
        c, s = self.unet.cfg.latent_channels, self.vae.latent_size
        x = gaussian((n, c, s, s), g).to(device)
        for i, t in enumerate(sampler_.timesteps):
            if deadline is not None and time.monotonic() > deadline:
                raise DrawingTimeout(f"the request's time ran out at step {i + 1} of {len(sampler_.timesteps)}; "
                                     "drawing stopped")
            t = t.repeat(n).to(device)
            with autocast:
                if scale == 1.0:
                    out = self.unet(x, t, context, mask)  # eps or v, as self.prediction says
                else:
                    out = guided_output(self.unet, x, t, context, mask, uncond, uncond_mask, scale)
            x = sampler_.step(out.float(), i, x, generator=g)
        with autocast:
            images = self.decode(x, tok).float()
        return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()

    def decode(self, z: torch.Tensor, tok: dict | None = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (unclamped); a text-conditioned VAE also reads the caption tokens."""
        if self.vae.cfg.text_conditioning:
            if tok is None:
                raise ValueError("this VAE decodes with the caption: pass its tokens")
            return self.vae.decode(z / self.latent_scale, self.text.hidden_states(**tok), tok["attention_mask"])
        return self.vae.decode(z / self.latent_scale)

    def save(self, directory: Path) -> Path:
        """Write the pipeline as a folder (text encoder and tokenizer, then everything else), which
        replaces ``directory`` whole once written: a crash never leaves a mix of two pipelines."""
        directory = Path(directory)
        with atomic_folder(directory) as staging:
            self.text.save_transformer(staging / TEXT_DIR)
            atomic_save({
                "kind": "pipeline",
                "vae": {"config": to_dict(self.vae.cfg), "state_dict": self.vae.state_dict(),
                        "context_dim": self.vae.context_dim},
                "unet": {"config": to_dict(self.unet.cfg), "state_dict": self.unet.state_dict()},
                "text": {"dim": self.text.proj.out_features, "max_tokens": self.text.max_tokens,
                         "proj": self.text.proj.state_dict()},
                "schedule": to_dict(self.schedule.cfg),
                "latent_scale": self.latent_scale,
                "latent_clamp": self.latent_clamp,
                "prediction": self.prediction,
                "sample": to_dict(self.sample),
            }, staging / PIPELINE_FILE)
        return directory

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> "SpritePipeline":
        directory = Path(directory)
        path = directory / PIPELINE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a saved pokesprite pipeline")
        ckpt = load_checkpoint(path, "pipeline")
        vae = VAE(from_dict(VAEConfig, ckpt["vae"]["config"], "vae"), context_dim=ckpt["vae"].get("context_dim") or 0)
        vae.load_state_dict(ckpt["vae"]["state_dict"])
        text = TextEncoder.from_pretrained(str(directory / TEXT_DIR), dim=ckpt["text"]["dim"],
                                           max_tokens=ckpt["text"]["max_tokens"])
        text.proj.load_state_dict(ckpt["text"]["proj"])
        unet = UNet(from_dict(UNetConfig, ckpt["unet"]["config"], "unet"), context_dim=ckpt["text"]["dim"])
        unet.load_state_dict(ckpt["unet"]["state_dict"])
        schedule = NoiseSchedule(from_dict(ScheduleConfig, ckpt["schedule"], "schedule"))
        vae.for_inference(device)
        for m in (unet, text):
            m.to(device).eval()
        return cls(vae, unet, text, schedule, latent_scale=ckpt["latent_scale"],
                   sample=from_dict(SampleConfig, ckpt["sample"], "sample"),
                   latent_clamp=ckpt.get("latent_clamp", 3.0),
                   prediction=ckpt.get("prediction", "eps"))  # pipelines saved before v-prediction: eps

    @classmethod
    def from_checkpoints(cls, vae_checkpoint: Path, diffusion_checkpoint: Path | dict,
                         device: str | torch.device = "cpu") -> "SpritePipeline":
        """The combined model from a VAE stage's and a diffusion stage's checkpoints (a path, or the dict
        ``load_diffusion_checkpoint`` returned), in eval mode on ``device``; the text encoder is the
        bundled transformer with the stage-2 projection."""
        ckpt = diffusion_checkpoint if isinstance(diffusion_checkpoint, dict) else \
            load_diffusion_checkpoint(diffusion_checkpoint)
        vae = VAE.from_checkpoint(vae_checkpoint, device)
        text_cfg = from_dict(TextConfig, ckpt["text_config"], "text")
        text = TextEncoder.from_pretrained(text_cfg.model, dim=text_cfg.dim, max_tokens=text_cfg.max_tokens)
        text.proj.load_state_dict(ckpt["text_proj"])
        unet = UNet(from_dict(UNetConfig, ckpt["unet_config"], "diffusion.unet"), context_dim=text_cfg.dim)
        unet.load_state_dict(ckpt["unet"])
        schedule = NoiseSchedule(from_dict(ScheduleConfig, ckpt["schedule_config"], "diffusion.schedule"))
        return cls(vae, unet.to(device).eval(), text.to(device).eval(), schedule, latent_scale=vae.latent_scale,
                   sample=from_dict(SampleConfig, ckpt.get("sample", {}), "diffusion.sample"),
                   latent_clamp=ckpt.get("latent_clamp", 3.0), prediction=ckpt["prediction"])

    @staticmethod
    def sample_defaults(directory: Path) -> SampleConfig:
        """The saved sampling settings, read without building the models."""
        ckpt = load_checkpoint(Path(directory) / PIPELINE_FILE, "pipeline")
        return from_dict(SampleConfig, ckpt["sample"], "sample")
