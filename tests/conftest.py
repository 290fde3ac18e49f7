"""Shared fixtures: a 16-sprite slice of the real dataset and the tiny params profile."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pokesprite.config import load_params
from pokesprite.data import raw

TESTS = Path(__file__).parent
ROOT = TESTS.parent
N_SPRITES = 16


def make_subset(source: Path, dest: Path, n: int = N_SPRITES) -> Path:
    """Copy the first ``n`` sprites of a raw dataset, with their caption lines and table rows."""
    (dest / raw.IMAGES_DIR).mkdir(parents=True)
    for i in range(1, n + 1):
        shutil.copyfile(source / raw.IMAGES_DIR / f"{i:03d}.png", dest / raw.IMAGES_DIR / f"{i:03d}.png")
    lines = (source / raw.CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()[:n]
    (dest / raw.CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = (source / raw.TABLE_FILE).read_bytes().decode("utf-16").split("\r\n")
    (dest / raw.TABLE_FILE).write_bytes("\r\n".join(table[:n + 1] + [""]).encode("utf-16"))
    return dest


@pytest.fixture(scope="session")
def full_source() -> Path:
    source = raw.default_source()
    if not source.is_absolute():
        source = (ROOT / source).resolve()
    if not (source / raw.IMAGES_DIR).is_dir():
        pytest.skip(f"raw dataset not found at {source}; set {raw.DEFAULT_SOURCE_ENV}")
    return source


@pytest.fixture(scope="session")
def raw_subset(full_source, tmp_path_factory) -> Path:
    return make_subset(full_source, tmp_path_factory.mktemp("raw") / "pokemon")


@pytest.fixture(scope="session")
def tiny_params():
    return load_params(TESTS / "tiny_params.yaml")


@pytest.fixture(scope="session")
def processed(raw_subset, tiny_params, tmp_path_factory) -> Path:
    from pokesprite.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("processed") / "preprocess"
    preprocess(tiny_params.data, raw_dir=raw_subset, out_dir=out, seed=tiny_params.seed)
    return out
