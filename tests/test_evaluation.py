"""Evaluation metrics on tiny inputs with known answers, and the promotion rule."""
import math

import numpy as np
import pytest
import torch

from pokesprite.evaluation.fid import frechet_distance, kernel_inception_distance
from pokesprite.evaluation.grid import labelled_grid
from pokesprite.evaluation.image_metrics import PSNR_CAP, psnr, ssim
from pokesprite.evaluation.scorer import BagOfWords, IndependentScorer
from pokesprite.evaluation.sensitivity import text_sensitivity
from pokesprite.registry import beats


def features(n=400, d=16, seed=0):
    """Correlated Gaussian features of about unit scale (as KID's kernel (x.y/d + 1)^3 expects)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix / math.sqrt(2)


# ---------------------------------------------------------------- FID / KID

def test_fid_of_identical_sets_is_zero():
    a = features()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_closed_forms_shift_and_scale():
    a = features()
    shift = torch.linspace(-1, 1, a.shape[1], dtype=torch.float64)
    # Same covariance, means apart by `shift`: FID = |shift|^2.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # b = 2a: C_b = 4 C_a, so Tr(C_a + 4 C_a - 2 * 2 C_a) = Tr(C_a), plus |mu_a|^2.
    expected = float(a.mean(0).square().sum() + torch.trace(torch.cov(a.T)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n, m, d", [(40, 25, 64), (300, 200, 16)])  # fewer sets than dimensions, and more
def test_fid_equals_the_matrix_square_root_formula(n, m, d):
    """Against FID as the reference implementations compute it: covariances and scipy's sqrtm."""
    from scipy import linalg

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(m, d, generator=g, dtype=torch.float64)
    b = b @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.3
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_fid_and_kid_grow_with_noise():
    a, b = features(seed=0), features(seed=0)[torch.randperm(400)]  # b: the same distribution
    g = torch.Generator().manual_seed(2)
    noisy = [a + s * torch.randn(a.shape, generator=g, dtype=torch.float64) for s in (1.0, 3.0)]
    fids = [frechet_distance(a, x) for x in noisy]
    kids = [kernel_inception_distance(a, x, subsets=20, subset_size=100)[0] for x in noisy]
    assert 0 < fids[0] < fids[1] and 0 < kids[0] < kids[1]
    assert abs(kernel_inception_distance(a, b, subsets=20, subset_size=100)[0]) < kids[0] / 2


def test_kid_of_identical_sets_is_about_zero_with_its_spread():
    a = features(n=1000)
    kid, std = kernel_inception_distance(a, a, subsets=50, subset_size=100)
    assert std > 0 and abs(kid) < std  # zero within its spread (slightly negative: the subsets overlap)
    noisy = a + torch.randn(a.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert kernel_inception_distance(a, noisy, subsets=50, subset_size=100)[0] > kid + 2 * std


def test_fid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="FID needs"):
        frechet_distance(features(d=4), features(d=5))


# ---------------------------------------------------------------- PSNR / SSIM

