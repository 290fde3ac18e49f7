"""The bundle's formats, shared by pack.py (here) and restore.py (on the GPU machine).

Weights: every float tensor of 2+ dims and 4096+ elements becomes int8 codes with one fp32 scale
per output channel (row): q = round(w / s), s = max|w_row| / 127, restored as q * s in fp32. Smaller
tensors (biases, norms, buffers) stay exact. Rows that no run can read (MiniLM embeddings of unused
wordpieces) and tensors no run reads (VGG19 block 5) are stored as nothing and restored as zeros.
Containers are torch.save'd dicts, xz-compressed. Sprites: lossless WebP of the RGBA pixels.
"""
from __future__ import annotations

import hashlib
import io
import lzma

import numpy as np
import torch

MIN_QUANTIZED = 4096


def quantize(state: dict[str, torch.Tensor], *, keep_rows: dict[str, list[int]] | None = None,
             drop: tuple[str, ...] = ()) -> dict[str, dict]:
    """A state dict -> entries {"t": exact tensor} | {"q", "scale", "shape", "rows"} | {"zeros", "dtype"}."""
    packed = {}
    for name, t in state.items():
        if name.startswith(drop):
            packed[name] = {"zeros": tuple(t.shape), "dtype": t.dtype}
            continue
        if not t.is_floating_point() or t.ndim < 2 or t.numel() < MIN_QUANTIZED:
            packed[name] = {"t": t.clone()}
            continue
        rows = keep_rows.get(name) if keep_rows else None
        w = t.float().reshape(t.shape[0], -1)
        w = w[rows] if rows is not None else w
        scale = w.abs().amax(1, keepdim=True) / 127
        q = torch.round(w / scale.clamp_min(1e-30)).to(torch.int8)
        packed[name] = {"q": q, "scale": scale, "shape": tuple(t.shape),
                        "rows": None if rows is None else torch.tensor(rows)}
    return packed


def dequantize(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    state = {}
    for name, e in packed.items():
        if "t" in e:
            state[name] = e["t"]
        elif "zeros" in e:
            state[name] = torch.zeros(e["zeros"], dtype=e["dtype"])
        else:
            w = e["q"].float() * e["scale"]  # (rows kept, prod(shape[1:]))
            if e["rows"] is not None:
                full = torch.zeros(e["shape"][0], w.shape[1])
                full[e["rows"]] = w
                w = full
            state[name] = w.reshape(e["shape"])
    return state


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A checksum of a state dict's content (names, dtypes, shapes, values), whatever file holds it."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_xz(obj, path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(lzma.compress(buf.getvalue(), preset=6))


def load_xz(path):
    with open(path, "rb") as f:
        return torch.load(io.BytesIO(lzma.decompress(f.read())), weights_only=False)


def canonical_rgba(im) -> np.ndarray:
    """(H, W, 4) uint8 with the colour of fully transparent pixels set to 0: what any compositing sees."""
    a = np.array(im.convert("RGBA"))
    a[a[..., 3] == 0, :3] = 0
    return a


def pixels_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(f"{a.shape}|".encode() + np.ascontiguousarray(a).tobytes()).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
