"""The raw dataset: validate it and import it, byte for byte, into the DVC-tracked ``data/``.

Layout (a folder, or a .zip holding it at its root or one folder down):

    small_images/NNN.png          RGBA sprites named by national number (001..898)
    text_description_concat.csv   UTF-8, no header; line N is the caption of national number N
    pokemon.csv                   UTF-16, tab-separated, with a header (national_number, english_name, ...)

The import copies files unchanged so that ``data/`` hashes to the value committed in ``data.dvc``.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pokesprite.files import atomic_folder

IMAGES_DIR = "small_images"
CAPTIONS_FILE = "text_description_concat.csv"
TABLE_FILE = "pokemon.csv"
DEFAULT_SOURCE_ENV = "POKESPRITE_DATA_SOURCE"
_NAME = re.compile(r"^(\d{3,4})\.png$")


class DatasetError(ValueError):
    """The raw dataset is malformed; the message names the file and row."""


@dataclass(frozen=True)
class RawRecord:
    number: int  # national number
    name: str
    caption: str  # as in the caption file, not yet cleaned
    image_path: Path


def default_source() -> Path:
    return Path(os.environ.get(DEFAULT_SOURCE_ENV, "../shared/pokemon"))


def read_captions(path: Path) -> list[str]:
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # the byte-order mark some editors write first
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}: {e.reason}); save the "
                           "file as UTF-8") from None
    # Lines end at "\n" (or "\r\n") only: str.splitlines would also split inside a caption at U+2028,
    # U+0085 and other separators, shifting every later caption.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise DatasetError(f"{path}, line {i}: empty caption")
    return lines


def read_table(path: Path) -> dict[int, dict[str, str]]:
    """pokemon.csv -> {national_number: row}. Despite its name the file is UTF-16 TSV."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: cannot decode as UTF-16 or UTF-8 ({e})") from None
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    for col in ("national_number", "english_name"):
        if col not in (reader.fieldnames or []):
            raise DatasetError(f"{path}: header lacks the column {col!r} (is it tab-separated?)")
    rows = {}
    for line_no, row in enumerate(reader, 2):
        try:
            number = int(row["national_number"])
        except (TypeError, ValueError):
            raise DatasetError(f"{path}, row {line_no}: national_number {row['national_number']!r} "
                               "is not an integer") from None
        if number in rows:
            raise DatasetError(f"{path}, row {line_no}: national_number {number} appears twice")
        rows[number] = row
    return rows


def check_image(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.verify()  # the chunks and their checksums
        with Image.open(path) as im:  # verify() leaves the file unusable; reopen to decode the pixels too
            im.load()
            size = im.size
    except Exception as e:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: not a readable image ({e})") from None
    if min(size) < 8:
        raise DatasetError(f"{path}: image is only {size[0]}x{size[1]} pixels")
    with Image.open(path) as im:
        mode, fmt, keyed = im.mode, im.format, "transparency" in im.info
    if mode not in ALPHA_MODES and not keyed:  # nothing says which pixels are background
        raise DatasetError(f"{path}: has no transparency ({fmt} image, mode {mode}); sprites must be PNGs with an "
                           "alpha channel (or a transparent palette colour) around the creature")
    return size


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # PIL modes that carry an alpha channel


def caption_name(text: str) -> str:
    """The first run of letters and digits, casefolded: how a caption begins ("Mr; ...") and how its
    Pokemon's English name does ("Mr. Mime"), so that a caption on the wrong line is caught."""
    m = re.match(r"\w+", text.strip())
    return m[0].casefold() if m else ""


def scan(root: Path) -> list[RawRecord]:
    """Validate a raw dataset folder and return one record per sprite, in national-number order."""
    root = Path(root)
    images, captions_path, table_path = root / IMAGES_DIR, root / CAPTIONS_FILE, root / TABLE_FILE
    for p in (images, captions_path, table_path):
        if not p.exists():
            raise DatasetError(f"{p}: missing (expected {IMAGES_DIR}/, {CAPTIONS_FILE} and {TABLE_FILE} "
                               f"in {root})")
    captions = read_captions(captions_path)
    table = read_table(table_path)
    records = []
    for f in sorted(images.iterdir()):
        m = _NAME.match(f.name)
        if not m:
            raise DatasetError(f"{f}: unexpected file; sprites must be named NNN.png by national number")
        number = int(m.group(1))
        if number < 1 or number > len(captions):
            raise DatasetError(f"{f}: national number {number} has no caption: {captions_path} has "
                               f"{len(captions)} lines")
        if number not in table:
            raise DatasetError(f"{f}: national number {number} is not in {table_path}")
        check_image(f)
        name, caption = table[number]["english_name"], captions[number - 1]
        if caption_name(caption) != caption_name(name):
            raise DatasetError(f"{captions_path}, line {number}: the caption begins {caption[:30]!r}, but national "
                               f"number {number} is {name!r} in {table_path}; are lines missing, added or out of "
                               "order? (line N is the caption of sprite N)")
        records.append(RawRecord(number, name, caption, f))
    if not records:
        raise DatasetError(f"{images}: no sprites found")
    if len(records) != len(captions):
        have = {r.number for r in records}
        lacking = [n for n in range(1, len(captions) + 1) if n not in have][:5]
        raise DatasetError(f"{captions_path} has {len(captions)} captions but {images} has {len(records)} "
                           f"sprites; no image for national numbers {lacking}")
    return records


def _dataset_root(extracted: Path) -> Path:
    """A zip may hold the layout at its root or inside a single top folder."""
    if (extracted / IMAGES_DIR).exists():
        return extracted
    subdirs = [p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith("__MACOSX")]
    if len(subdirs) == 1 and (subdirs[0] / IMAGES_DIR).exists():
        return subdirs[0]
    raise DatasetError(f"zip holds no {IMAGES_DIR}/ at its root or in one top folder")


def import_dataset(source: str | Path, dest: str | Path = "data") -> list[RawRecord]:
    """Validate ``source`` (a folder or .zip) and copy it into ``dest``, replacing ``dest`` atomically."""
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise DatasetError(f"{source}: no such dataset folder or zip (set {DEFAULT_SOURCE_ENV} or pass SOURCE)")
    with tempfile.TemporaryDirectory() as tmp:
        root = source
        if source.is_file():
            if not zipfile.is_zipfile(source):
                raise DatasetError(f"{source}: neither a folder nor a zip file")
            with zipfile.ZipFile(source) as z:
                z.extractall(tmp)
            root = _dataset_root(Path(tmp))
        records = scan(root)
        with atomic_folder(dest) as staging:
            (staging / IMAGES_DIR).mkdir()
            for r in records:
                shutil.copyfile(r.image_path, staging / IMAGES_DIR / r.image_path.name)
            shutil.copyfile(root / CAPTIONS_FILE, staging / CAPTIONS_FILE)
            shutil.copyfile(root / TABLE_FILE, staging / TABLE_FILE)
    return [RawRecord(r.number, r.name, r.caption, dest / IMAGES_DIR / r.image_path.name) for r in records]
