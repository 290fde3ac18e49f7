import csv
import dataclasses
import json
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pokesprite.data import raw
from pokesprite.data.dataset import SpriteDataset, spread, to_uint8, to_unit_range
from pokesprite.data.preprocess import clean_caption, preprocess, split_numbers, to_square_rgb

from conftest import N_SPRITES, make_subset


def test_import_copies_bytes_and_validates(raw_subset, tmp_path):
    records = raw.import_dataset(raw_subset, tmp_path / "data")
    assert [r.number for r in records] == list(range(1, N_SPRITES + 1))
    assert records[0].name == "Bulbasaur" and records[0].caption.startswith("Bulbasaur;")
    for name in ("001.png", "016.png"):
        assert (tmp_path / "data/small_images" / name).read_bytes() == (raw_subset / "small_images" / name).read_bytes()
    assert (tmp_path / "data/pokemon.csv").read_bytes() == (raw_subset / "pokemon.csv").read_bytes()


def test_import_from_zip_matches_folder(raw_subset, tmp_path):
    archive = tmp_path / "pokemon.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in raw_subset.rglob("*"):
            z.write(f, f"pokemon/{f.relative_to(raw_subset)}")
    raw.import_dataset(archive, tmp_path / "from_zip")
    raw.import_dataset(raw_subset, tmp_path / "from_dir")
    files = sorted(p.relative_to(tmp_path / "from_dir") for p in (tmp_path / "from_dir").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "from_zip") for p in (tmp_path / "from_zip").rglob("*")
                           if p.is_file())
    for f in files:
        assert (tmp_path / "from_zip" / f).read_bytes() == (tmp_path / "from_dir" / f).read_bytes()


