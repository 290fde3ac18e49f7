"""Tiny overfit runs of the three trainers, and the combined model they produce."""
import dataclasses

import numpy as np
import pytest
import torch

from pokesprite.config import SampleConfig
from pokesprite.pipeline import SpritePipeline
from pokesprite.checkpoints import load_checkpoint
from pokesprite.train.diffusion import train_diffusion
from pokesprite.train.finetune import train_finetune
from pokesprite.models.vae import VAE
from pokesprite.train.vae import train_vae
from pokesprite.tracking import Tracker


def with_train(stage_cfg, **changes):
    return dataclasses.replace(stage_cfg, train=dataclasses.replace(stage_cfg.train, **changes))


@pytest.fixture(scope="module")
def vae_run(processed, tiny_params, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = with_train(tiny_params.vae, epochs=20, max_train_items=4, batch_size=4, lr=3e-3, sample_every=0)
    from pokesprite.tracking import Tracker

    tracker = Tracker()
    metrics = train_vae(cfg, tiny_params.data, data_dir=processed, out_dir=out, seed=0, tracker=tracker)
    return out, metrics, tracker


@pytest.fixture(scope="module")
def diffusion_run(processed, tiny_params, vae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion")
    cfg = with_train(tiny_params.diffusion, epochs=30, max_train_items=4, batch_size=4, lr=6e-3, sample_every=0)
    from pokesprite.tracking import Tracker

    tracker = Tracker()
    metrics = train_diffusion(cfg, tiny_params.text, data_dir=processed,
                              vae_checkpoint=vae_run[0] / "best.pt", out_dir=out, seed=0, tracker=tracker)
    return out, metrics, tracker


def test_vae_overfits_and_writes_a_self_describing_checkpoint(vae_run, tiny_params):
    out, metrics, tracker = vae_run
    l1 = [v for _, v in tracker.history["train_l1"]]
    assert l1[-1] < 0.7 * l1[0], l1
    # the KL weight rises linearly from 0 in epoch 1 to kl_weight at epoch kl_anneal_epochs + 1
    w, anneal = tiny_params.vae.loss.kl_weight, tiny_params.vae.loss.kl_anneal_epochs
    kl_weights = [v for _, v in tracker.history["train_kl_weight"]]
    assert kl_weights[:anneal + 2] == pytest.approx([w * min(1, e / anneal) for e in range(anneal + 2)])
    ckpt = load_checkpoint(out / "best.pt", "vae")
    assert ckpt["config"]["channels"] == list(tiny_params.vae.model.channels)
    vae = VAE.from_checkpoint(out / "best.pt")  # rebuilt from the checkpoint alone
    assert vae.latent_scale == pytest.approx(metrics["latent_scale"]) and vae.latent_scale > 0 and not vae.training
    assert (out / "reconstructions.png").is_file() and (out / "last.pt").is_file()


def test_latent_scale_gives_unit_variance_to_the_latents_stage_2_samples(vae_run, processed):
    """The scale is 1 / the std of z ~ q(z | x), which the diffusion stage trains on (posterior
    samples, not means): sampled and scaled, the training split's latents have std 1."""
    from pokesprite.data.dataset import SpriteDataset, to_unit_range
    from pokesprite.models.vae import sample_posterior

    vae = VAE.from_checkpoint(vae_run[0] / "best.pt")
    with torch.no_grad():
        mean, logvar = vae.encode(to_unit_range(SpriteDataset(processed, "train").images))
        g = torch.Generator().manual_seed(0)
        z = torch.cat([sample_posterior(mean, logvar, g) for _ in range(20)]) * vae.latent_scale
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert float(mean.std()) * vae.latent_scale < 0.99  # the means alone spread less


def test_wrong_checkpoint_kind_is_refused(vae_run):
    with pytest.raises(ValueError, match="expected a diffusion checkpoint, found 'vae'"):
        load_checkpoint(vae_run[0] / "best.pt", "diffusion")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(vae_run[0] / "nope.pt", "vae")


def test_diffusion_loss_falls(diffusion_run):
    out, metrics, tracker = diffusion_run
    loss = [v for _, v in tracker.history["train_loss"]]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:3]), loss
    assert metrics["best_val_loss"] == min(v for _, v in tracker.history["val_loss"])
    assert (out / "samples.png").is_file()



def test_diffusion_trains_in_bf16_with_sparse_host_reads(processed, tiny_params, vae_run, tmp_path):
    """The GPU settings on the CPU: bf16 autocast and reads every 7 steps; weights stay fp32, loss falls."""
    cfg = with_train(tiny_params.diffusion, epochs=30, max_train_items=4, batch_size=4, lr=6e-3, sample_every=0,
                     precision="bf16", log_every=7)
    tracker = Tracker()
    train_diffusion(cfg, tiny_params.text, data_dir=processed,
                    vae_checkpoint=vae_run[0] / "best.pt", out_dir=tmp_path, seed=0, tracker=tracker)
    loss = [v for _, v in tracker.history["train_loss"]]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:3]), loss
    unet = SpritePipeline.from_checkpoints(vae_run[0] / "best.pt", tmp_path / "best.pt").unet
    assert all(p.dtype == torch.float32 for p in unet.parameters())

