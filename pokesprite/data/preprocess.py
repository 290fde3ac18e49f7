"""Preprocess stage: raw sprites -> composited 215x215 RGB PNGs, cleaned captions and a split.

Output folder:
    images/NNN.png   RGB, image_size x image_size, transparent pixels composited on the background
    index.csv        number, name, split, caption (cleaned)
    stats.json       counts, raw image sizes, caption lengths, split sizes
"""
from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pokesprite.config import DataConfig
from pokesprite.data.raw import DatasetError, RawRecord, scan
from pokesprite.files import atomic_folder
from pokesprite.images import image_grid
from pokesprite.progress import progress

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
_SPECIAL = re.compile(r"\[(?:CLS|SEP|PAD|UNK|MASK)\]|<\|?[a-z_]+\|?>|</?s>", re.IGNORECASE)
_PUNCT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                        "\u2014": " - ", "\u2013": "-", "\u2212": "-"})


def clean_caption(text: str) -> str:
    """Normalise unicode and punctuation, drop tokenizer special tokens, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT)
    text = _SPECIAL.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip().strip('"').strip()


def to_rgba(im: Image.Image) -> Image.Image:
    """8-bit RGBA from any mode the raw check admits, 16-bit PNGs scaled rather than clipped.

    PIL reads 16-bit RGBA and grey+alpha PNGs as 8-bit already (the high byte of each sample), but
    16-bit grey stays ``I;16``, whose ``convert`` clips at 255 (a white silhouette), and the
    transparent colour of 16-bit RGB stays a 16-bit key that no 8-bit pixel equals. Those two are
    keyed and scaled here; a 16-bit RGB key matches on the high byte, as the pixels are read.
    """
    key = im.info.get("transparency")
    if im.mode.startswith("I"):
        grey = np.asarray(im).astype(np.int64)
        scaled = np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8)
        alpha = np.full(grey.shape, 255, np.uint8) if key is None else np.where(grey == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([scaled] * 3 + [alpha]), "RGBA")
    tile = getattr(im, "tile", None)  # only a file not yet loaded has one
    sixteen = bool(tile) and str(tile[0][3]).endswith(";16B")  # the raw mode, before loading
    if im.mode == "RGB" and isinstance(key, tuple) and sixteen:
        rgb = np.asarray(im.convert("RGB"))
        alpha = np.where((rgb == np.array([v >> 8 for v in key], np.uint8)).all(-1), 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    return im.convert("RGBA")


def to_square_rgb(im: Image.Image, size: int, background: tuple[int, int, int]) -> Image.Image:
    """Composite onto ``background``, then fit into ``size`` x ``size`` keeping the aspect ratio."""
    rgba = to_rgba(im)
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
    if rgb.size == (size, size):
        return rgb
    w, h = rgb.size
    scale = size / max(w, h)
    resized = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    out = Image.new("RGB", (size, size), background)
    out.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return out


def split_numbers(numbers: list[int], fractions: tuple[float, float, float], seed: int) -> dict[int, str]:
    """Deterministic split: a seeded permutation cut at round(n * cumulative fraction)."""
    order = np.random.default_rng(seed).permutation(len(numbers))
    n = len(numbers)
    n_train = round(n * fractions[0])
    n_val = round(n * (fractions[0] + fractions[1])) - n_train
    out = {}
    for rank, i in enumerate(order):
        out[numbers[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def dataset_stats(records: list[RawRecord], captions: list[str], splits: dict[int, str],
                  tokenizer=None, tokenizer_name: str | None = None) -> dict:
    """Counts, raw image sizes, caption lengths (characters, and tokens when a ``tokenizer`` is given)
    and split sizes. ``tokenizer_name`` names the tokenizer in the stats (default: its
    ``name_or_path``); the stages give ``text.model`` (e.g. ``bundled``), since a path to where the
    package is installed would differ between two clones and change the output's hash."""
    sizes = Counter()
    for r in records:
        with Image.open(r.image_path) as im:
            sizes[f"{im.size[0]}x{im.size[1]} {im.mode}"] += 1
    chars = np.array([len(c) for c in captions])

    def describe(a):
        return {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 1),
                "max": int(a.max())}

    stats = {
        "sprites": len(records),
        "image_sizes": dict(sizes.most_common()),
        "caption_chars": describe(chars),
        "splits": {s: sum(1 for v in splits.values() if v == s) for s in SPLITS},
    }
    if tokenizer is not None:
        tokens = np.array([len(ids) for ids in tokenizer(captions)["input_ids"]])
        stats["caption_tokens"] = describe(tokens)
        stats["caption_tokens"]["tokenizer"] = tokenizer_name or getattr(tokenizer, "name_or_path",
                                                                         type(tokenizer).__name__)
    return stats


def preprocess(cfg: DataConfig, *, raw_dir: Path, out_dir: Path, seed: int, tokenizer=None,
               tokenizer_name: str | None = None) -> dict:
    """Run the preprocess stage; returns the stats written to ``out_dir/stats.json``."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    records = scan(raw_dir)
    captions = [clean_caption(r.caption) for r in records]
    for r, c in zip(records, captions):
        if not c:
            raise ValueError(f"{raw_dir}: caption of national number {r.number} is empty after cleaning")
    splits = split_numbers([r.number for r in records], cfg.split, seed)
    for name in ("train", "val", "test"):
        if name not in splits.values():
            raise DatasetError(f"data.split {list(cfg.split)} leaves the {name} split of these {len(records)} sprites "
                               "empty: give it a larger fraction (or use more sprites)")

    with atomic_folder(out_dir) as staging:
        (staging / "images").mkdir()
        for r in progress(records, desc="preprocess", unit="img"):
            try:
                with Image.open(r.image_path) as im:
                    square = to_square_rgb(im, cfg.image_size, cfg.background)
            except OSError as e:  # a file changed since it was imported
                raise DatasetError(f"{r.image_path}: not a readable image ({e})") from None
            square.save(staging / "images" / f"{r.number:03d}.png")
        with open(staging / "index.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["number", "name", "split", "caption"])
            for r, c in zip(records, captions):
                w.writerow([r.number, r.name, splits[r.number], c])
        stats = dataset_stats(records, captions, splits, tokenizer, tokenizer_name)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("preprocessed %d sprites into %s: %s", len(records), out_dir, stats["splits"])
    return stats


def preview_grid(processed_dir: Path, per_split: int = 4):
    """The first ``per_split`` sprites of each split, one row per split (train, val, test)."""
    with open(Path(processed_dir) / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picks = [r for s in SPLITS for r in [x for x in rows if x["split"] == s][:per_split]]
    images = np.stack([np.asarray(Image.open(Path(processed_dir) / "images" / f"{int(r['number']):03d}.png"))
                       for r in picks])
    return image_grid(images, cols=per_split)
