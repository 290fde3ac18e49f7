"""The guidance curve: sample quality (KID) and text alignment (R-precision) against the guidance scale.

Classifier-free guidance (Ho & Salimans 2022) trades diversity for fidelity to the caption: a
larger scale usually raises alignment and, past a point, hurts realism (the FID vs guidance-weight
trade-off curves of Ho & Salimans 2022 and of Imagen, Saharia et al. 2022). One point per scale in
``evaluate.guidance_scales``: the held-out set drawn at that scale, its KID against the same real
features as ``kid`` and its independent-scorer R-precision. Written as ``guidance_curve.csv`` (one
row per scale), a picture ``guidance_curve.png`` drawn with PIL, and metrics
``guidance.<scale>.kid`` and so on.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pokesprite.files import write_text_atomic

COLUMNS = ("scale", "kid", "kid_std", "r_precision")
CSV_FILE = "guidance_curve.csv"
IMAGE_FILE = "guidance_curve.png"


def scale_name(scale: float) -> str:
    """3.0 -> "3", 1.5 -> "1.5": how a scale appears in metric names."""
    return f"{float(scale):g}"


def curve_metrics(points: list[dict]) -> dict[str, float]:
    """[{scale, kid, kid_std, r_precision}, ...] -> {"guidance.<scale>.kid": ..., ...}."""
    return {f"guidance.{scale_name(p['scale'])}.{k}": float(p[k]) for p in points for k in COLUMNS[1:]}


def curve_csv(points: list[dict]) -> str:
    """The curve as CSV text: a header row, then one row per point in the given order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for p in points:
        writer.writerow([scale_name(p["scale"]), *(f"{float(p[k]):.6g}" for k in COLUMNS[1:])])
    return out.getvalue()


def write_curve_csv(points: list[dict], path: Path) -> None:
    write_text_atomic(path, curve_csv(points))


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xs: list[float], ys: list[float],
           title: str, colour: str, font, errors: list[float] | None = None) -> None:
    """One line chart in ``box`` (left, top, right, bottom): axes, min/max labels, points, error bars."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 14), title, fill="black", font=font)
    spread = errors or [0.0] * len(ys)
    lo = min(y - e for y, e in zip(ys, spread))
    hi = max(y + e for y, e in zip(ys, spread))
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    x_lo, x_hi = min(xs), max(xs)
    x_lo, x_hi = (x_lo - 1, x_hi + 1) if x_hi == x_lo else (x_lo, x_hi)
    pad = 12

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + pad + (x - x_lo) / (x_hi - x_lo) * (right - left - 2 * pad),
                bottom - pad - (y - lo) / (hi - lo) * (bottom - top - 2 * pad))

    draw.text((right + 4, top), f"{hi:.3g}", fill="black", font=font)
    draw.text((right + 4, bottom - 12), f"{lo:.3g}", fill="black", font=font)
    for x in xs:
        px, _ = at(x, lo)
        draw.text((px - 6, bottom + 3), f"{x:g}", fill="black", font=font)
    pixels = [at(x, y) for x, y in zip(xs, ys)]
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=2)
    for (px, py), x, y, e in zip(pixels, xs, ys, spread):
        if e > 0:
            draw.line([at(x, y - e), at(x, y + e)], fill=colour, width=1)
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)


def curve_image(points: list[dict], *, width: int = 640, height: int = 280) -> Image.Image:
    """KID (with +- its std) and R-precision against the guidance scale, side by side."""
    if not points:
        raise ValueError("the guidance curve needs at least one point")
    points = sorted(points, key=lambda p: p["scale"])
    xs = [float(p["scale"]) for p in points]
    font = ImageFont.load_default()
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    half = width // 2
    box = lambda x0: (x0 + 10, 30, x0 + half - 50, height - 40)  # noqa: E731  room for labels right/below
    _panel(draw, box(0), xs, [float(p["kid"]) for p in points], "KID (lower is better)", "firebrick", font,
           errors=[float(p["kid_std"]) for p in points])
    _panel(draw, box(half), xs, [float(p["r_precision"]) for p in points], "independent R-precision", "navy", font)
    draw.text((width // 2 - 60, height - 16), "classifier-free guidance scale", fill="black", font=font)
    return out