@pytest.fixture(scope="module")
def alignment(processed, tiny_params):
    from pokesprite.data.dataset import SpriteDataset
    from pokesprite.train.alignment import train_alignment

    sets = [SpriteDataset(processed, split) for split in ("train", "val")]
    images = [torch.stack([ds[i][0] for i in range(len(ds))]) for ds in sets]
    model, _ = train_alignment(tiny_params.finetune.alignment, images[0], sets[0].captions, images[1],
                               sets[1].captions, seed=0)
    return model


def test_finetune_trains_only_the_text_encoder_and_saves_the_model(processed, tiny_params, vae_run,
                                                                   diffusion_run, alignment, tmp_path):
    cfg = with_train(tiny_params.finetune, epochs=2, max_train_items=8, lr=1e-3)
    tracker = Tracker()
    metrics = train_finetune(cfg, data_dir=processed, vae_checkpoint=vae_run[0] / "best.pt",
                             diffusion_checkpoint=diffusion_run[0] / "best.pt", alignment=alignment,
                             out_dir=tmp_path, seed=0, tracker=tracker)
    assert [s for s, _ in tracker.history["val_retrieval_top1"]] == [0, 1, 2]  # epoch 0 = before fine-tuning
    # the best of the encoder before fine-tuning (epoch 0) and each epoch's is the one saved
    val = [v for _, v in tracker.history["val_loss"]]
    assert metrics["best_epoch"] == val.index(min(val)) and metrics["val_loss_after"] == pytest.approx(min(val))
    assert {"train_clip", "train_consistency"} <= set(tracker.history)
    pipe = SpritePipeline.load(tmp_path / "model")
    diff = load_checkpoint(diffusion_run[0] / "best.pt", "diffusion")
    for k, v in diff["unet"].items():  # the U-Net is frozen in stage 3
        assert torch.equal(pipe.unet.state_dict()[k], v)
    before = SpritePipeline.from_checkpoints(vae_run[0] / "best.pt", diffusion_run[0] / "best.pt").text.state_dict()
    changed = [k for k, v in pipe.text.state_dict().items() if not torch.equal(v, before[k])]
    assert bool(changed) == (metrics["best_epoch"] > 0)
    images = pipe(["a small green creature with a bulb on its back", "a blue turtle"], seed=0, num_steps=3)
    assert images.shape == (2, 215, 215, 3) and images.dtype == np.uint8
    # The checkpoints hold the trained layers only; the frozen ones are stored once, in model/.
    top = f".layer.{pipe.text.transformer.config.num_hidden_layers - 1}."  # finetune.train_layers: 1
    trained = {k for k, _ in pipe.text.named_parameters() if k.startswith("proj.") or top in k}
    frozen = {k for k, _ in pipe.text.named_parameters()} - trained
    assert trained and frozen
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / name, "finetune")
        held = set(ckpt["text_state"] if name == "best.pt" else ckpt["train"]["model"])
        assert trained <= held and not held & frozen, name


def test_pipeline_round_trip_and_seeds(processed, tiny_params, vae_run, diffusion_run, tmp_path):
    pipe = SpritePipeline.from_checkpoints(vae_run[0] / "best.pt", diffusion_run[0] / "best.pt")
    pipe.sample = SampleConfig(sampler="ddpm", steps=4, guidance_scale=2.0)
    prompts = ["a red fire lizard", "a yellow electric mouse"]
    a = pipe(prompts, seed=7)
    assert np.array_equal(a, pipe(prompts, seed=7))
    assert not np.array_equal(a, pipe(prompts, seed=8))
    loaded = SpritePipeline.load(pipe.save(tmp_path / "model"))
    assert loaded.sample == pipe.sample and loaded.latent_scale == pipe.vae.latent_scale == vae_run[1]["latent_scale"]
    assert np.array_equal(a, loaded(prompts, seed=7))
    ddim = pipe(prompts, seed=7, sampler="ddim", guidance_scale=1.0)
    assert ddim.shape == a.shape and not np.array_equal(ddim, a)


