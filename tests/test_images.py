"""Background keying (RGB sprite -> RGBA), PNG encoding and atomic writes."""
from __future__ import annotations

import base64
import io
import os
import stat

import numpy as np
import pytest
from PIL import Image

from pokesprite.data.preprocess import to_square_rgb
from pokesprite.images import key_background, parse_colour, png_base64, save_image_atomic

WHITE = (255, 255, 255)
# 20 real sprites spread over the national numbers (1, 46, ..., 856). Measured with the default
# tolerance: IoU of the opaque masks mean 0.986, lowest 0.936 (#721, a light sprite whose rim meets
# the white without an outline). Over all 898 sprites: mean 0.975, median 0.988, 89% at >= 0.95; the
# worst (#830, 0.51) is a white puffball without an outline, and background holes enclosed by the
# sprite (rings, looped tails) stay opaque by the rule.
SPRITES = tuple(range(1, 899, 45))


def composite(rgba: np.ndarray, background) -> np.ndarray:
    """Straight-alpha RGBA over a flat colour, in float: what the keyed sprite looks like on it."""
    a = rgba[..., 3:].astype(np.float64) / 255
    return rgba[..., :3] * a + np.array(background, np.float64) * (1 - a)


def square_alpha(im: Image.Image, size: int = 215) -> np.ndarray:
    """The original alpha channel through the same fit-into-a-square as ``to_square_rgb``."""
    alpha = im.convert("RGBA").getchannel("A")
    if alpha.size != (size, size):
        w, h = alpha.size
        scale = size / max(w, h)
        resized = alpha.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        alpha = Image.new("L", (size, size), 0)
        alpha.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return np.asarray(alpha)


def test_a_ring_on_white_keys_the_outside_and_keeps_the_enclosed_white():
    img = np.full((40, 40, 3), 255, np.uint8)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 19.5, xx - 19.5)
    img[(r >= 8) & (r <= 14)] = (200, 30, 30)  # red ring, white inside and outside
    img[0, 0] = (250, 250, 250)  # off-white within the tolerance: still background
    out = key_background(img)
    assert out.shape == (40, 40, 4) and out.dtype == np.uint8
    assert (out[r > 16, 3] == 0).all()  # outside the ring: clear
    assert (out[r < 6, 3] == 255).all()  # enclosed white: not connected to the border, opaque
    assert (out[(r >= 9) & (r <= 13), 3] == 255).all() and (out[(r >= 9) & (r <= 13), :3] == (200, 30, 30)).all()
    assert out[0, 0, 3] == 0


def test_soft_edge_recovers_coverage_and_colour():
    """A 50% / 25% covered black pixel beside opaque black: alpha 0.5 / 0.25 and colour black."""
    img = np.full((9, 9, 3), 255, np.uint8)
    img[3:6, 3:6] = 0  # opaque black block
    img[4, 2] = 128  # half covered: 255 - 0.5 * 255 (rounded)
    img[4, 6] = 191  # a quarter covered
    out = key_background(img)
    assert out[4, 2, 3] == round(255 * 127 / 255) and out[4, 6, 3] == 64
    assert (out[4, 2, :3] <= 1).all() and (out[4, 6, :3] <= 1).all()  # un-mixed from white: black
    assert out[4, 4, 3] == 255 and out[0, 0, 3] == 0


def test_other_background_colours_and_the_tolerance():
    green = (0, 177, 64)
    img = np.zeros((20, 20, 3), np.uint8)
    img[:] = green
    img[8:12, 8:12] = (255, 255, 255)  # a white sprite on green
    img[0, 5] = (10, 187, 74)  # 10 off the background in every channel
    out = key_background(img, green)
    assert (out[8:12, 8:12, 3] == 255).all() and out[0, 0, 3] == 0 and out[0, 5, 3] == 0
    strict = key_background(img, "#00b140", tolerance=5)
    assert strict[0, 5, 3] > 0 and strict[0, 0, 3] == 0
    # the sprite keyed on its own colour would vanish: only the border-connected region counts
    assert (key_background(img, WHITE)[..., 3] == 255).all()


def test_compositing_the_keyed_sprite_on_the_background_gives_the_input_back():
    rng = np.random.default_rng(0)
    img = np.full((32, 32, 3), 255, np.uint8)
    img[8:24, 8:24] = rng.integers(0, 200, (16, 16, 3))
    img[7, 8:24] = rng.integers(120, 240, (16, 3))  # a soft row at the top edge
    out = key_background(img)
    assert np.abs(composite(out, WHITE) - img).max() <= 1.0


