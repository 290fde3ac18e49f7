"""Image helpers: grids for logging, atomic PNG writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, cols: int) -> Image.Image:
    """(N, H, W, 3) uint8 -> one PIL image, ``cols`` per row, 2 px white gutters."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    return Image.fromarray(grid)


def save_image_atomic(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
