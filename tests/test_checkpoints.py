"""pokesprite.checkpoints: atomic writes, data-only reads, kinds checked."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pokesprite.checkpoints import atomic_save, load_checkpoint
from pokesprite.files import atomic_folder, write_text_atomic
from pokesprite.train.loop import fit, rng_state, set_rng_state


def test_round_trip_and_kind_check(tmp_path):
    atomic_save({"kind": "vae", "w": torch.arange(3.0), "history": [{"epoch": 1, "loss": 0.5}]}, tmp_path / "a.pt")
    ckpt = load_checkpoint(tmp_path / "a.pt", "vae")
    assert torch.equal(ckpt["w"], torch.arange(3.0)) and ckpt["history"] == [{"epoch": 1, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind
    with pytest.raises(ValueError, match="expected a diffusion checkpoint, found 'vae'"):
        load_checkpoint(tmp_path / "a.pt", "diffusion")
    with pytest.raises(FileNotFoundError, match="train the vae stage first"):
        load_checkpoint(tmp_path / "missing.pt", "vae")


def test_equal_checkpoints_are_equal_files_however_their_objects_were_made(tmp_path):
    """As a resumed run saves them: a history read back from a file (its strings not the code's
    literals) next to values the code built; and a module's state_dict stays an OrderedDict with its
    _metadata."""
    model = torch.nn.Linear(2, 3)
    built = {"kind": "vae", "epoch": 2, "history": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}],
             "model": model.state_dict(), "shape": (1, 2)}
    atomic_save(built, tmp_path / "built.pt")
    read_back = torch.load(tmp_path / "built.pt", weights_only=True)
    read_back["history"][1] = {"".join(["ep", "och"]): 2, "loss": 0.25}  # a string made at run time
    read_back["epoch"] = 2
    atomic_save(read_back, tmp_path / "resumed.pt")
    assert (tmp_path / "resumed.pt").read_bytes() == (tmp_path / "built.pt").read_bytes()
    state = load_checkpoint(tmp_path / "resumed.pt", "vae")["model"]
    assert type(state) is type(model.state_dict()) and state._metadata == model.state_dict()._metadata
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    atomic_save({"kind": "vae", "v": 1}, tmp_path / "a.pt")
    with pytest.raises(Exception):
        atomic_save({"kind": "vae", "f": lambda: 0}, tmp_path / "a.pt")  # lambdas cannot be pickled
    assert load_checkpoint(tmp_path / "a.pt", "vae")["v"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_training_checkpoints_are_plain_data(tmp_path):
    """A trainer's last.pt (weights, optimiser, RNG states, history) loads with weights_only=True, and
    the saved numpy RNG state (stored as a tensor) restores exactly."""
    from tests.test_loop import cfg, toy_stage

    fit(toy_stage(), cfg(epochs=2), out_dir=tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["kind"] == "toy"  # raises if not plain data
    np.random.seed(7)
    expected = np.random.get_state()
    saved = rng_state(torch.Generator())
    np.random.rand(5)
    set_rng_state(saved, torch.Generator())
    after = np.random.get_state()
    assert np.array_equal(after[1], expected[1]) and after[2:] == expected[2:]


class Payload:
    """What a crafted checkpoint carries: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "payload": Payload(marker)}, path)
    return path


def test_no_entry_point_unpickles_code(tmp_path):
    """A crafted payload in every file pokesprite loads is refused, naming the file, before it runs."""
    from pokesprite.evaluation.reference import FEATURES_FILE, load_reference
    from pokesprite.evaluation.scorer import IndependentScorer
    from pokesprite.models.alignment import AlignmentModel
    from pokesprite.models.vae import VAE
    from pokesprite.pipeline import SpritePipeline, load_diffusion_checkpoint

    marker = tmp_path / "ran"
    cases = {
        "VAE.from_checkpoint": lambda p: VAE.from_checkpoint(plant(p, marker, kind="vae")),
        "load_diffusion_checkpoint": lambda p: load_diffusion_checkpoint(plant(p, marker, kind="diffusion")),
        "SpritePipeline.load": lambda p: SpritePipeline.load(plant(p / "pipeline.pt", marker, kind="pipeline").parent),
        "IndependentScorer.load": lambda p: IndependentScorer.load(plant(p, marker, kind="independent_scorer")),
        "AlignmentModel.load": lambda p: AlignmentModel.load(plant(p, marker, kind="alignment")),
        "load_reference": lambda p: load_reference(plant(p / FEATURES_FILE, marker, kind="reference").parent),
    }
    for name, load in cases.items():
        path = tmp_path / name / "file.pt"
        with pytest.raises(ValueError, match="refused: it holds more than tensors") as err:
            load(path)
        assert str(tmp_path / name) in str(err.value), name
        assert not marker.exists(), f"{name} ran the payload"


@pytest.mark.parametrize("flag", ["--resume", "--vae-checkpoint", "--diffusion-checkpoint"])
def test_cli_refuses_a_payload_before_any_work(tmp_path, flag, capsys, monkeypatch):
    from pokesprite.cli import main

    monkeypatch.setenv("POKESPRITE_TRACKING", "off")  # what --no-mlflow sets in this process: undone after

    marker = tmp_path / "ran"
    path = plant(tmp_path / "evil.pt", marker, kind="diffusion" if flag != "--vae-checkpoint" else "vae")
    stage = {"--resume": "diffusion", "--vae-checkpoint": "diffusion", "--diffusion-checkpoint": "finetune"}[flag]
    assert main(["train", "--stage", stage, flag, str(path), "--root", str(tmp_path), "--no-mlflow"]) == 2
    assert not marker.exists()
    assert f"{path}: refused" in capsys.readouterr().err