def images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_psnr_identical_is_capped_and_offset_has_closed_form():
    x = images()
    assert psnr(x, x).tolist() == [PSNR_CAP] * 3
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    # every pixel off by 10: MSE = 100, PSNR = 10 log10(255^2 / 100) = 28.1308 dB
    assert psnr(flat, flat + 10).item() == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = images()
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    light = (x.int() + torch.randint(-10, 11, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    heavy = (x.int() + torch.randint(-80, 81, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    s_light, s_heavy = ssim(x, light).mean().item(), ssim(x, heavy).mean().item()
    assert 1 > s_light > s_heavy
    assert psnr(x, light).mean() > psnr(x, heavy).mean()


def test_ssim_has_its_closed_form_on_flat_images_and_blurs_as_a_2d_gaussian_convolution():
    # Two flat images a and b: no variance, no covariance, so SSIM = (2ab + c1) / (a^2 + b^2 + c1).
    a, b, c1 = 100, 140, (0.01 * 255) ** 2
    flat = lambda v: torch.full((1, 3, 20, 20), v, dtype=torch.uint8)  # noqa: E731
    assert ssim(flat(a), flat(b)).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    # The separable blur equals the 11x11 window's depthwise convolution.
    from pokesprite.evaluation.image_metrics import _blur, _gaussian
    x = images().double()
    g = _gaussian()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    assert torch.allclose(_blur(x), torch.nn.functional.conv2d(x, window, groups=3), atol=1e-9)


def test_image_metrics_name_a_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        psnr(images().float(), images().float())


# ---------------------------------------------------------------- Inception (the real TF-FID network)

def test_inception_features_of_real_sprites(processed):
    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.evaluation.inception import FEATURES, inception_features, load_inception

    ds = SpriteDataset(processed, None)
    model = load_inception()
    f = inception_features(model, ds.images[:6], batch_size=4)
    assert f.shape == (6, FEATURES) and f.dtype == torch.float64 and torch.isfinite(f).all()
    again = inception_features(model, ds.images[:6].permute(0, 2, 3, 1).numpy(), batch_size=6)  # NHWC numpy
    assert torch.allclose(f, again, atol=1e-4)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-3)
    noisy = (ds.images[:6].int() + torch.randint(-60, 61, ds.images[:6].shape)).clamp(0, 255).to(torch.uint8)
    assert frechet_distance(f, inception_features(model, noisy)) > 1.0


def test_compiled_inception_gives_the_plain_networks_features(processed):
    """On the CPU load_inception compiles the network (frozen, batch norms folded, channels-last):
    the features of real sprites stay within FAST_TOLERANCE of the network as shipped."""
    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.evaluation.inception import (FAST_TOLERANCE, inception_features, load_inception,
                                                 load_plain_inception)

    sprites = SpriteDataset(processed, None).images[:7]
    plain = inception_features(load_plain_inception(), sprites, batch_size=4)
    compiled_model = load_inception()
    assert "aten::conv2d" in str(compiled_model.graph)  # the compiled one (inlined) was kept
    assert "aten::batch_norm" not in str(compiled_model.graph)
    compiled = inception_features(compiled_model, sprites, batch_size=4)
    assert (compiled - plain).abs().max() <= FAST_TOLERANCE
    assert torch.equal(inception_features(load_inception(fast=False), sprites, batch_size=4), plain)


def test_load_inception_keeps_the_plain_network_when_compiling_fails_or_differs(monkeypatch, caplog):
    from pokesprite.evaluation import inception

    def broken(model):
        raise RuntimeError("unknown graph")

    monkeypatch.setattr(inception, "optimize_for_cpu", broken)
    assert "aten::conv2d" not in str(inception.load_inception().graph)  # the shipped one
    assert "failed (unknown graph)" in caplog.text
    monkeypatch.setattr(inception, "optimize_for_cpu", lambda model: model)
    monkeypatch.setattr(inception, "feature_difference", lambda a, b: 1.0)
    inception.load_inception()
    assert "differ by 1 (> 0.0001)" in caplog.text


# ---------------------------------------------------------------- the independent scorer

def test_bag_of_words_tfidf_known_values():
    words = BagOfWords.fit(["red fire cat", "blue water cat", "red water"])
    assert words.vocabulary == ["cat", "red", "water"]  # words seen at least twice
    v = words(["red cat", "unknown words"])
    idf = math.log(4 / 3) + 1  # each of the three words is in 2 of 3 captions
    assert v[0].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    assert words.idf.tolist() == pytest.approx([idf] * 3)
    assert v[1].abs().sum() == 0  # no known word: the zero vector


def test_bag_of_words_counts_repeated_and_unknown_words():
    words = BagOfWords.fit(["red fire cat", "blue water cat", "red water", "fire"])
    assert words.vocabulary == ["cat", "fire", "red", "water"]
    counts = words.counts(["Red red CAT, red!", "", "blue dog"])
    assert counts.tolist() == [[1.0, 0.0, 3.0, 0.0], [0.0] * 4, [0.0] * 4]


def test_independent_scorer_learns_a_caption_image_link(tmp_path):
    from pokesprite.evaluation.retrieval import r_precision

    colours = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
    shapes = ["cat", "bird", "fish", "snake", "dog", "frog", "bug", "rock"]
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, 64, generator=g)

    def make(n):
        c = torch.randint(0, 8, (n,), generator=g)
        s = torch.randint(0, 8, (n,), generator=g)
        feats = basis[c] + basis[8 + s] + 0.3 * torch.randn(n, 64, generator=g)
        return feats, [f"a {colours[i]} {shapes[j]}" for i, j in zip(c.tolist(), s.tolist())]

    train_f, train_c = make(400)
    test_f, test_c = make(64)
    scorer = IndependentScorer.fit(train_f, train_c, dim=16, epochs=200, lr=1e-2)
    sim = scorer.similarity(test_f, test_c)
    assert r_precision(sim, 8, generator=torch.Generator().manual_seed(0)) > 0.5  # chance: 1/8
    scorer.save(tmp_path / "s.pt")
    assert torch.allclose(IndependentScorer.load(tmp_path / "s.pt").similarity(test_f, test_c), sim)


# ---------------------------------------------------------------- text sensitivity and the grid

def l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


def test_text_sensitivity_known_answers():
    p, s = 3, 4
    e = torch.eye(p + s)
    prompt_part = torch.stack([2.0 * e[i] for i in range(p)])  # |u_p - u_q| = 2 sqrt 2
    seed_part = torch.stack([0.5 * e[p + j] for j in range(s)])  # |v_s - v_t| = 0.5 sqrt 2
    both = prompt_part[:, None] + seed_part[None, :]
    out = text_sensitivity(both, l2)
    assert out["prompt_change"] == pytest.approx(2 * math.sqrt(2))
    assert out["seed_change"] == pytest.approx(0.5 * math.sqrt(2))
    assert out["text_sensitivity"] == pytest.approx(4.0)
    ignores_text = seed_part[None, :].expand(p, s, -1)
    assert text_sensitivity(ignores_text, l2)["text_sensitivity"] == 0.0


def test_text_sensitivity_from_vgg_features_computed_once_per_tile():
    from pokesprite.evaluation.evaluate import vgg_distances
    from pokesprite.losses import PerceptualLoss

    class TinyVGG(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 5, 3, stride=2)])
            self.calls = 0

        def forward(self, x, blocks):
            self.calls += 1
            out = []
            for conv in self.convs[:blocks]:
                x = conv(x).relu()
                out.append(x)
            return out

    perceptual = PerceptualLoss(vgg=TinyVGG(), size=16, blocks=2)
    tiles = torch.rand(3, 4, 3, 20, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pairwise = text_sensitivity(tiles, lambda a, b: perceptual.distance(a, b))
    perceptual.vgg.calls = 0
    once = text_sensitivity(*vgg_distances(perceptual, tiles, "cpu", batch_size=5))
    assert perceptual.vgg.calls == 3  # 12 tiles in batches of 5, not once per pair
    assert once == pytest.approx(pairwise, rel=1e-6)


def test_labelled_grid_size():
    imgs = np.zeros((3, 2, 40, 40, 3), dtype=np.uint8)
    grid = labelled_grid(imgs, ["a", "b" * 500, "c"], [0, 1], cell=50)
    assert grid.size[0] == 100 and grid.size[1] > 150
    with pytest.raises(ValueError, match="grid of 3 x 2"):
        labelled_grid(imgs, ["a"], [0, 1])
    imgs[1, 0, 10:30, 10:30] = 255  # a sharp square: shown at its own size, nothing filters it
    titled = labelled_grid(imgs, ["a", "b", "c"], [0, 1], cell=40, title="pokesprite: ddim, 10 steps")
    assert titled.size == (80, 20 + 20 + 3 * (34 + 40))  # title, column headers, 3 x (label, cell)
    top = 20 + 20 + 34 + 40 + 34  # the second row's sprites
    assert np.array_equal(np.asarray(titled)[top:top + 40, :40], imgs[1, 0])
    assert np.asarray(titled)[:20].min() < 128  # the title is drawn


def test_same_encoder_needs_equal_weights_and_tokens():
    from pokesprite.evaluation.evaluate import same_encoder

    class Encoder(torch.nn.Module):
        def __init__(self, max_tokens=4):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            torch.nn.init.constant_(self.proj.weight, 0.5)
            torch.nn.init.zeros_(self.proj.bias)
            self.max_tokens = max_tokens

        def tokenize(self, captions):
            ids = torch.tensor([[len(w) for w in c.split()][:self.max_tokens] + [0] * (self.max_tokens - len(c.split()))
                                for c in captions])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    captions = ["a red cat", "a very long blue fish here", ""]
    assert same_encoder(Encoder(), Encoder(), captions)
    trained = Encoder()
    with torch.no_grad():
        trained.proj.bias[0] += 1e-6
    assert not same_encoder(Encoder(), trained, captions)
    assert not same_encoder(Encoder(), Encoder(max_tokens=5), captions)  # other tokens


# ---------------------------------------------------------------- promotion

def test_promotion_rule():
    champ = {"kid": 0.05, "independent_r_precision": 0.30}
    assert beats({"kid": 0.04, "independent_r_precision": 0.30}, champ, alignment_tolerance=0.02)[0]
    assert beats({"kid": 0.04, "independent_r_precision": 0.29}, champ, alignment_tolerance=0.02)[0]  # within
    worse_kid, why = beats({"kid": 0.06, "independent_r_precision": 0.9}, champ, alignment_tolerance=0.02)
    assert not worse_kid and "not below" in why
    assert not beats(dict(champ), champ, alignment_tolerance=0.02)[0]  # a tie (the same model again) keeps it
    worse_text, why = beats({"kid": 0.01, "independent_r_precision": 0.20}, champ, alignment_tolerance=0.02)
    assert not worse_text and "text alignment" in why
    assert beats({"kid": 0.5, "independent_r_precision": 0.0}, None, alignment_tolerance=0.02)[0]
    assert beats({"kid": 0.5, "independent_r_precision": 0.0}, {}, alignment_tolerance=0.02)[0]  # unevaluated


def test_the_protocol_fingerprint_covers_what_the_numbers_depend_on_and_only_that():
    from dataclasses import replace
    from types import SimpleNamespace

    from pokesprite.config import EvaluateConfig
    from pokesprite.evaluation.evaluate import protocol
    from pokesprite.registry import protocol_mismatch

    cfg, captions = EvaluateConfig(sampler="ddim", steps=10), ["a red cat", "a blue fish"]
    base = protocol(cfg, captions, 898)
    assert base == protocol(cfg, list(captions), 898)  # a pure function of its inputs
    assert base["description"].startswith("2 held-out captions ") and "vs 898 real, ddim, 10 steps, seed 0" in \
        base["description"] and base["description"].endswith(f"[{base['fingerprint']}]")
    changed = [protocol(cfg, ["a red cat", "a green fish"], 898), protocol(cfg, captions[:1], 898),
               protocol(cfg, captions, 897)] + [
        protocol(replace(cfg, **kw), captions, 898) for kw in (
            {"sampler": "ddpm"}, {"sampler": ""}, {"steps": 50}, {"steps": 0}, {"seed": 1}, {"kid_subsets": 50},
            {"kid_subset_size": 50}, {"candidates": 16}, {"scorer_epochs": 100}, {"scorer_dim": 64},
            {"precision": "bf16"})]
    assert len({p["fingerprint"] for p in changed} | {base["fingerprint"]}) == len(changed) + 1
    for kw in ({"grid_seeds": 2}, {"batch_size": 7}, {"guidance_scales": (1.0, 3.0)}, {"alignment_tolerance": 0.5}):
        assert protocol(replace(cfg, **kw), captions, 898) == base, kw  # the grid, batching, the rule: not measures

    def version(**tags):
        return SimpleNamespace(version="3", tags=tags)

    assert protocol_mismatch(base, version(eval_protocol=base["fingerprint"])) is None
    assert protocol_mismatch(None, version()) is None  # neither recorded (versions of tests, older code)
    assert protocol_mismatch(base, version()).startswith("not compared: champion version 3 was evaluated under an "
                                                         "unrecorded protocol, this version under 2 held-out")
    other = protocol(replace(cfg, steps=50), captions, 898)
    why = protocol_mismatch(other, version(eval_protocol=base["fingerprint"], eval_protocol_desc=base["description"]))
    assert why.startswith(f"not compared: champion version 3 was evaluated under another protocol "
                          f"({base['description']}), this version under {other['description']}")


# ---------------------------------------------------------------- the few-shot GAN protocol (fid_all)

def test_cycled_rows_go_through_every_caption_in_pokedex_order_then_repeat():
    from pokesprite.evaluation.fid_all import cycled_rows

    rows = [{"number": n, "caption": f"c{n}", "split": s} for n, s in [(3, "val"), (1, "train"), (2, "test")]]
    drawn = cycled_rows(rows, 7)
    assert [r["caption"] for r in drawn] == ["c1", "c2", "c3", "c1", "c2", "c3", "c1"]
    assert [r["caption"] for r in cycled_rows(rows, 2)] == ["c1", "c2"]
    assert cycled_rows(rows, 0) == []
    with pytest.raises(ValueError, match="no captions"):
        cycled_rows([], 1)


def test_fid_all_reports_fid_and_kid_against_every_real_feature():
    from pokesprite.evaluation.fid_all import fid_all

    real = features(n=300)
    shift = torch.full((real.shape[1],), 0.5, dtype=torch.float64)
    out = fid_all(real + shift, real, subsets=5, subset_size=50, seed=0)
    assert set(out) == {"fid_all_generated_sprites", "fid_all", "kid_all", "kid_all_std"}
    assert out["fid_all_generated_sprites"] == 300
    assert out["fid_all"] == pytest.approx(float(shift.square().sum()), rel=1e-6)  # same covariance: |shift|^2
    assert (out["kid_all"], out["kid_all_std"]) == kernel_inception_distance(real + shift, real, subsets=5,
                                                                             subset_size=50, seed=0)


def test_evaluate_config_new_keys_default_off_and_name_the_key():
    from pokesprite.config import ConfigError, EvaluateConfig, from_dict

    cfg = EvaluateConfig()
    assert (cfg.fid_samples, cfg.copy_percentile, cfg.guidance_scales) == (0, 1.0, ())
    loaded = from_dict(EvaluateConfig, {"fid_samples": 5000, "guidance_scales": [1, 2, 3.5]}, "evaluate")
    assert loaded.fid_samples == 5000 and loaded.guidance_scales == (1.0, 2.0, 3.5)
    for bad, key in [({"fid_samples": -1}, "evaluate.fid_samples"),
                     ({"copy_percentile": 101}, "evaluate.copy_percentile"),
                     ({"guidance_scales": [1, 1]}, "evaluate.guidance_scales"),
                     ({"guidance_scales": [-2]}, "evaluate.guidance_scales"),
                     ({"guidance_scales": ["x"]}, "evaluate.guidance_scales"),
                     ({"fid_sample": 10}, "evaluate.fid_samples")]:  # a typo: "did you mean"
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(EvaluateConfig, bad, "evaluate")


def test_a_registry_error_is_not_read_as_no_champion(monkeypatch):
    """current_champion: a missing model is "no champion"; any other registry error (server down,
    locked database) is raised, or the next version would be promoted without a comparison."""
    import mlflow
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from pokesprite import registry

    class Client:
        def __init__(self, code):
            self.code = code

        def get_registered_model(self, name):
            raise mlflow.exceptions.MlflowException("registry says no", error_code=self.code)

    monkeypatch.setattr(registry.mlflow, "MlflowClient", lambda: Client(RESOURCE_DOES_NOT_EXIST))
    assert registry.current_champion("pokesprite") is None
    monkeypatch.setattr(registry.mlflow, "MlflowClient", lambda: Client(INTERNAL_ERROR))
    with pytest.raises(mlflow.exceptions.MlflowException, match="registry says no"):
        registry.current_champion("pokesprite")
