"""Files and folders replaced whole: a crash leaves the old one or the new one, never a mix or half.

(Also: ``checkpoints.atomic_save`` for torch files, ``images.save_image_atomic`` for images.)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a new temporary file beside ``path``, flush it to disk, then rename
    it over ``path``. The file gets the user's usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
