"""Batched on-device augmentation: each transform against torchvision's, and the batch-level properties."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pokesprite.config import AugmentConfig
from pokesprite.data.augment import adjust_brightness, adjust_contrast, adjust_saturation, augment_batch, rotate
from pokesprite.data.dataset import to_unit_range

NONE = AugmentConfig(rotation_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hflip_prob=0.0)
WHITE = (255, 255, 255)


def sprites(n=4, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, size, size), 255, dtype=torch.uint8)
    x[:, :, 6:18, 4:14] = torch.randint(0, 256, (n, 3, 12, 10), generator=g, dtype=torch.uint8)  # off-centre
    return x


def test_no_augmentation_is_the_plain_conversion():
    x = sprites()
    assert torch.equal(augment_batch(x, NONE, WHITE), to_unit_range(x))


def test_flip_probability_one_mirrors_every_image_and_zero_none():
    x = sprites()
    flipped = augment_batch(x, AugmentConfig(0.0, 0.0, 0.0, 0.0, hflip_prob=1.0), WHITE)
    assert torch.equal(flipped, to_unit_range(x).flip(-1))


def test_flip_half_mirrors_about_half_of_a_large_batch():
    torch.manual_seed(0)
    x = sprites(n=400)
    out = augment_batch(x, AugmentConfig(0.0, 0.0, 0.0, 0.0, hflip_prob=0.5), WHITE)
    mirrored = (out == to_unit_range(x).flip(-1)).flatten(1).all(1) & ~(out == to_unit_range(x)).flatten(1).all(1)
    assert 160 < int(mirrored.sum()) < 240


@pytest.mark.parametrize("factor", [0.7, 1.0, 1.3])
def test_colour_jitter_matches_torchvision(factor):
    x = sprites().float() / 255
    f = torch.full((len(x),), factor)
    torch.testing.assert_close(adjust_brightness(x, f), TF.adjust_brightness(x, factor), atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_contrast(x, f), TF.adjust_contrast(x, factor), atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_saturation(x, f), TF.adjust_saturation(x, factor), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_exact_and_counter_clockwise():
    x = sprites().float() / 255
    out = rotate(x, torch.full((len(x),), 90.0), torch.ones(3))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotation_matches_torchvision_and_fills_with_the_background():
    x = sprites(n=1, size=40).float() / 255
    fill = torch.tensor([0.0, 0.5, 1.0])
    ours = rotate(x, torch.tensor([25.0]), fill)
    ref = TF.rotate(x, 25.0, interpolation=TF.InterpolationMode.BILINEAR, fill=fill.tolist())
    assert (ours - ref).abs().mean() < 0.01  # same picture; torchvision samples at slightly different points
    corner = ours[0, :, 0, 0]  # rotated out of the frame: pure fill colour
    torch.testing.assert_close(corner, fill, atol=1e-5, rtol=0)


def test_augmented_batch_is_in_range_and_differs_per_image():
    torch.manual_seed(0)
    x = sprites(n=1).repeat(8, 1, 1, 1)  # eight copies of one sprite
    out = augment_batch(x, AugmentConfig(), WHITE)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert len({tuple(o.flatten()[:200].tolist()) for o in out}) == 8  # independent draws per image


def test_augmentation_draws_from_the_device_generator_and_repeats_with_its_seed():
    x = sprites()
    torch.manual_seed(3)
    a = augment_batch(x, AugmentConfig(), WHITE)
    torch.manual_seed(3)
    assert torch.equal(a, augment_batch(x, AugmentConfig(), WHITE))


def test_jitter_and_rotation_draws_cover_both_sides_of_their_ranges(monkeypatch):
    """rotation in [-r, r] (both directions) and brightness/contrast/saturation factors in
    [1 - s, 1 + s] (darker and brighter): the drawn parameters, seen through the transforms."""
    from pokesprite.data import augment

    seen = {}

    def spy(name, fn):
        def wrapped(x, value, *rest):
            seen[name] = value.clone()
            return fn(x, value, *rest)
        monkeypatch.setattr(augment, name, wrapped)

    for name in ("rotate", "adjust_brightness", "adjust_contrast", "adjust_saturation"):
        spy(name, getattr(augment, name))
    torch.manual_seed(0)
    cfg = AugmentConfig(rotation_degrees=10.0, brightness=0.2, contrast=0.3, saturation=0.4, hflip_prob=0.0)
    augment_batch(sprites(n=400), cfg, WHITE)
    for name, half in (("rotate", 10.0), ("adjust_brightness", 0.2), ("adjust_contrast", 0.3),
                       ("adjust_saturation", 0.4)):
        centre = 0.0 if name == "rotate" else 1.0
        d = seen[name] - centre
        assert d.abs().max() <= half + 1e-6, name
        assert d.min() < -0.8 * half and d.max() > 0.8 * half, name  # both directions, near the ends
