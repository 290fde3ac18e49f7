"""The stage-3 alignment model: metrics, the CLIP loss, head training, persistence, gradients, open_clip."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pokesprite.config import AlignmentConfig, load_params
from pokesprite.data.dataset import SpriteDataset
from pokesprite.evaluation.retrieval import mean_matched_cosine, r_precision, retrieval_accuracy
from pokesprite.contrastive import clip_loss
from pokesprite.models.alignment import AlignmentModel, OpenClipAlignment, load_alignment, similarity_matrix
from pokesprite.train.alignment import train_alignment

TINY = AlignmentConfig(dim=32, epochs=40, batch_size=8, lr=3e-3, image_size=64)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# ----------------------------------------------------------------------------- metrics and loss

def test_clip_loss_prefers_aligned_pairs():
    z = unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
    aligned = clip_loss(z, z, torch.tensor(10.0))
    shuffled = clip_loss(z, z.roll(1, dims=0), torch.tensor(10.0))
    assert aligned < shuffled


@pytest.mark.parametrize("n", [8, 40])
def test_retrieval_metrics_known_values(n):
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(n)
    assert retrieval_accuracy(eye) == 1.0 and r_precision(eye, generator=g) == 1.0
    assert mean_matched_cosine(eye) == 1.0
    worst = 1 - eye  # the own caption is always the least similar
    assert retrieval_accuracy(worst) == 0.0 and r_precision(worst, generator=g) == 0.0
    one_wrong = eye.clone()
    one_wrong[0, 1] = 2.0
    assert retrieval_accuracy(one_wrong) == pytest.approx((n - 1) / n)
    assert retrieval_accuracy(torch.zeros(n, n)) == 0.0  # ties are misses


def test_r_precision_draws_31_random_distractors():
    """Each image loses only to caption i+1: it wins when that one is not among the 31 of N-1 drawn."""
    n = 512
    sim = 0.5 * torch.eye(n)
    sim[torch.arange(n), (torch.arange(n) + 1) % n] = 1.0
    assert retrieval_accuracy(sim) == 0.0
    rp = r_precision(sim, candidates=32, generator=torch.Generator().manual_seed(0))
    assert rp == pytest.approx(1 - 31 / (n - 1), abs=0.05)


# ----------------------------------------------------------------------------- the model trained here

@pytest.fixture(scope="module")
def sprites(processed):
    """All 16 fixture sprites as one training set, their val split as the validation set."""
    train = SpriteDataset(processed, None)
    val = SpriteDataset(processed, "val")
    to_unit = lambda ds: ds.images.float().div(127.5).sub(1)
    return to_unit(train), train.captions, to_unit(val), val.captions


@pytest.fixture(scope="module")
def trained(sprites):
    train_images, train_captions, val_images, val_captions = sprites
    model, history = train_alignment(TINY, train_images, train_captions, val_images, val_captions, seed=0)
    return model, history


def test_training_raises_train_retrieval_well_above_chance(trained, sprites):
    model, history = trained
    images, captions = sprites[0], sprites[1]
    assert [h["epoch"] for h in history] == list(range(1, TINY.epochs + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"val_loss", "val_top1", "val_r_precision", "val_matched_cosine"} <= history[0].keys()
    sim = similarity_matrix(model, images, captions)
    assert sim.shape == (16, 16)
    assert retrieval_accuracy(sim) >= 0.5  # chance is 1/16
    assert mean_matched_cosine(sim) > sim.mean().item()


def test_save_load_round_trip(trained, sprites, tmp_path):
    model, history = trained
    path = tmp_path / "alignment.pt"
    model.save(path, TINY, history)
    loaded = load_alignment(AlignmentConfig(), trained=path)
    assert isinstance(loaded, AlignmentModel) and not loaded.training
    images, captions = sprites[0][:4], sprites[1][:4]
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(captions), loaded.encode_text(captions))
    assert torch.equal(model.logit_scale, loaded.logit_scale)
    assert load_alignment(AlignmentConfig(), trained=tmp_path / "absent.pt") is None


def test_a_checkpoint_of_another_architecture_is_refused(trained, tmp_path):
    """Checkpoints record the towers and heads (``ARCHITECTURE``); pokesprite builds only that one."""
    model, _ = trained
    path = tmp_path / "alignment.pt"
    model.save(path, TINY)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hparams"]["head_hidden"] = 64  # the 2-layer MLP head of earlier experiments
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="alignment.pt: an alignment model built with .*head_hidden': 64"):
        AlignmentModel.load(path)


def test_gradients_reach_images_but_weights_stay_frozen(trained, sprites):
    model, _ = trained
    images = sprites[0][:3].clone().requires_grad_(True)
    cosines = (model.encode_image(images) * model.encode_text(sprites[1][:3])).sum(-1)  # each image with its caption
    cosines.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert 0 < model.scale.item() <= 100


# ----------------------------------------------------------------------------- a pretrained open_clip model

def test_missing_open_clip_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no_such_clip.pt"
    with pytest.raises(FileNotFoundError, match="no_such_clip.pt"):
        load_alignment(AlignmentConfig(clip_checkpoint=str(missing)))


def tiny_clip(folder: Path, seed: int = 0):
    """A tiny randomly initialised open_clip CLIP saved as a checkpoint file: (path, model name, model)."""
    import open_clip

    name = "pokesprite-tiny-test-clip"
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return folder / "tiny_clip.pt", name, model


def test_open_clip_wrapper_with_a_tiny_random_model(tmp_path):
    """A tiny randomly initialised open_clip CLIP, saved as a checkpoint file, loads through the wrapper."""
    path, name, reference = tiny_clip(tmp_path)
    model = load_alignment(AlignmentConfig(clip_checkpoint=str(path), clip_model=name))
    assert isinstance(model, OpenClipAlignment)
    loaded = model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())  # the file's weights
    images = (torch.rand(2, 3, 215, 215) * 2 - 1).requires_grad_(True)
    zi, zt = model.encode_image(images), model.encode_text(["a red fire lizard", "a blue water turtle"])
    assert zi.shape == zt.shape == (2, 16)
    assert torch.allclose(zi.norm(dim=-1), torch.ones(2), atol=1e-5)
    (zi * zt).sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_alignment_stage_records_a_user_clip_checkpoint_and_stage_3_checks_it(tmp_path, monkeypatch):
    """With clip_checkpoint set the alignment stage trains nothing but still writes what DVC expects
    of it (its plot), records the file's hash in its output, and stage 3 refuses a file that changed."""
    from pokesprite.stages import Layout, load_stage_alignment, run_alignment

    monkeypatch.setenv("POKESPRITE_TRACKING", "off")
    path, name, _ = tiny_clip(tmp_path)
    params = load_params(Path(__file__).parent / "tiny_params.yaml")
    params = replace(params, finetune=replace(params.finetune, alignment=replace(
        params.finetune.alignment, clip_checkpoint=str(path), clip_model=name)))
    assert run_alignment(params, root=tmp_path)["trained"] == 0
    assert (tmp_path / "plots" / "alignment.csv").read_text() == "epoch,train_loss,val_loss\n"
    record = json.loads((tmp_path / "outputs" / "alignment" / "clip_checkpoint.json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and record["clip_model"] == name
    assert isinstance(load_stage_alignment(params, Layout(tmp_path), "cpu"), OpenClipAlignment)

    tiny_clip(tmp_path, seed=1)  # new weights under the same path
    with pytest.raises(ValueError, match="not the file the alignment stage recorded.*dvc repro --force alignment"):
        load_stage_alignment(params, Layout(tmp_path), "cpu")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="tiny_clip.pt': no such file"):
        run_alignment(params, root=tmp_path)


def test_text_features_are_pooled_over_real_tokens_only(trained):
    """Mean pooling over the attention mask (as sentence-transformers pools MiniLM): a caption's
    features do not depend on how much padding a longer caption in its batch adds."""
    model, _ = trained
    short = "a small fire lizard"
    alone = model.text_features([short])
    beside_long = model.text_features([short, "a huge " + "very " * 40 + "long blue water turtle"])[:1]
    torch.testing.assert_close(alone, beside_long, atol=1e-4, rtol=0)


def test_the_temperature_is_capped_at_100_as_in_clip(trained):
    """scale = exp(logit_scale) clamped at 100 (CLIP): a run whose logit_scale drifts high cannot make
    the contrastive logits (and clip_loss's -1e4 margin for left-out rows) blow up."""
    import math

    model, _ = trained
    saved = model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
        assert model.scale.item() == pytest.approx(100.0)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(50.0))
        assert model.scale.item() == pytest.approx(50.0)
    finally:
        with torch.no_grad():
            model.logit_scale.copy_(saved)
