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


def test_exponents_without_a_dot_are_numbers_as_in_dvc(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as text; DVC (YAML 1.2) as a number: params.yaml means the same to both."""
    from pokesprite.config import _StrictLoader

    text = (ROOT / "params.yaml").read_text()
    assert text.index("    lr: 5.0e-4   ") < text.index("\ndiffusion:")  # vae.train.lr
    (tmp_path / "params.yaml").write_text(text.replace("    lr: 5.0e-4   ", "    lr: 2e-4     ", 1))
    assert load_params(tmp_path / "params.yaml").vae.train.lr == 2e-4
    assert yaml.load("a: 1E+2\nb: -3e0\nc: 1e3x\nd: 7\ne: 1.5", Loader=_StrictLoader) == \
        {"a": 100.0, "b": -3.0, "c": "1e3x", "d": 7, "e": 1.5}


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
    (("vae", "train", "lr"), "fast", r"vae\.train\.lr must be a finite number"),
    (("vae", "train", "lr"), 0, r"vae\.train\.lr must be > 0, got 0\.0"),
    (("diffusion", "train", "lr"), -1e-4, r"diffusion\.train\.lr must be > 0, got -0\.0001"),
    (("vae", "train", "epochs"), 0, r"vae\.train\.epochs must be at least 1, got 0"),
    (("finetune", "train", "batch_size"), 0, r"finetune\.train\.batch_size must be at least 1, got 0"),
    (("diffusion", "sample", "steps"), 5000,
     r"diffusion\.sample\.steps must be at most schedule\.timesteps \(1000\), got 5000"),
    (("diffusion", "schedule", "timesteps"), 0, r"diffusion\.schedule\.timesteps must be at least 2, got 0"),
    (("diffusion", "sample", "guidance_scale"), -1, r"diffusion\.sample\.guidance_scale must be >= 0"),
    (("diffusion", "sample", "guidance_scale"), float("nan"), r"guidance_scale must be a finite number"),
    (("data", "image_size"), 128, r"vae\.model\.image_size must be data\.image_size \(128\)"),
    (("finetune", "t_min"), 900, r"finetune\.t_min must be >= 0 and at most t_max \(800\), got 900"),
    (("finetune", "t_max"), 1000, r"finetune\.t_max must be at most diffusion\.schedule\.timesteps - 1 \(999\)"),
    (("text", "max_tokens"), 0, r"text\.max_tokens must be in 1\.\.512, got 0"),
    (("prefect", "retries"), -3, r"prefect\.retries must be >= 0, got -3"),
    (("data", "split"), [0.5, 0.5], r"data\.split must have 3 entries"),
    (("data", "split"), [0.5, 0.4, 0.4], r"data\.split must be three positive fractions \(train, val, test\) summing"),
    (("data", "split"), [0.95, 0.0, 0.05], r"data\.split must be three positive fractions"),
    (("data", "augment", "hflip_prob"), 2, r"data\.augment\.hflip_prob must be a probability in \[0, 1\], got 2"),
    (("diffusion", "unet", "groups"), 0, r"diffusion\.unet\.groups must be at least 1, got 0"),
    (("diffusion", "unet", "heads"), 0, r"diffusion\.unet\.heads must be at least 1, got 0"),
    (("vae", "model", "groups"), 0, r"vae\.model\.groups must be at least 1, got 0"),
    (("vae", "model", "channels"), [8, -8, 16, 16], r"vae\.model\.channels must be positive"),
    (("vae", "loss", "kl_weight"), -1, r"vae\.loss\.kl_weight must be >= 0"),
    (("seed",), -1, r"seed must be >= 0, got -1"),
    (("mlflow", "registered_model"), "team/pokesprite", r"mlflow\.registered_model must be a name without '/'"),
    (("mlflow", "registered_model"), "pat's", r"mlflow\.registered_model must be a name without '/', ':'"),
    (("finetune", "train", "compile"), True,
     r"unknown key finetune\.train\.compile: compile is a setting of vae\.train and diffusion\.train only"),
    (("mlflow", "experiment"), "", r"mlflow\.experiment must be a name, got ''"),
    (("finetune", "train_layers"), 99, r"finetune\.train_layers must be at most 6 \(the bundled text encoder's"),
    (("diffusion", "unet", "attention"), [True], r"one entry per channels entry"),
    (("diffusion", "cond_drop_prob"), 1.0, r"diffusion\.cond_drop_prob must be in \[0, 1\), got 1\.0"),
    (("diffusion", "train", "max_minutes"), -5,
     r"diffusion\.train\.max_minutes must be >= 0 \(0 = no budget\), got -5"),
])
def test_wrong_values_are_named(tmp_path, path, value, message):
    d = base()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, d))


def test_every_problem_is_reported_at_once(tmp_path):
    d = base()
    d["vae"]["train"]["epochz"] = 3
    d["diffusion"]["train"]["lr"] = "fast"
    d["prefect"]["retries"] = "twice"
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, d))
    first, *lines = str(err.value).splitlines()
    assert first.endswith("params.yaml: 3 problems:") and len(lines) == 3
    assert {line.split()[0] for line in lines} == {"unknown", "diffusion.train.lr", "prefect.retries"}
    assert any("vae.train.epochz; did you mean vae.train.epochs?" in line for line in lines)


@pytest.mark.parametrize("text,message", [
    ("seed: 0\nseed: 1\n", r"line 2, column 1: key 'seed' given twice \(first at line 1\)"),
    ("seed: 0\ndata:\n\tbackground: [1, 2, 3]\n", r"line 3, column 1: .*YAML does not allow tabs"),
    ("seed: [0\n", r"not valid YAML"),
])
def test_yaml_mistakes_are_named(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "params.yaml")


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


def test_params_yaml_states_every_key_the_code_reads():
    """A default that lives only in pokesprite/config.py is invisible to `dvc params diff` and to a
    reader of params.yaml: every field of every section must be written there, with its value."""
    import typing

    def unstated(cls, node, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not isinstance(node, dict) or f.name not in node:
                yield prefix + f.name
            elif dataclasses.is_dataclass(hints[f.name]):
                yield from unstated(hints[f.name], node[f.name], f"{prefix}{f.name}.")

    assert list(unstated(Params, yaml.safe_load((ROOT / "params.yaml").read_text()))) == []
    trimmed = yaml.safe_load((ROOT / "params.yaml").read_text())
    del trimmed["vae"]["train"]["max_minutes"]
    assert list(unstated(Params, trimmed)) == ["vae.train.max_minutes"]  # the check finds one missing key
