"""Text-image alignment model that scores stage 3's sprites against their captions (a small CLIP).

No CLIP weights can be downloaded, so by default pokesprite trains its own on the training split:
two FROZEN pretrained towers with small trainable projection heads on top, trained with
CLIP's contrastive loss (``pokesprite.contrastive.clip_loss``).

* text tower: a separate frozen copy of the bundled all-MiniLM-L6-v2, mean-pooled over the
  attention mask (as sentence-transformers pools this model) -> 384-d;
* image tower: ImageNet VGG19 conv features (``pokesprite.models.vgg``) of the sprite resized to
  ``image_size``: the last ReLU map of block 4, global average + max pooled -> 2 x 512-d. On the
  real validation split block 4 beat block 5 (val ClipLoss 4.07 vs 4.29, top-1 0.17 vs 0.10; one
  seed, no dropout) and avg + max beat avg alone (4.07 vs 4.17);
* heads: standardise the tower features with the training split's statistics, dropout, then one
  linear projection to ``dim``; L2-normalised outputs and a learnable CLIP temperature. With ~700
  pairs the heads overfit within a few epochs; a 2-layer MLP head gave no better validation loss,
  while input dropout 0.5 raised validation retrieval a little.

Because the towers are frozen, ``pokesprite.train.alignment.train_alignment`` runs them once over
the data and trains only the heads on the cached features (seconds on a CPU). When
``AlignmentConfig.clip_checkpoint`` names a pretrained open_clip checkpoint file,
``OpenClipAlignment`` wraps it behind the same interface.

Both models share: ``encode_text(captions) -> (B, D)``, ``encode_image(images in [-1, 1]) -> (B, D)``
(unit norm; gradients flow back to the images), ``logit_scale`` (the log temperature parameter, as
in CLIP) and ``scale`` (its exponential clamped at 100, what multiplies the cosines in the loss).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.config import AlignmentConfig
from pokesprite.contrastive import clip_scale

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "alignment"
TEXT_MAX_TOKENS = 256  # captions are up to ~206 MiniLM tokens
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
VGG_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}  # output channels of each VGG block (16 and 19)
TEXT_TOWER, IMAGE_TOWER, VGG_BLOCK, HEAD_DROPOUT = "bundled", "vgg19", 4, 0.5  # the choices measured above
# What checkpoints record of the towers and heads besides dim and image_size (these were options once).
ARCHITECTURE = {"text_model": TEXT_TOWER, "vgg": IMAGE_TOWER, "vgg_blocks": VGG_BLOCK, "max_pool": True,
                "head_hidden": 0, "head_dropout": HEAD_DROPOUT}


# ----------------------------------------------------------------------------- shared helpers

def _resize(images: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Differentiable antialiased resize of (B, 3, H, W) images to ``size`` (int or (h, w))."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    # float32: the antialiased resize has no bfloat16 kernel on the CPU
    return F.interpolate(images.float(), size=size, mode=mode, align_corners=False, antialias=True)


@torch.no_grad()
def batched_apply(fn: Callable, items, batch_size: int, device) -> torch.Tensor:
    """Run ``fn`` over ``items`` (a tensor or a list) in batches without gradients; concatenate on CPU."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.to(device)
        out.append(fn(chunk).float().cpu())
    return torch.cat(out)


@contextlib.contextmanager
def one_thread(device):
    """Run tiny CPU ops on one thread: for the heads' small matmuls, intra-op threads only add overhead
    (measured ~10x slower per step with 2 threads on a busy 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Frozen(nn.Module):
    """Base of the alignment models: ``freeze()`` and towers that never leave eval mode."""

    def freeze(self):
        """Freeze every weight (towers, heads, temperature), drop stale gradients, switch to eval; returns self."""
        self.requires_grad_(False)
        for p in self.parameters():
            p.grad = None
        return self.eval()

    @property
    def scale(self) -> torch.Tensor:
        """The CLIP temperature exp(logit_scale), clamped at 100."""
        return clip_scale(self.logit_scale)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device


# ----------------------------------------------------------------------------- the model trained here

class ProjectionHead(nn.Module):
    """Standardise frozen tower features (training-split statistics), then one linear layer to ``dim``.
    Dropout acts on the standardised input features during training only.
    """

    def __init__(self, in_dim: int, dim: int, *, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, dim))  # state keys net.1.*

    @torch.no_grad()
    def fit_stats(self, features: torch.Tensor) -> None:
        """Set the standardisation from (N, in_dim) training features."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_text_tower(name: str = "bundled"):
    """A frozen BERT-family transformer and its tokenizer (the bundled all-MiniLM-L6-v2 by default)."""
    from transformers import AutoModel

    from pokesprite.models.text import load_tokenizer, resolve_model_path

    transformer = AutoModel.from_pretrained(resolve_model_path(name))
    return transformer.requires_grad_(False).eval(), load_tokenizer(name)


