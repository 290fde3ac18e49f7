"""SpriteDataset: the preprocessed sprites of one split, as tensors in [-1, 1]."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def read_index(processed_dir: Path) -> list[dict]:
    path = Path(processed_dir) / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the preprocess stage first (dvc repro preprocess)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["number"] = int(r["number"])
    return rows


def spread(rows: list, limit: int) -> list:
    """``limit`` rows evenly spaced through ``rows`` (all of them when ``limit`` is 0 or not smaller).

    Rows come in Pokedex order, so a cap taken from the front would hold the first generations only."""
    n = len(rows)
    return list(rows) if not limit or limit >= n else [rows[i * n // limit] for i in range(limit)]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


class SpriteDataset(Dataset):
    """Items are ``(image, row)``: image (3, S, S) float in [-1, 1]; row the position in ``rows``.

    All images of the split are held in memory as uint8 (898 sprites are ~125 MB).
    """

    def __init__(self, processed_dir: Path, split: str | None, *, limit: int = 0):
        self.rows = [r for r in read_index(processed_dir) if split is None or r["split"] == split]
        self.rows = spread(self.rows, limit)  # a cap spans the whole split
        if not self.rows:
            raise ValueError(f"{processed_dir}: split {split!r} is empty")
        images = []
        for r in self.rows:
            with Image.open(Path(processed_dir) / "images" / f"{r['number']:03d}.png") as im:
                images.append(np.asarray(im.convert("RGB")))
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return to_unit_range(self.images[i]), i

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]