def test_vae_resume_equals_the_straight_run(processed, tiny_params, tmp_path):
    """2 epochs straight == 1 epoch + resume + 1 (augmentation, perceptual loss, KL annealing, and the
    patch discriminator, which joins in epoch 2 and whose weights and optimiser come from the checkpoint)."""
    from pokesprite.config import DiscriminatorConfig

    cfg = with_train(tiny_params.vae, epochs=2, max_train_items=8, sample_every=0, checkpoint_every=1)
    cfg = dataclasses.replace(cfg, discriminator=DiscriminatorConfig(weight=0.5, start_epoch=2, channels=8, layers=2))
    train_vae(cfg, tiny_params.data, data_dir=processed, out_dir=tmp_path / "a", seed=0)
    train_vae(cfg, tiny_params.data, data_dir=processed, out_dir=tmp_path / "b", seed=5,
              resume=tmp_path / "a" / "epoch_0001.pt")
    a, b = (load_checkpoint(tmp_path / d / "last.pt", "vae") for d in "ab")
    assert a["history"] == b["history"]
    assert "train_d_loss" not in a["history"][0] and a["history"][1]["train_d_loss"] > 0
    assert a["history"][1]["train_adaptive_weight"] > 0
    for k, v in a["train"]["model"].items():
        assert torch.equal(v, b["train"]["model"][k]), k
    for k, v in a["train"]["extra"]["disc"].items():
        assert torch.equal(v, b["train"]["extra"]["disc"][k]), k


def test_diffusion_resume_equals_the_straight_run(processed, tiny_params, vae_run, tmp_path):
    """The same for stage 2, whose state also holds the EMA and the noise generator."""
    cfg = with_train(tiny_params.diffusion, epochs=2, max_train_items=8, sample_every=0, checkpoint_every=1)
    kw = dict(data_dir=processed, vae_checkpoint=vae_run[0] / "best.pt")
    train_diffusion(cfg, tiny_params.text, out_dir=tmp_path / "a", seed=0, **kw)
    train_diffusion(cfg, tiny_params.text, out_dir=tmp_path / "b", seed=5,
                    resume=tmp_path / "a" / "epoch_0001.pt", **kw)
    a, b = (load_checkpoint(tmp_path / d / "last.pt", "diffusion") for d in "ab")
    assert a["history"] == b["history"]
    for part in ("model", "ema"):
        wa, wb = (c["train"]["model"] if part == "model" else c["train"]["ema"]["shadow"] for c in (a, b))
        for k, v in wa.items():
            assert torch.equal(v, wb[k]), k


def test_diffusion_training_and_validation_use_the_configs_objective(processed, tiny_params, vae_run, tmp_path,
                                                                    monkeypatch):
    """diffusion.loss, prediction, min_snr_gamma and latent_clamp reach every training step and the
    validation loss (which must be the training objective to be comparable)."""
    from pokesprite.train import diffusion as stage

    calls = {"train": [], "val": [], "clamp": []}
    real_loss, real_latents = stage.denoising_loss, stage.sample_latents

    def spy_loss(*args, **kwargs):
        calls["train" if "shard" in kwargs else "val"].append(
            {k: kwargs.get(k) for k in ("kind", "prediction", "min_snr_gamma")})
        return real_loss(*args, **kwargs)

    def spy_latents(mean, logvar, scale, generator=None, clamp=0.0):
        calls["clamp"].append(clamp)
        return real_latents(mean, logvar, scale, generator, clamp)

    monkeypatch.setattr(stage, "denoising_loss", spy_loss)
    monkeypatch.setattr(stage, "sample_latents", spy_latents)
    cfg = dataclasses.replace(with_train(tiny_params.diffusion, epochs=1, max_train_items=4, batch_size=4,
                                         sample_every=0),
                              loss="mse", prediction="v", min_snr_gamma=5.0, latent_clamp=2.5)
    train_diffusion(cfg, tiny_params.text, data_dir=processed, vae_checkpoint=vae_run[0] / "best.pt",
                    out_dir=tmp_path, seed=0)
    assert calls["train"] and calls["val"] and calls["clamp"]
    assert all(c == {"kind": "mse", "prediction": "v", "min_snr_gamma": 5.0} for c in calls["train"] + calls["val"])
    assert set(calls["clamp"]) == {2.5}


def test_vae_augments_training_batches_only(processed, tiny_params, tmp_path, monkeypatch):
    """Flip, rotation and jitter are for training: every augmented batch is a training batch, and
    validation (what picks best.pt) sees the validation sprites as they are."""
    from pokesprite.train import vae as stage

    seen = []
    real = stage.augment_batch

    def spy(images, *args):
        seen.append(len(images))
        return real(images, *args)

    monkeypatch.setattr(stage, "augment_batch", spy)
    cfg = with_train(tiny_params.vae, epochs=2, max_train_items=8, batch_size=4, sample_every=0)
    train_vae(cfg, tiny_params.data, data_dir=processed, out_dir=tmp_path, seed=0)
    assert seen == [4] * 4  # 2 epochs x 2 batches of 4, nothing else