def build_image_tower(name: str = "vgg19") -> nn.Module:
    """The frozen ImageNet VGG feature extractor of ``pokesprite.models.vgg``."""
    from pokesprite.models.vgg import load_vgg

    return load_vgg(name).requires_grad_(False).eval()


class AlignmentModel(_Frozen):
    """Frozen MiniLM + VGG towers with trainable projection heads to a shared ``dim``-d space."""

    def __init__(self, *, dim: int = 256, image_size: int = 112):
        super().__init__()
        self.hparams = {"dim": dim, "image_size": image_size, **ARCHITECTURE}
        self.image_size = image_size
        self.text_tower, self.tokenizer = build_text_tower(TEXT_TOWER)
        self.image_tower = build_image_tower(IMAGE_TOWER)
        text_dim = self.text_tower.config.hidden_size
        image_dim = 2 * VGG_CHANNELS[VGG_BLOCK]  # average + max pooled
        self.text_head = ProjectionHead(text_dim, dim, dropout=HEAD_DROPOUT)
        self.image_head = ProjectionHead(image_dim, dim, dropout=HEAD_DROPOUT)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def train(self, mode: bool = True):
        """Only the heads switch mode: the frozen towers always run in eval (no dropout)."""
        super().train(mode)
        self.text_tower.eval()
        self.image_tower.eval()
        return self

    # -- towers (frozen; their outputs can be cached) --

    def text_features(self, captions: list[str]) -> torch.Tensor:
        """Mean-pooled last hidden states of the frozen text tower, (B, 384)."""
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=TEXT_MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        hidden = self.text_tower(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Globally average and max pooled VGG features (block ``VGG_BLOCK``) of images in [-1, 1],
        (B, 1024); differentiable with respect to the images."""
        x = _resize(images.to(self.device), self.image_size)
        fmap = self.image_tower(x, blocks=VGG_BLOCK)[-1]
        return torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], dim=1)

    # -- joint space --

    def embed_text(self, features: torch.Tensor) -> torch.Tensor:
        """Cached text-tower features -> unit-norm joint embeddings."""
        return F.normalize(self.text_head(features), dim=-1)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """Cached image-tower features -> unit-norm joint embeddings."""
        return F.normalize(self.image_head(features), dim=-1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.embed_text(self.text_features(captions))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_image(self.image_features(images))

    # -- persistence --

    def trained_state(self) -> dict:
        """What training changes: the heads (with their statistics) and the temperature."""
        return {"text_head": copy.deepcopy(self.text_head.state_dict()),
                "image_head": copy.deepcopy(self.image_head.state_dict()),
                "logit_scale": self.logit_scale.detach().clone()}

    def load_trained_state(self, state: dict) -> None:
        self.text_head.load_state_dict(state["text_head"])
        self.image_head.load_state_dict(state["image_head"])
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale"])

    def save(self, path: Path, cfg: AlignmentConfig | None = None, history: list[dict] | None = None) -> None:
        """Atomically write the heads, temperature and tower names (not the towers' weights)."""
        from pokesprite.checkpoints import atomic_save

        state = {k: v.cpu() if isinstance(v, torch.Tensor) else {n: t.cpu() for n, t in v.items()}
                 for k, v in self.trained_state().items()}
        atomic_save({"kind": CHECKPOINT_KIND, "hparams": self.hparams, "state": state,
                     "config": asdict(cfg) if cfg is not None else None, "history": history or []}, path)

    @classmethod
    def load(cls, path: Path, device="cpu") -> AlignmentModel:
        """Rebuild the frozen towers from the installed packages and load the saved heads; frozen."""
        from pokesprite.checkpoints import load_checkpoint

        ckpt = load_checkpoint(path, CHECKPOINT_KIND)
        hparams = dict(ckpt["hparams"])
        built = {k: hparams.pop(k) for k in ARCHITECTURE if k in hparams}
        if any(ARCHITECTURE[k] != v for k, v in built.items()):
            raise ValueError(f"{path}: an alignment model built with {built}; pokesprite builds {ARCHITECTURE} "
                             "only: train it again (dvc repro --force alignment)")
        model = cls(**hparams)
        model.load_trained_state(ckpt["state"])
        return model.to(device).freeze()


# ----------------------------------------------------------------------------- a pretrained open_clip model

class OpenClipAlignment(_Frozen):
    """A pretrained open_clip model behind the alignment interface, frozen (a SigLIP ``logit_bias`` is
    not exposed: ``scale`` and the cosines are what the interface offers).

    Our [-1, 1] sprites are mapped to [0, 1], resized (differentiably) to the model's input size
    with its interpolation, and normalised with its mean and std; sprites are square, so this equals
    open_clip's resize + centre crop.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess_cfg: dict):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.input_size = preprocess_cfg.get("size", 224)
        self.interpolation = "bicubic" if preprocess_cfg.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, model_name: str = "ViT-B-32",
                        device="cpu") -> OpenClipAlignment:
        """Build ``model_name`` with the weights of the local checkpoint file (never a download tag)."""
        import open_clip

        path = existing_checkpoint(checkpoint)
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, tokenizer, open_clip.get_model_preprocess_cfg(model)).to(device)

    def train(self, mode: bool = True):
        """The wrapped model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions)).to(self.device)
        return self.model.encode_text(tokens, normalize=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.to(self.device).add(1).mul(0.5), self.input_size, self.interpolation)
        return self.model.encode_image((x - self.mean) / self.std, normalize=True)


