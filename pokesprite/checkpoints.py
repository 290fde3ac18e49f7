"""Checkpoint files: written atomically, read back as data only, checked by kind.

The bottom layer that models, training, evaluation and the pipeline share. Every file pokesprite
writes with ``torch.save`` is a dict with a ``"kind"`` (vae, diffusion, finetune, pipeline,
alignment, scorer, reference, ...) and holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: reading a checkpoint runs no pickled code.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path):
    """``torch.load`` of data only (weights_only). A file written before pokesprite kept to plain data
    (a numpy RNG state inside) is read in full once, with a warning: re-save it to upgrade."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        log.warning("%s: not plain data (%s); reading it in full, which runs pickled code: load only files "
                    "you trust, and re-save it", path, str(err).splitlines()[0])
        return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, kind: str) -> dict:
    """Load a checkpoint written by pokesprite and check it is of the expected kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (train the {kind} stage first, or pass its path)")
    ckpt = read(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a {kind} checkpoint, found {found!r}")
    return ckpt
