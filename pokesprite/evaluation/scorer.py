"""An image-text scorer independent of stage 3: Inception features x a bag of words.

Stage 3 fine-tunes the text encoder against the alignment model (VGG19 image features, MiniLM text
features). Scoring generated sprites with that same model would be circular, so the evaluation also
uses this one, which shares no network, feature or weight with it and which stage 3 never sees:

- image side: the TF-FID InceptionV3 pool3 features (standardised), then a linear map;
- text side: TF-IDF over the lower-cased words of the training captions (words seen at least twice),
  then a linear map;
- trained on real training-split sprites with the symmetric contrastive (CLIP) loss, full batch.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pokesprite.checkpoints import atomic_save, load_checkpoint
from pokesprite.contrastive import clip_loss, clip_scale

WORD = re.compile(r"[a-z]+")


class BagOfWords:
    """L2-normalised TF-IDF vectors over a fixed vocabulary."""

    def __init__(self, vocabulary: list[str], idf: torch.Tensor):
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.idf = idf.float()

    @classmethod
    def fit(cls, captions: list[str], min_count: int = 2) -> "BagOfWords":
        counts = Counter(w for c in captions for w in WORD.findall(c.lower()))
        vocabulary = sorted(w for w, n in counts.items() if n >= min_count)
        if not vocabulary:
            raise ValueError("no word occurs twice in the training captions: cannot build a vocabulary")
        documents = Counter(w for c in captions for w in set(WORD.findall(c.lower())))
        df = torch.tensor([float(documents[w]) for w in vocabulary])
        return cls(vocabulary, torch.log((1 + len(captions)) / (1 + df)) + 1)

    def counts(self, captions: list[str]) -> torch.Tensor:
        """(N, vocabulary) how often each known word occurs in each caption."""
        rows, columns, values = [], [], []
        for row, c in enumerate(captions):
            for w, n in Counter(WORD.findall(c.lower())).items():
                if (i := self.index.get(w)) is not None:
                    rows.append(row)
                    columns.append(i)
                    values.append(float(n))
        out = torch.zeros(len(captions), len(self.vocabulary))
        out[rows, columns] = torch.tensor(values)
        return out

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.counts(captions) * self.idf, dim=1)


class IndependentScorer(nn.Module):
    def __init__(self, words: BagOfWords, *, image_dim: int = 2048, dim: int = 128):
        super().__init__()
        self.words = words
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(len(words.vocabulary), dim)
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dropout = nn.Dropout(0.5)

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.image_mean) / self.image_std
        return F.normalize(self.image(self.dropout(x)), dim=1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.text(self.dropout(self.words(captions))), dim=1)

    @torch.no_grad()
    def similarity(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N, N) cosine similarities: row i = image i, column j = caption j."""
        self.eval()
        return self.encode_image(features) @ self.encode_text(captions).T

    @classmethod
    def fit(cls, features: torch.Tensor, captions: list[str], *, dim: int = 128, epochs: int = 300,
            lr: float = 1e-3, weight_decay: float = 1e-2, seed: int = 0) -> "IndependentScorer":
        """Train on real (features, caption) pairs with the symmetric contrastive loss."""
        if len(features) != len(captions) or len(captions) < 2:
            raise ValueError(f"need >= 2 matching features and captions, got {len(features)} and {len(captions)}")
        torch.manual_seed(seed)
        model = cls(BagOfWords.fit(captions), image_dim=features.shape[1], dim=dim)
        model.image_mean.copy_(features.float().mean(0))
        model.image_std.copy_(features.float().std(0).clamp(min=1e-6))
        words = model.words(captions)
        standardised = (features.float() - model.image_mean) / model.image_std  # once, not every epoch
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        model.train()
        for _ in range(epochs):
            img = F.normalize(model.image(model.dropout(standardised)), dim=1)
            txt = F.normalize(model.text(model.dropout(words)), dim=1)
            loss = clip_loss(img, txt, clip_scale(model.logit_scale))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    def save(self, path: Path) -> None:
        atomic_save({"kind": "independent_scorer", "vocabulary": self.words.vocabulary, "idf": self.words.idf,
                     "image_dim": self.image.in_features, "dim": self.image.out_features,
                     "state_dict": self.state_dict()}, Path(path))

    @classmethod
    def load(cls, path: Path) -> "IndependentScorer":
        ckpt = load_checkpoint(path, "independent_scorer")
        model = cls(BagOfWords(ckpt["vocabulary"], ckpt["idf"]), image_dim=ckpt["image_dim"], dim=ckpt["dim"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
