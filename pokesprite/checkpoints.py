"""Checkpoint files: written atomically, read back as data only, checked by kind.

The bottom layer that models, training, evaluation and the pipeline share. Every file pokesprite
writes with ``torch.save`` is a dict with a ``"kind"`` (vae, diffusion, finetune, pipeline,
alignment, scorer, reference, ...) and holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: reading a checkpoint runs no pickled code, and a file that needs
more (a crafted payload, or an object pickled by other code) is refused with a message naming it.
"""
from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import torch

from pokesprite.files import atomic_file


def canonical(obj):
    """``obj`` rebuilt so that its bytes under ``torch.save`` depend on its values only.

    Pickle writes an object it has already written as a reference to it, and decides "already
    written" by identity. So the same checkpoint saved from objects that were built by the code (the
    literal key "epoch" is one shared string) and from objects read back from a file (each "epoch"
    a string of its own, as a resumed run's history is) gave different bytes, and DVC different
    hashes. Here every string is interned and every dict, list and tuple is a new one, so equal
    values give equal bytes. Tensors are left as they are; an OrderedDict (a module's state_dict)
    stays one, with its ``_metadata``."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        out = {canonical(k): canonical(v) for k, v in obj.items()}
        if type(obj) is not dict:
            out = type(obj)(out)
            out.__dict__.update(canonical(vars(obj)))
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(canonical(v) for v in obj)
    return obj


def atomic_save(obj, path: Path) -> None:
    """torch.save of ``canonical(obj)`` (equal checkpoints are equal files) to a temporary file in the
    same folder, flushed to disk, then renamed over ``path``: a crash leaves the old file or the new
    one, never half of one. The file gets the user's usual permissions (0666 less the umask); the
    temporary file is removed if the write fails."""
    with atomic_file(path) as f:
        torch.save(canonical(obj), f)


def read(path: Path):
    """``torch.load`` of data only (weights_only): tensors and plain Python values, never code.

    Raises ValueError naming the file when it holds anything else (checkpoints of pokesprite before
    this rule kept numpy's RNG state as an array: retrain or re-save those with a current version) or
    cannot be read at all (truncated, corrupt, not a torch file).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if code is None:
            raise ValueError(f"{path}: not a readable checkpoint (not a torch file of tensors and plain values)") \
                from None
        raise ValueError(f"{path}: refused: it holds more than tensors and plain values (it would call "
                         f"{code.group(1)}); pokesprite loads data only, never code. A checkpoint from an older "
                         "pokesprite: train that stage again") from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else 'empty'})") from None


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


def require_weights(ckpt: dict, path: Path, *keys: str) -> dict:
    """``ckpt`` if it holds the inference weights ``keys``; else a ValueError naming the file (a training
    checkpoint, last.pt or epoch_NNNN.pt, keeps its weights in its training state only)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        hint = (": it is a training checkpoint (last.pt, epoch_NNNN.pt); pass the stage's best.pt"
                if "train" in ckpt else "")
        raise ValueError(f"{path}: holds no {', '.join(missing)}{hint}")
    return ckpt
