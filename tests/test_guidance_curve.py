"""The guidance curve: its CSV, metric names and picture on fake numbers, and the per-scale loop with a
fake pipeline, feature network and scorer (no sampling, no Inception)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pokesprite.config import EvaluateConfig
from pokesprite.evaluation import guidance_curve as curve
from pokesprite.evaluation.drawing import draw
from pokesprite.evaluation.evaluate import guidance_curve_points
from pokesprite.evaluation.fid import kernel_inception_distance

POINTS = [{"scale": 1.0, "kid": 0.31, "kid_std": 0.01, "r_precision": 0.05},
          {"scale": 1.5, "kid": 0.25, "kid_std": 0.012, "r_precision": 0.0625},
          {"scale": 7.0, "kid": 0.4, "kid_std": 0.02, "r_precision": 0.125}]


def test_curve_csv_and_metric_names_on_fake_numbers(tmp_path):
    expected = ("scale,kid,kid_std,r_precision\n"
                "1,0.31,0.01,0.05\n"
                "1.5,0.25,0.012,0.0625\n"
                "7,0.4,0.02,0.125\n")
    assert curve.curve_csv(POINTS) == expected
    curve.write_curve_csv(POINTS, tmp_path / "sub" / curve.CSV_FILE)
    assert (tmp_path / "sub" / curve.CSV_FILE).read_text() == expected
    metrics = curve.curve_metrics(POINTS)
    assert len(metrics) == 9
    assert metrics["guidance.1.kid"] == 0.31 and metrics["guidance.1.5.kid_std"] == 0.012
    assert metrics["guidance.7.r_precision"] == 0.125


def test_curve_image_draws_kid_left_and_r_precision_right():
    picture = curve.curve_image(list(reversed(POINTS)), width=640, height=280)  # sorted by scale inside
    assert picture.size == (640, 280)
    pixels = np.asarray(picture)
    red = np.all(pixels == (178, 34, 34), axis=-1)  # firebrick: KID
    blue = np.all(pixels == (0, 0, 128), axis=-1)  # navy: R-precision
    assert red[:, :320].sum() > 50 and red[:, 320:].sum() == 0
    assert blue[:, 320:].sum() > 50 and blue[:, :320].sum() == 0
    # R-precision rises with the scale: its rightmost drawn pixels sit higher than its leftmost.
    ys, xs = np.nonzero(blue)
    assert ys[xs == xs.max()].mean() < ys[xs == xs.min()].mean()
    with pytest.raises(ValueError, match="at least one point"):
        curve.curve_image([])


class FakePipeline:
    """Draws (N, 8, 8, 3) sprites whose pixels encode the guidance scale and the caption index."""

    def __init__(self, own_scale: float = 3.0):
        self.device = torch.device("cpu")
        self.sample = SimpleNamespace(guidance_scale=own_scale)
        self.calls = []

    def __call__(self, prompts, *, seed, num_steps, sampler, guidance_scale, precision, batch):
        assert precision == "fp32" and batch == len(prompts)  # the evaluation's batches are drawn whole
        self.calls.append((list(prompts), seed, guidance_scale))
        scale = self.sample.guidance_scale if guidance_scale is None else guidance_scale
        values = [10 * scale + int(p.split()[-1]) for p in prompts]
        return np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in values])


def fake_inception(x):
    """(B, 3, 299, 299) -> (B, 3) mean colour: a stand-in feature network."""
    return x.mean(dim=(2, 3))


class PerfectScorer:
    def similarity(self, feats, captions):
        return torch.eye(len(captions))  # every sprite matches its own caption best


def test_draw_seeds_each_sprite_by_its_index_and_passes_the_scale():
    pipe = FakePipeline()
    cfg = EvaluateConfig(seed=5, batch_size=4)
    images = draw(pipe, [f"caption {i}" for i in range(10)], cfg, "test", guidance_scale=2.0)
    assert images.shape == (10, 3, 8, 8) and images.dtype == torch.uint8
    # a batch starting at sprite i gets seed 5 + i: the pipeline draws its sprite j with seed 5 + i + j
    assert [(len(p), s, g) for p, s, g in pipe.calls] == [(4, 5, 2.0), (4, 9, 2.0), (2, 13, 2.0)]
    assert images[:, 0, 0, 0].tolist() == [20 + i for i in range(10)]


def test_guidance_curve_draws_each_scale_and_reuses_the_models_own():
    pipe = FakePipeline(own_scale=3.0)
    captions = [f"caption {i}" for i in range(8)]
    cfg = EvaluateConfig(batch_size=8, candidates=4, kid_subsets=3, kid_subset_size=6, guidance_scales=(1.0, 3.0, 5.0))
    held_feats = torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    real_feats = torch.rand(12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    points = guidance_curve_points(pipe, captions, held_feats, fake_inception, real_feats, PerfectScorer(), cfg)
    assert [p["scale"] for p in points] == [1.0, 3.0, 5.0]
    assert [g for _, _, g in pipe.calls] == [1.0, 5.0]  # 3 = the model's own scale: the held-out set is reused
    reused = kernel_inception_distance(held_feats, real_feats, subsets=3, subset_size=6, seed=cfg.seed)
    assert (points[1]["kid"], points[1]["kid_std"]) == reused
    # At scale 1 the fake sprites have pixel values 10 + i: features (10 + i) / 128 - 1 in all 3 channels.
    feats_1 = torch.tensor([[(10 + i) / 128 - 1] * 3 for i in range(8)], dtype=torch.float64)
    expected_1 = kernel_inception_distance(feats_1, real_feats, subsets=3, subset_size=6, seed=cfg.seed)
    assert points[0]["kid"] == pytest.approx(expected_1[0], rel=1e-5)
    assert all(p["r_precision"] == 1.0 for p in points)
    assert guidance_curve_points(pipe, captions, held_feats, fake_inception, real_feats, PerfectScorer(),
                           EvaluateConfig()) == []
