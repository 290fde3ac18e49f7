import dataclasses

import pytest
import yaml

from pokesprite.config import ConfigError, Params, load_params, to_dict

from conftest import ROOT, TESTS


def write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def base():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_and_tiny_profiles_load():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.split == (0.8, 0.15, 0.05)
    assert p.diffusion.schedule.timesteps == 1000
    assert load_params(TESTS / "tiny_params.yaml").vae.model.channels == (8, 8, 16, 16)


def test_round_trip_through_dict(tmp_path):
    p = load_params(ROOT / "params.yaml")
    assert load_params(write(tmp_path, to_dict(p))) == p


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    d = base()
    d["vae"]["model"]["chanels"] = d["vae"]["model"].pop("channels")
    with pytest.raises(ConfigError, match=r"unknown key vae\.model\.chanels; did you mean vae\.model\.channels\?"):
        load_params(write(tmp_path, d))


def test_unknown_section_is_named(tmp_path):
    d = base()
    d["difusion"] = d.pop("diffusion")
    with pytest.raises(ConfigError, match="difusion"):
        load_params(write(tmp_path, d))


@pytest.mark.parametrize("path,value,message", [
    (("diffusion", "train", "epochs"), "ten", r"diffusion\.train\.epochs must be an integer"),
    (("diffusion", "train", "epochs"), 1.5, r"diffusion\.train\.epochs must be an integer"),
    (("vae", "train", "lr"), "fast", r"vae\.train\.lr must be a number"),
    (("data", "split"), [0.5, 0.5], r"data\.split must have 3 entries"),
    (("data", "split"), [0.5, 0.4, 0.4], r"data\.split must be three non-negative fractions summing to 1"),
    (("diffusion", "unet", "attention"), [True], r"one entry per channels entry"),
])
def test_wrong_values_are_named(tmp_path, path, value, message):
    d = base()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, d))


def test_missing_section_is_named(tmp_path):
    d = base()
    del d["text"]
    with pytest.raises(ConfigError, match="missing key text"):
        load_params(write(tmp_path, d))


def test_configs_are_frozen():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.vae.train.epochs = 3


def test_gpu_profile_is_valid_and_covers_the_seeds_schedule():
    from pathlib import Path

    p = load_params(Path(__file__).parents[1] / "profiles" / "gpu.yaml")
    # At least the seed's 80 / 500 / 80 epochs, as upper bounds under each stage's time budget.
    assert p.vae.train.epochs >= 80 and p.diffusion.train.epochs >= 500 and p.finetune.train.epochs >= 80
    assert min(p.vae.train.max_minutes, p.diffusion.train.max_minutes, p.finetune.train.max_minutes) > 0
    assert (p.vae.train.warmup_frac, p.diffusion.train.grad_clip, p.finetune.train.lr) == (0.1, 0.7, 5e-5)
    assert p.vae.loss.kl_weight == 0.1 and p.vae.loss.kl_anneal_epochs == 20 and p.vae.loss.free_bits == 0.5
