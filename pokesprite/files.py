"""Files and folders replaced whole: a crash leaves the old one or the new one, never a mix or half.

(``checkpoints.atomic_save`` writes torch files and ``images.save_image_atomic`` images through
``atomic_file``.)
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Yield a new temporary file beside ``path``, open in ``mode`` (text: UTF-8). When the block ends
    without an error the file is flushed to disk and renamed over ``path``; when it fails the file is
    removed. It gets the user's usual permissions (0666 less the umask; tempfile's would be 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): True when done,
    False where the system or the file system cannot (nothing moved then)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield a new staging folder beside ``path``; when the block ends without an error, it replaces
    ``path`` (and whatever was there). A crash leaves the old folder or the new one, never a mix: the
    two are swapped in one step where Linux can (``exchange``), else the old one is moved aside and
    moved back if the new one cannot take its place. The staging folder is removed when the block
    fails. The folder gets the user's usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    staging.mkdir()  # 0777 less the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield staging
        if not path.exists():
            staging.rename(path)
        elif exchange(staging, path):
            shutil.rmtree(staging)  # the old folder now
        else:  # moved aside first: a folder cannot be renamed over a non-empty one
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
            path.rename(old)
            try:
                staging.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
