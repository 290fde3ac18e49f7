"""Memorisation: nearest training neighbours in feature space, the calibrated near-copy threshold,
the rate, and the picture of the closest pairs; all on hand-made features with known answers."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pokesprite.config import EvaluateConfig
from pokesprite.evaluation.evaluate import MEMORISATION_PAIRS, memorisation_report
from pokesprite.evaluation.grid import pairs_grid
from pokesprite.evaluation.memorisation import closest, copy_threshold, memorisation_rate, nearest_neighbours


def at_distance(d: float) -> list[float]:
    """A 2-d vector whose cosine distance to (1, 0) is ``d`` (cos = 1 - d)."""
    c = 1.0 - d
    return [c, math.sqrt(1.0 - c * c)]


def test_nearest_neighbours_hand_made():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    query = torch.tensor([[2.0, 0.0],    # bank 0 scaled: cosine ignores the norm, distance 0
                          [1.0, 0.1],    # cos 1/sqrt(1.01) to bank 0, 1.1/sqrt(2.02) to bank 2
                          [3.0, 4.0],    # cos 0.6, 0.8, 7/(5 sqrt 2) = 0.98995: bank 2
                          [-1.0, 0.0],   # cos -1, 0, -1/sqrt 2: bank 1 at distance 1
                          [0.0, 3.0]], dtype=torch.float64)
    dist, index = nearest_neighbours(query, bank)
    assert index.tolist() == [0, 0, 2, 1, 1]
    expected = [0.0, 1 - 1 / math.sqrt(1.01), 1 - 7 / (5 * math.sqrt(2)), 1.0, 0.0]
    assert dist.tolist() == pytest.approx(expected, abs=1e-12)
    assert dist.dtype == torch.float64


def test_nearest_neighbours_ties_go_to_the_lowest_index_and_shapes_are_checked():
    bank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    dist, index = nearest_neighbours(torch.tensor([[5.0, 0.0]]), bank)
    assert index.tolist() == [1] and dist.tolist() == [0.0]
    with pytest.raises(ValueError, match="one width"):
        nearest_neighbours(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-empty bank"):
        nearest_neighbours(torch.ones(2, 3), torch.ones(0, 3))


def test_copy_threshold_is_the_percentile_by_hand():
    train = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    distances = [0.4, 0.0, 0.8, 0.1, 0.2]  # sorted: 0, 0.1, 0.2, 0.4, 0.8 (n = 5)
    held = torch.tensor([at_distance(d) for d in distances], dtype=torch.float64)
    # position p/100 * (n - 1), linear between neighbours:
    assert copy_threshold(held, train, 1.0) == pytest.approx(0.04 * 0.1, abs=1e-9)  # 0 + 0.04 (0.1 - 0)
    assert copy_threshold(held, train, 30.0) == pytest.approx(0.1 + 0.2 * 0.1, abs=1e-9)  # position 1.2
    assert copy_threshold(held, train, 50.0) == pytest.approx(0.2, abs=1e-9)
    assert copy_threshold(held, train, 100.0) == pytest.approx(0.8, abs=1e-9)
    assert copy_threshold(held, train, 1.0) == pytest.approx(float(np.percentile(distances, 1.0)), abs=1e-9)
    with pytest.raises(ValueError, match="percentile"):
        copy_threshold(held, train, 101.0)


def test_exact_copies_give_their_known_share():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 16, generator=g) * torch.cat([torch.ones(8), torch.zeros(8)])  # dims 0..7 only
    # Real held-out sprites: training sprites with noise, near but never identical (distances > 0).
    held = train[:10] + 0.3 * torch.rand(10, 16, generator=g) * torch.cat([torch.ones(8), torch.zeros(8)])
    threshold = copy_threshold(held, train, 1.0)
    assert threshold > 0
    copies = 2.5 * train[[3, 7, 11]]  # exact copies (rescaled: the same direction)
    new = torch.rand(7, 16, generator=g) * torch.cat([torch.zeros(8), torch.ones(8)])  # orthogonal: distance 1
    dist, index = nearest_neighbours(torch.cat([copies, new]), train)
    assert index[:3].tolist() == [3, 7, 11] and dist[3:].tolist() == pytest.approx([1.0] * 7)
    assert memorisation_rate(dist, threshold) == pytest.approx(3 / 10)


def test_memorisation_rate_counts_at_or_below_and_closest_orders():
    d = torch.tensor([0.3, 0.0, 0.5, 0.1, 0.1])
    assert memorisation_rate(d, 0.1) == pytest.approx(3 / 5)
    assert memorisation_rate(d, 0.0) == pytest.approx(1 / 5)  # an exact copy counts even at threshold 0
    assert closest(d, 3).tolist() == [1, 3, 4]  # ties by index
    assert closest(d, 9).tolist() == [1, 3, 4, 0, 2]


def test_pairs_grid_puts_each_pair_side_by_side():
    red = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    blue = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    blue[..., 2] = 255
    picture = pairs_grid(red, blue, ["pair one", "pair two"], ("generated", "nearest"), cell=40)
    # Layout of labelled_grid: header 20 px, then per row a 34 px label and a 40 px cell.
    assert picture.size == (80, 20 + 2 * (34 + 40))
    for row in range(2):
        y = 20 + row * 74 + 34 + 20
        assert picture.getpixel((20, y)) == (255, 0, 0) and picture.getpixel((60, y)) == (0, 0, 255)
    with pytest.raises(ValueError, match="pair labels"):
        pairs_grid(red, blue, ["one"], ("a", "b"))


def test_memorisation_of_a_set_with_copies_of_training_sprites():
    """The evaluation's wiring: the bank is the training split, the threshold comes from val + test."""
    g = torch.Generator().manual_seed(1)
    splits = ["train"] * 6 + ["val", "test", "val", "test"]
    numbers = list(range(101, 111))
    feats = torch.rand(10, 12, generator=g, dtype=torch.float64)
    feats[6:] = feats[:4] + 0.2 * torch.rand(4, 12, generator=g, dtype=torch.float64)  # held: near, not equal
    ref = {"splits": splits, "numbers": numbers, "features": feats}
    # Generated: copies of training sprites 2 and 5 (numbers 103, 106) and 3 sprites far from everything.
    far = torch.zeros(3, 12, dtype=torch.float64)
    far[:, 0] = -1.0  # opposite of the non-negative features: cosine distance > 1
    gen_feats = torch.cat([feats[[2, 5]], far])
    gen_images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous() * 40
    real = SimpleNamespace(rows=[{"number": n} for n in reversed(numbers)],  # positions differ from ref's
                           images=torch.stack([torch.full((3, 4, 4), n, dtype=torch.uint8) for n in reversed(numbers)]))
    metrics, picture = memorisation_report(gen_images, gen_feats, [1, 2, 3, 4, 5], ref, real, EvaluateConfig())
    held_dist, _ = nearest_neighbours(feats[6:], feats[:6])
    assert metrics["memorisation_threshold"] == pytest.approx(float(torch.quantile(held_dist, 0.01)))
    assert metrics["memorisation_rate"] == pytest.approx(2 / 5)
    assert metrics["memorisation_sprites"] == 5
    assert metrics["memorisation_distance_median_real"] == pytest.approx(float(held_dist.median()))
    rows = min(MEMORISATION_PAIRS, 5)
    cell = 215  # sprites at their own size
    assert picture.size == (2 * cell, 20 + rows * (34 + cell))
    # The two copies come first (in either order: both are ~0 apart), each beside its training sprite:
    # generated sprite 0 (pixel value 0) beside #103, generated sprite 1 (value 40) beside #106.
    pairs = []
    for row in range(rows):
        y = 20 + row * (34 + cell) + 34 + cell // 2
        pairs.append((picture.getpixel((cell // 2, y))[0], picture.getpixel((cell + cell // 2, y))[0]))
    assert sorted(pairs[:2]) == [(0, 103), (40, 106)]
    assert {gen for gen, _ in pairs[2:]} == {80, 120, 160}