def test_cli_refuses_a_wrong_device_or_a_weights_only_resume_before_any_stage(tmp_path, capsys, monkeypatch):
    from pokesprite.cli import main

    monkeypatch.setenv("POKESPRITE_TRACKING", "off")
    assert main(["train", "--stage", "2", "--device", "banana", "--root", str(tmp_path), "--no-mlflow"]) == 2
    assert "error: device 'banana' (--device or $POKESPRITE_DEVICE): " in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()  # preprocess, which does not use the device, did not run either
    best = tmp_path / "best.pt"
    atomic_save({"kind": "diffusion", "unet": {}, "text_proj": {}}, best)
    assert main(["train", "--resume", str(best), "--root", str(tmp_path), "--no-mlflow"]) == 2
    assert f"{best}: holds inference weights only; resume from last.pt" in capsys.readouterr().err


def test_resume_differences_name_what_a_resume_would_ignore(tiny_params):
    import dataclasses

    from pokesprite.config import to_dict
    from pokesprite.stages import resume_differences

    stored = {**to_dict(tiny_params.vae), "text": to_dict(tiny_params.text)}
    assert resume_differences(stored, "vae", tiny_params) == []
    train = dataclasses.replace(tiny_params.vae.train, epochs=8, lr=5e-3, max_minutes=3.0, save_every=5)
    changed = dataclasses.replace(tiny_params, vae=dataclasses.replace(tiny_params.vae, train=train),
                                  text=dataclasses.replace(tiny_params.text, max_tokens=16))
    assert resume_differences(stored, "vae", changed) == [  # a time budget and the checkpoints' rhythm may change
        "text.max_tokens: 32 in the checkpoint, 16 now",
        "vae.train.epochs: 2 in the checkpoint, 8 now",
        "vae.train.lr: 0.001 in the checkpoint, 0.005 now"]
    assert resume_differences(None, "vae", tiny_params) == ["the checkpoint records no vae config"]


def test_cli_refuses_a_resume_under_other_settings_before_any_stage(tmp_path, tiny_params, capsys, monkeypatch):
    import yaml

    from pokesprite.cli import main
    from pokesprite.config import to_dict

    monkeypatch.setenv("POKESPRITE_TRACKING", "off")
    last = tmp_path / "last.pt"
    atomic_save({"kind": "vae", "stage_config": {**to_dict(tiny_params.vae), "text": to_dict(tiny_params.text)},
                 "train": {"epoch": 1}}, last)
    raw = to_dict(tiny_params)
    raw["vae"]["train"]["epochs"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(tmp_path / "params.yaml"), "--resume", str(last), "--root", str(tmp_path),
                 "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert f"{last} was trained under other vae settings than {tmp_path / 'params.yaml'}:" in err
    assert "vae.train.epochs: 2 in the checkpoint, 6 now" in err and "train afresh without --resume" in err
    assert not (tmp_path / "outputs").exists()  # refused before preprocess


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_named():
    from pokesprite.stages import resolve_device

    with pytest.raises(ValueError, match="device 'cuda:1' .*: this machine has no CUDA device; use cpu or auto"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_truncated_and_foreign_files_are_named(tmp_path):
    atomic_save({"kind": "vae", "w": torch.zeros(1000)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "text.pt", "empty.pt"):
        with pytest.raises(ValueError, match=f"{name}: not a readable checkpoint"):
            load_checkpoint(tmp_path / name, "vae")


def test_saved_files_get_the_users_permissions_and_leave_no_temporary(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_save({"kind": "vae"}, tmp_path / "a.pt")
        write_text_atomic(tmp_path / "m.json", "{}\n")
        write_text_atomic(tmp_path / "m.json", "{\"\u00e9\": 1}\n")  # replaced, UTF-8 whatever the locale
        with pytest.raises(TypeError):
            write_text_atomic(tmp_path / "m.json", None)  # a failed write keeps the old file, leaves no temporary
    finally:
        os.umask(old)
    for name in ("a.pt", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.json").read_bytes() == "{\"\u00e9\": 1}\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "m.json"]


def test_a_file_reaches_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """fsync of the complete temporary file, then the rename: a power cut leaves the old file or the new one."""
    import os

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or replace(a, b))
    write_text_atomic(tmp_path / "m.json", "{}\n")
    assert events == [("fsync", 3), ("replace", "m.json")]


def test_atomic_folder_replaces_the_old_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("one")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_folder(target) as staging:
            (staging / "b.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # the old folder, untouched
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # nothing of the old one is left
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or old folder left beside it


def test_atomic_folder_swaps_in_one_step_or_puts_the_old_folder_back(tmp_path, monkeypatch):
    from pokesprite import files

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    swapped = files.exchange(a, b)  # Linux (glibc >= 2.28, a file system that can): in one step
    assert ((a / "x").read_text(), (b / "x").read_text()) == (("b", "a") if swapped else ("a", "b"))

    target = tmp_path / "model"
    with files.atomic_folder(target) as staging:
        (staging / "old.txt").write_text("old")
    monkeypatch.setattr(files, "exchange", lambda a, b: False)  # a system without it: two renames
    real_rename, calls = Path.rename, []

    def rename(self, to):  # the second rename (staging -> model) fails, as a full disk might
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError("no space left")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="no space left"):
        with files.atomic_folder(target) as staging:
            (staging / "new.txt").write_text("new")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # the old folder is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]  # nothing hidden left over