def test_import_replaces_existing_destination(raw_subset, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    raw.import_dataset(raw_subset, dest)
    assert not (dest / "stale.txt").exists()


def broken_copy(raw_subset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(raw_subset, bad)
    return bad


def test_missing_caption_names_the_file(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    shutil.copyfile(bad / "small_images/001.png", bad / "small_images/017.png")
    with pytest.raises(raw.DatasetError, match=r"017\.png: national number 17 has no caption"):
        raw.import_dataset(bad, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_corrupt_image_names_the_file(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    (bad / "small_images/005.png").write_bytes(b"not a png")
    with pytest.raises(raw.DatasetError, match=r"005\.png: not a readable image"):
        raw.import_dataset(bad, tmp_path / "data")


def test_an_image_whose_pixels_do_not_decode_is_refused_at_import(raw_subset, tmp_path):
    """Chunks and checksums intact (what Image.verify checks), compressed pixel data damaged."""
    import struct
    import zlib

    bad = broken_copy(raw_subset, tmp_path)
    path = bad / "small_images/009.png"
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    body = at + 8
    for i in range(body + length // 3, body + length // 3 + 40):
        data[i] ^= 0x5A
    data[body + length:body + length + 4] = struct.pack(">I", zlib.crc32(bytes(data[at + 4:body + length])))
    path.write_bytes(bytes(data))
    with pytest.raises(raw.DatasetError, match=r"009\.png: not a readable image"):
        raw.import_dataset(bad, tmp_path / "data")


def test_a_caption_file_with_a_byte_order_mark_reads_as_without(raw_subset, tmp_path):
    bom = broken_copy(raw_subset, tmp_path)
    captions = bom / "text_description_concat.csv"
    captions.write_bytes(b"\xef\xbb\xbf" + captions.read_bytes())
    assert raw.read_captions(captions) == raw.read_captions(raw_subset / "text_description_concat.csv")
    raw.import_dataset(bom, tmp_path / "data")


def test_empty_caption_names_the_line(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    lines = (bad / "text_description_concat.csv").read_text(encoding="utf-8").splitlines()
    lines[2] = "   "
    (bad / "text_description_concat.csv").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(raw.DatasetError, match=r"line 3: empty caption"):
        raw.scan(bad)


def test_a_caption_file_that_is_not_utf8_names_the_line(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    path = bad / "text_description_concat.csv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"e", "\u00e9".encode("latin-1"), 1)  # saved as Latin-1
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(raw.DatasetError, match=r"text_description_concat\.csv, line 4: not UTF-8 \(byte 0xe9"):
        raw.scan(bad)


def test_shifted_captions_are_caught_at_the_first_wrong_line(raw_subset, tmp_path):
    """One caption deleted and one added at the end: the count still matches, the names do not."""
    bad = broken_copy(raw_subset, tmp_path)
    path = bad / "text_description_concat.csv"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    del lines[2]
    lines.append("Mew; a small pink cat-like creature")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(raw.DatasetError, match=r"line 3: the caption begins 'Charmander.*national number 3 is "
                                               r"'Venusaur'.*are lines missing, added or out of order"):
        raw.scan(bad)


def test_a_line_separator_inside_a_caption_does_not_split_it(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    path = bad / "text_description_concat.csv"
    text = path.read_text(encoding="utf-8").replace("Bulbasaur; ", "Bulbasaur; two\u2028lines, ", 1)
    path.write_text(text.replace("\n", "\r\n"), encoding="utf-8")  # Windows line ends too
    records = raw.scan(bad)
    assert len(records) == N_SPRITES and "two\u2028lines" in records[0].caption
    assert not any(r.caption.endswith("\r") for r in records)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "I;16", "JPEG"])
def test_sprites_without_transparency_are_refused_naming_file_and_mode(raw_subset, tmp_path, mode):
    bad = broken_copy(raw_subset, tmp_path)
    path = bad / "small_images/004.png"
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    if mode == "JPEG":
        rgba.convert("RGB").save(path, format="JPEG")  # a JPEG named .png
    elif mode == "I;16":
        Image.fromarray((np.asarray(rgba.convert("L"), dtype=np.uint16) * 257)).save(path)
    else:
        rgba.convert(mode).save(path, format="TIFF" if mode == "CMYK" else "PNG")
    with pytest.raises(raw.DatasetError, match=r"004\.png: has no transparency \(.* mode "):
        raw.scan(bad)


def test_sprites_with_alpha_in_other_modes_composite_like_rgba(full_source):
    """A real sprite as LA (grey + alpha) and as a palette with a transparent colour: the transparent
    pixels become the background exactly as they do from RGBA."""
    from pokesprite.data.preprocess import to_square_rgb

    with Image.open(full_source / "small_images/025.png") as im:
        rgba = im.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    background = (255, 255, 255)
    la = to_square_rgb(rgba.convert("LA"), 215, background)
    grey = np.asarray(to_square_rgb(Image.merge("RGBA", [rgba.convert("L")] * 3 + [rgba.getchannel("A")]), 215,
                                    background))
    assert np.array_equal(np.asarray(la), grey)
    hard = rgba.copy()
    hard.putalpha(Image.fromarray(np.where(alpha > 127, 255, 0).astype(np.uint8)))
    palette = hard.convert("RGB").quantize(255)
    index = np.array(palette)
    index[alpha <= 127] = 255  # one palette entry marks the transparent pixels
    keyed = Image.fromarray(index.astype(np.uint8), "P")
    keyed.putpalette(palette.getpalette())
    keyed.info["transparency"] = 255
    out = np.asarray(to_square_rgb(keyed, 215, background))
    assert (out[alpha <= 127] == 255).all()  # background where transparent
    assert np.abs(out[alpha > 127].astype(int) - np.asarray(hard.convert("RGB"))[alpha > 127]).mean() < 8


def write_png16(path, samples, color_type, key=None):
    """A 16-bit PNG (PIL writes none with colour): ``samples`` uint16 HxW or HxWxC, ``key`` the tRNS values."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    trns = chunk(b"tRNS", struct.pack(f">{len(key)}H", *key)) if key else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + trns + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_sprites_are_scaled_like_their_8_bit_originals(full_source, tmp_path):
    """A real sprite saved as 16-bit RGBA, 16-bit grey with a transparent grey, and 16-bit RGB with a
    transparent colour composites as the 8-bit sprite does (no white silhouette, no lost key)."""
    with Image.open(full_source / "small_images/025.png") as im:
        rgba = np.asarray(im.convert("RGBA"))
    clear = rgba[..., 3] <= 127
    hard = rgba.copy()
    hard[..., 3] = np.where(clear, 0, 255)
    background = (255, 255, 255)

    def composite(path):
        raw.check_image(path)  # the raw check admits each of them
        with Image.open(path) as im:
            return np.asarray(to_square_rgb(im, 215, background))

    write_png16(tmp_path / "rgba.png", rgba.astype(np.uint16) * 257, 6)
    assert np.array_equal(composite(tmp_path / "rgba.png"), np.asarray(to_square_rgb(Image.fromarray(rgba), 215,
                                                                                        background)))
    grey = np.asarray(Image.fromarray(rgba).convert("L"))
    grey16 = np.where(clear, 1, grey.astype(np.uint16) * 257)  # 1 is no opaque grey (multiples of 257)
    write_png16(tmp_path / "grey.png", grey16, 0, key=(1,))
    expected = np.dstack([grey] * 3 + [hard[..., 3]])
    assert np.array_equal(composite(tmp_path / "grey.png"), np.asarray(to_square_rgb(Image.fromarray(expected), 215,
                                                                                        background)))
    used = {tuple(c) for c in hard[~clear, :3]}
    colour = next((r, 7, 9) for r in range(256) if (r, 7, 9) not in used)
    rgb16 = np.where(clear[..., None], np.array(colour, np.uint16) * 256 + 5, hard[..., :3].astype(np.uint16) * 257)
    write_png16(tmp_path / "rgb.png", rgb16, 2, key=tuple(int(v) * 256 + 5 for v in colour))
    out = composite(tmp_path / "rgb.png")
    assert np.array_equal(out, np.asarray(to_square_rgb(Image.fromarray(hard), 215, background)))


def test_table_without_header_column_is_named(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    (bad / "pokemon.csv").write_text("a,b\n1,2\n")
    with pytest.raises(raw.DatasetError, match="national_number"):
        raw.scan(bad)


def test_clean_caption():
    assert (clean_caption("  It\u2019s  a [CLS] \u201cseed\u201d\u2014Pok\u00e9mon\n ")
            == "It's a \"seed\" - Pok\u00e9mon")
    # NFKC folds compatibility forms (ligatures, full-width letters, circled digits) to plain text
    assert clean_caption("\ufb01re \uff30\uff4f\uff4b\u00e9 \u2460") == "fire Pok\u00e9 1"


def test_composite_onto_background():
    im = Image.new("RGBA", (215, 215), (0, 0, 0, 0))
    im.putpixel((10, 10), (200, 0, 0, 255))
    im.putpixel((20, 20), (0, 0, 200, 128))
    out = np.asarray(to_square_rgb(im, 215, (255, 255, 255)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[10, 10]) == (200, 0, 0)
    assert tuple(out[20, 20]) == (127, 127, 227)  # half-transparent blue over white
    assert tuple(np.asarray(to_square_rgb(im, 215, (0, 0, 0)))[0, 0]) == (0, 0, 0)


def test_resize_keeps_aspect_ratio_and_pads():
    im = Image.new("RGBA", (500, 250), (255, 0, 0, 255))  # a 2:1 red bar
    out = np.asarray(to_square_rgb(im, 215, (255, 255, 255)))
    assert out.shape == (215, 215, 3)
    red_rows = np.where((out[:, 107] == (255, 0, 0)).all(axis=1))[0]
    assert 105 <= len(red_rows) <= 109  # 215 * 250 / 500, centred
    assert tuple(out[0, 107]) == (255, 255, 255) and tuple(out[-1, 107]) == (255, 255, 255)
    # a textured sprite: Lanczos-resized to 215 x 108 and pasted at row 53, pixel for pixel
    noise = np.random.default_rng(0).integers(0, 256, (250, 500, 3), dtype=np.uint8)
    out = np.asarray(to_square_rgb(Image.fromarray(noise).convert("RGBA"), 215, (255, 255, 255)))
    expected = np.asarray(Image.fromarray(noise).resize((215, 108), Image.LANCZOS))
    assert np.array_equal(out[53:161], expected)


TEST_SPLIT_HEAD = [8, 30, 74, 79, 105, 116, 177, 185]  # the first test-split numbers at seed 0


def test_split_is_deterministic_with_the_right_sizes():
    numbers = list(range(1, 899))
    a = split_numbers(numbers, (0.8, 0.15, 0.05), seed=0)
    assert a == split_numbers(numbers, (0.8, 0.15, 0.05), seed=0)
    assert a != split_numbers(numbers, (0.8, 0.15, 0.05), seed=1)
    sizes = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert sizes == {"train": 718, "val": 135, "test": 45}
    # pinned: the committed dvc.lock and metrics were made with this split of the 898 sprites
    assert sorted(n for n, s in a.items() if s == "test")[:8] == TEST_SPLIT_HEAD


def test_preprocess_outputs(processed):
    with open(processed / "index.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_SPRITES
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    stats = json.loads((processed / "stats.json").read_text())
    assert stats["sprites"] == N_SPRITES and stats["image_sizes"] == {"215x215 RGBA": N_SPRITES}
    im = Image.open(processed / "images/001.png")
    assert im.size == (215, 215) and im.mode == "RGB"


def test_preprocess_resizes_odd_sizes(full_source, tiny_params, tmp_path):
    # #10 onwards are 215 px; swap in one of the four large sprites (500x500) as #3.
    src = make_subset(full_source, tmp_path / "src", n=4)
    big = next(p for p in sorted((full_source / "small_images").iterdir()) if Image.open(p).size != (215, 215))
    shutil.copyfile(big, src / "small_images/003.png")
    out = tmp_path / "out"
    cfg = dataclasses.replace(tiny_params.data, split=(0.5, 0.25, 0.25))  # a sprite in each split
    stats = preprocess(cfg, raw_dir=src, out_dir=out, seed=0)
    assert Image.open(out / "images/003.png").size == (215, 215)
    with pytest.raises(raw.DatasetError, match=r"data\.split \[0\.8, 0\.15, 0\.05\] leaves the test split of these "
                                           r"4 sprites empty"):
        preprocess(tiny_params.data, raw_dir=src, out_dir=tmp_path / "out2", seed=0)
    assert sum(stats["image_sizes"].values()) == 4 and len(stats["image_sizes"]) == 2


def test_dataset_range_splits_and_limit(processed):
    plain = SpriteDataset(processed, "train")
    x, i = plain[0]
    assert x.shape == (3, 215, 215) and x.dtype == torch.float32 and i == 0
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1.0  # white background maps to 1
    assert torch.equal(to_uint8(x), plain.images[0])  # the stored uint8 sprite, exactly
    val, everything = SpriteDataset(processed, "val"), SpriteDataset(processed, None)
    assert len(plain) + len(val) < len(everything) == 16
    assert not {r["number"] for r in plain.rows} & {r["number"] for r in val.rows}
    n = len(plain)  # a cap spreads over the split (Pokedex order), not the first generations only
    assert [r["number"] for r in SpriteDataset(processed, "train", limit=3).rows] == \
        [plain.rows[i]["number"] for i in (0, n // 3, 2 * n // 3)]


def test_spread_takes_evenly_spaced_rows():
    assert spread(list(range(718)), 160)[:4] == [0, 4, 8, 13] and spread(list(range(718)), 160)[-1] == 713
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8] and spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread([1, 2], 0) == spread([1, 2], 2) == spread([1, 2], 9) == [1, 2]


def test_unit_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_unit_range(u)), u)


def test_imported_and_preprocessed_folders_get_the_users_permissions(raw_subset, tiny_params, tmp_path):
    """Staging folders are made under the umask, not with tempfile's private 0700."""
    import os

    from pokesprite.data.preprocess import preprocess

    old = os.umask(0o022)
    try:
        raw.import_dataset(raw_subset, tmp_path / "data")
        preprocess(tiny_params.data, raw_dir=raw_subset, out_dir=tmp_path / "out", seed=0)
    finally:
        os.umask(old)
    for folder in (tmp_path / "data", tmp_path / "data/small_images", tmp_path / "out", tmp_path / "out/images"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_preprocess_stage_names_its_tokenizer_as_configured_not_where_it_is_installed(
        raw_subset, tiny_params, tmp_path, monkeypatch):
    # stats.json is part of outputs/preprocess, whose hash every later stage's dvc.lock entry holds:
    # the path of the venv's site-packages would make two clones disagree (issue: a fresh clone's
    # make repro must leave git status clean).
    from pokesprite.stages import run_preprocess

    monkeypatch.setenv("POKESPRITE_TRACKING", "off")
    shutil.copytree(raw_subset, tmp_path / "data")
    run_preprocess(tiny_params, root=tmp_path)
    text = (tmp_path / "outputs" / "preprocess" / "stats.json").read_text()
    assert json.loads(text)["caption_tokens"]["tokenizer"] == tiny_params.text.model
    assert sys.prefix not in text and str(tmp_path) not in text


def test_clean_caption_drops_quotes_around_the_whole_caption():
    assert clean_caption('"a squat green seed Pok\u00e9mon"') == "a squat green seed Pok\u00e9mon"
    assert clean_caption('  \u201c a seed \u201d ') == "a seed"  # curly quotes are made plain first
    assert clean_caption('a "seed" Pok\u00e9mon') == 'a "seed" Pok\u00e9mon'  # inner quotes stay


def test_a_tiny_image_names_the_file_and_its_size(raw_subset, tmp_path):
    bad = broken_copy(raw_subset, tmp_path)
    Image.new("RGBA", (7, 30), (0, 0, 0, 0)).save(bad / "small_images/005.png")
    with pytest.raises(raw.DatasetError, match=r"005\.png: image is only 7x30 pixels"):
        raw.import_dataset(bad, tmp_path / "data")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(bad / "small_images/005.png")  # the smallest accepted
    raw.import_dataset(bad, tmp_path / "data")
