"""Labelled sprite grids: rows headed by a text, columns by a header.

The sample grid has one row per prompt and one column per seed; the memorisation picture has one row
per (generated, nearest training sprite) pair, headed by their distance.
"""
from __future__ import annotations

import textwrap
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_LINES = 2


def _ascii(text: str) -> str:
    """The label as the bitmap font can draw it: accents dropped ("Pokémon" -> "Pokemon")."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def labelled_grid(images: np.ndarray, prompts: list[str], seeds: list[int], *, cell: int = 215,
                  headers: list[str] | None = None, title: str = "") -> Image.Image:
    """``images``: (P, S, H, W, 3) uint8 -> one picture; each row is headed by (the start of) its prompt,
    each column by ``headers`` (default: "seed <s>"), the whole by ``title`` when given (what drew it).
    Sprites are shown ``cell`` pixels wide: at their own size by default, so no filter blurs them."""
    p, s = images.shape[:2]
    if p != len(prompts) or s != len(seeds):
        raise ValueError(f"grid of {p} x {s} sprites for {len(prompts)} prompts and {len(seeds)} seeds")
    font = ImageFont.load_default(size=12)  # a scalable font where Pillow has FreeType, else its bitmap one
    line_h = 14
    label_h = LABEL_LINES * line_h + 6
    header_h = line_h + 6
    title_h = header_h if title else 0
    width = s * cell
    out = Image.new("RGB", (width, title_h + header_h + p * (label_h + cell)), "white")
    draw = ImageDraw.Draw(out)
    if headers is not None and len(headers) != s:
        raise ValueError(f"{len(headers)} column headers for {s} columns")
    if title:
        draw.text((4, 3), _ascii(title), fill="black", font=font)
    for j, header in enumerate(headers if headers is not None else [f"seed {seed}" for seed in seeds]):
        draw.text((j * cell + 4, title_h + 3), _ascii(header), fill="dimgray", font=font)
    chars = max(20, width // 6)
    for i, prompt in enumerate(prompts):
        top = title_h + header_h + i * (label_h + cell)
        wrapped = textwrap.wrap(_ascii(prompt), chars)
        lines = wrapped[:LABEL_LINES]
        if len(wrapped) > LABEL_LINES:
            lines[-1] = lines[-1][: chars - 3] + "..."
        for k, line in enumerate(lines):
            draw.text((4, top + 3 + k * line_h), line, fill="black", font=font)
        for j in range(s):
            tile = Image.fromarray(images[i, j])
            if tile.size != (cell, cell):
                tile = tile.resize((cell, cell), Image.BICUBIC)
            out.paste(tile, (j * cell, top + label_h))
    return out


def pairs_grid(left: np.ndarray, right: np.ndarray, labels: list[str], headers: tuple[str, str], *,
               cell: int = 215) -> Image.Image:
    """Sprite pairs side by side: ``left``, ``right`` (K, H, W, 3) uint8, one row per pair headed by its label."""
    if left.shape != right.shape or len(left) != len(labels):
        raise ValueError(f"{len(left)} and {len(right)} sprites for {len(labels)} pair labels")
    return labelled_grid(np.stack([left, right], axis=1), labels, [0, 1], cell=cell, headers=list(headers))
