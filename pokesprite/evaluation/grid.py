"""The sample grid: one row per prompt (its text above it), one column per seed."""
from __future__ import annotations

import textwrap
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_LINES = 2


def _ascii(text: str) -> str:
    """The label as the bitmap font can draw it: accents dropped ("Pokémon" -> "Pokemon")."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def labelled_grid(images: np.ndarray, prompts: list[str], seeds: list[int], *, cell: int = 160) -> Image.Image:
    """``images``: (P, S, H, W, 3) uint8 -> one picture; each row is headed by (the start of) its prompt."""
    p, s = images.shape[:2]
    if p != len(prompts) or s != len(seeds):
        raise ValueError(f"grid of {p} x {s} sprites for {len(prompts)} prompts and {len(seeds)} seeds")
    font = ImageFont.load_default()
    line_h = 12
    label_h = LABEL_LINES * line_h + 6
    header_h = line_h + 6
    width = s * cell
    out = Image.new("RGB", (width, header_h + p * (label_h + cell)), "white")
    draw = ImageDraw.Draw(out)
    for j, seed in enumerate(seeds):
        draw.text((j * cell + 4, 3), f"seed {seed}", fill="black", font=font)
    chars = max(20, width // 6)
    for i, prompt in enumerate(prompts):
        top = header_h + i * (label_h + cell)
        wrapped = textwrap.wrap(_ascii(prompt), chars)
        lines = wrapped[:LABEL_LINES]
        if len(wrapped) > LABEL_LINES:
            lines[-1] = lines[-1][: chars - 3] + "..."
        for k, line in enumerate(lines):
            draw.text((4, top + 3 + k * line_h), line, fill="black", font=font)
        for j in range(s):
            tile = Image.fromarray(images[i, j]).resize((cell, cell), Image.BICUBIC)
            out.paste(tile, (j * cell, top + label_h))
    return out
