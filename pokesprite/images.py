"""Image helpers: grids for logging, background keying (RGB sprite -> RGBA), PNG encoding, atomic writes."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pokesprite.files import atomic_file

WHITE = (255, 255, 255)
KEY_TOLERANCE = 16  # largest channel difference from the background still read as background


def image_grid(images: np.ndarray, cols: int) -> Image.Image:
    """(N, H, W, 3) uint8 -> one PIL image, ``cols`` per row, 2 px white gutters."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    return Image.fromarray(grid)


def parse_colour(text: str | tuple | list, *, name: str = "background") -> tuple[int, int, int]:
    """``"#ffffff"``, ``"255,255,255"`` or a 3-sequence -> (R, G, B); an error names ``name`` otherwise."""
    try:
        if isinstance(text, str):
            s = text.strip()
            if s.startswith("#") and len(s) == 7:
                rgb = tuple(int(s[i:i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(v) for v in s.split(","))
        else:
            rgb = tuple(int(v) for v in text)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"{name} must be a colour as '#rrggbb' or 'R,G,B' with values in 0..255, got {text!r}")
    return rgb


def key_background(image: np.ndarray, background: tuple[int, int, int] = WHITE, *,
                   tolerance: int = KEY_TOLERANCE) -> np.ndarray:
    """(H, W, 3) uint8 sprite drawn on a flat ``background`` -> (H, W, 4) uint8 RGBA with the background clear.

    The rule, with d = max over R, G, B of |pixel - background| (0..255):

    1. Background: the pixels with d <= ``tolerance`` that are 4-connected to the image border
       through such pixels. Alpha 0. Near-background pixels enclosed by the sprite (a white eye,
       a white belly inside the outline) are not connected to the border and stay opaque; so do
       background-coloured holes enclosed by the sprite (a ring, a looped tail).
    2. Edge: the pixels outside the background that touch it (8-neighbours). A sprite pixel p
       composited with coverage a is c = a p + (1 - a) b, so its distance from b is a times the
       sprite's own; the sprite's own is taken as the largest d among the pixel and its
       8-neighbours outside the background: alpha = d / that (1 where that is 0). The colour is
       un-mixed from the background, p = b + (c - b) / alpha, so compositing the result on
       ``background`` gives the input back (up to rounding).
    3. Everything else: opaque, colour unchanged.
    """
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    bg = np.array(parse_colour(background), dtype=np.float32)
    x = image.astype(np.float32)
    d = np.abs(x - bg).max(-1)  # (H, W)
    labels, _ = ndimage.label(d <= tolerance)  # 4-connected components
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    clear = np.isin(labels, np.unique(border[border > 0]))
    edge = ndimage.binary_dilation(clear, structure=np.ones((3, 3), bool)) & ~clear
    reference = ndimage.maximum_filter(np.where(clear, 0.0, d), size=3)  # the sprite's own distance, >= d
    alpha = np.ones(d.shape, np.float32)
    alpha[clear] = 0.0
    ref = reference[edge]
    alpha[edge] = np.divide(d[edge], ref, out=np.ones_like(ref), where=ref > 0)  # reference >= d: alpha <= 1
    rgb = x.copy()
    soft = edge & (alpha > 0)
    rgb[soft] = bg + (x[soft] - bg) / alpha[soft, None]
    out = np.empty(image.shape[:2] + (4,), np.uint8)
    out[..., :3] = np.clip(np.rint(rgb), 0, 255)
    out[..., 3] = np.rint(alpha * 255)
    return out


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """An RGB or RGBA uint8 array (or PIL image) as PNG file bytes."""
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray | Image.Image) -> str:
    """PNG bytes as base64 text (what the REST model returns per sprite)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def save_image_atomic(image: Image.Image, path: Path, *, text: dict[str, str] | None = None) -> None:
    """Write ``image`` to ``path`` (its format from the extension) through ``files.atomic_file``;
    ``text``: key-value notes stored in a PNG's tEXt chunks (what drew it), read back by ``Image.open(p).text``."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r}")
    if text and fmt != "PNG":
        raise ValueError(f"{path}: text notes are written into PNGs only")
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
    with atomic_file(path) as f:
        image.save(f, format=fmt, **({"pnginfo": info} if info else {}))