def test_bad_input_and_colours_are_named():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        key_background(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="--background must be a colour"):
        parse_colour("white", name="--background")
    with pytest.raises(ValueError, match="background must be a colour"):
        parse_colour("256,0,0")
    assert parse_colour("#FF8000") == (255, 128, 0) == parse_colour(" 255, 128,0 ") == parse_colour([255, 128, 0])


def test_real_sprites_composited_as_in_preprocess_get_their_alpha_back(full_source):
    """Composite RGBA originals on white exactly as the preprocess stage does, key them, compare alphas."""
    ious, edge_errors = [], []
    for number in SPRITES:
        with Image.open(full_source / "small_images" / f"{number:03d}.png") as im:
            rgb = np.asarray(to_square_rgb(im, 215, WHITE))
            truth = square_alpha(im)
        keyed = key_background(rgb)
        a = keyed[..., 3]
        m_true, m_key = truth >= 128, a >= 128
        ious.append((m_true & m_key).sum() / (m_true | m_key).sum())
        soft = (truth > 0) & (truth < 255)
        edge_errors.append(np.abs(a.astype(float) - truth)[soft].mean() / 255)
        seen = a > 0  # what is kept composites back to the input; the cleared pixels were within the tolerance
        assert np.abs(composite(keyed, WHITE) - rgb)[seen].max() <= 1.5
        assert np.abs(composite(keyed, WHITE) - rgb).max() <= 16
    ious = np.array(ious)
    assert ious.mean() >= 0.975 and ious.min() >= 0.92, np.round(ious, 3)  # measured 0.986 and 0.936
    # mean |alpha error| on the partly transparent pixels: measured 0.107; a hard 0/1 edge scores 0.403
    assert np.mean(edge_errors) <= 0.15, np.round(edge_errors, 3)


def test_png_encoding_round_trips_rgba():
    img = key_background(np.full((5, 7, 3), 255, np.uint8))
    decoded = Image.open(io.BytesIO(base64.b64decode(png_base64(img))))
    assert decoded.format == "PNG" and decoded.mode == "RGBA" and decoded.size == (7, 5)
    assert np.array_equal(np.asarray(decoded), img)


def test_atomic_save_gives_normal_permissions_and_leaves_no_temporary_file(tmp_path):
    old = os.umask(0o022)
    try:
        save_image_atomic(Image.new("RGBA", (3, 3)), tmp_path / "out" / "a.png")
        os.umask(0o077)
        save_image_atomic(Image.new("RGB", (3, 3)), tmp_path / "out" / "b.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "a.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "b.png").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "out" / "a.png").mode == "RGBA"
    with pytest.raises(ValueError, match="unknown image file extension"):
        save_image_atomic(Image.new("RGB", (3, 3)), tmp_path / "c.nope")


@pytest.mark.parametrize("argv,words", [
    (["-n", "1000"], "-n 1000: draw 1..64 sprites"), (["-n", "0"], "-n must be at least 1"),
    (["--steps", "0"], "--steps 0: must be in 1..1000"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--sampler", "euler"], "choose one of ddpm, ddim"),
    (["-o", "FILE"], "exists and is not a folder"), (["-o", "/proc/pokesprite_out"], "-o /proc/pokesprite_out: cannot"),
    (["--seed", "-1"], "--seed -1: must be in 0..9223372036854775804 (sprite i is drawn with seed + i)"),
    (["--seed", str(2**63 - 1)], f"--seed {2**63 - 1}: must be in 0..9223372036854775804"),
])
def test_generate_checks_its_request_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, words):
    """No model exists here: each mistake must be reported first, with exit code 2."""
    from pokesprite.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a folder")
    assert main(["generate", "a red bird", "--model", "models:/none@champion", "-o", "new/out", *argv]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a refused request leaves no folder behind


def test_generate_refuses_an_empty_prompt(tmp_path, monkeypatch, capsys):
    from pokesprite.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "  ", "--model", "models:/none@champion"]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_generate_refuses_a_prompt_past_the_length_limit(tmp_path, monkeypatch, capsys):
    from pokesprite.cli import main
    from pokesprite.pipeline import MAX_PROMPT_CHARS

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a" * (MAX_PROMPT_CHARS + 1), "--model", "models:/none@champion"]) == 2
    assert f"the prompt is {MAX_PROMPT_CHARS + 1} characters long" in capsys.readouterr().err


def test_served_prompts_must_be_text():
    import pandas as pd

    from pokesprite.registry import prompts_from_input

    assert prompts_from_input("a") == ["a"] and prompts_from_input(pd.DataFrame({"prompt": ["a", ""]})) == ["a", ""]
    for bad, words in (([1, "a"], "prompt 0 is int 1, not text"),
                       (pd.Series(["a", None], dtype=object), "prompt 1 is NoneType"), ([], "no prompts given")):
        with pytest.raises(ValueError, match=words):
            prompts_from_input(bad)