def existing_checkpoint(checkpoint: str | Path) -> Path:
    """The path of a user's open_clip checkpoint file, or an error that says what to give instead."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"alignment.clip_checkpoint {str(path)!r}: no such file; give a local "
                                "open_clip checkpoint, or leave clip_checkpoint empty to train the "
                                "alignment model here")
    return path


CLIP_RECORD = "clip_checkpoint.json"  # in the alignment stage's folder when a user CLIP checkpoint scores


def clip_checkpoint_record(cfg: AlignmentConfig) -> dict:
    """What identifies ``cfg.clip_checkpoint``: its path, architecture, size and SHA-256.

    The alignment stage writes it to its output folder, so that a different file (or the same path
    with new contents) changes that output and the stages that score with it rerun."""
    path = existing_checkpoint(cfg.clip_checkpoint)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"clip_checkpoint": cfg.clip_checkpoint, "clip_model": cfg.clip_model,
            "bytes": path.stat().st_size, "sha256": digest}


def load_alignment(cfg: AlignmentConfig, *, device="cpu", trained: Path | None = None):
    """The alignment model to score with, or None when one must be trained first.

    ``cfg.clip_checkpoint`` set -> ``OpenClipAlignment`` over that file; otherwise the
    ``AlignmentModel`` saved at ``trained`` if that file exists; otherwise None (call
    ``train_alignment`` and ``save`` it).
    """
    if cfg.clip_checkpoint:
        return OpenClipAlignment.from_checkpoint(cfg.clip_checkpoint, cfg.clip_model, device=device)
    if trained is not None and Path(trained).is_file():
        return AlignmentModel.load(trained, device)
    return None


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def similarity_matrix(model, images: torch.Tensor, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N, N) cosine similarities on CPU: row i = image i, column j = caption j."""
    img = batched_apply(model.encode_image, images, batch_size, model.device)
    txt = batched_apply(model.encode_text, list(captions), batch_size, model.device)
    return img @ txt.T
