"""Folders replaced whole: a crash leaves the old folder or the new one, never a mix of the two.

(Single files: ``checkpoints.atomic_save`` for torch files, ``images.save_image_atomic`` for images.)
"""
from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield a new staging folder beside ``path``; when the block ends without an error, it replaces
    ``path`` (and whatever was there). A crash leaves the old folder or the new one, never a mix; the
    staging folder is removed when the block fails. The folder gets the user's usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    staging.mkdir()  # 0777 less the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield staging
        if path.exists():  # moved aside first: a folder cannot be renamed over a non-empty one
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
