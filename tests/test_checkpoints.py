"""pokesprite.checkpoints: atomic writes, data-only reads, kinds checked."""
import logging

import numpy as np
import pytest
import torch

from pokesprite.checkpoints import atomic_save, load_checkpoint, read
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


def test_a_failed_write_keeps_the_old_file(tmp_path):
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


def test_files_from_before_plain_data_still_load_with_a_warning(tmp_path, caplog):
    torch.save({"kind": "vae", "numpy": np.arange(3)}, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING, logger="pokesprite.checkpoints"):
        ckpt = load_checkpoint(tmp_path / "old.pt", "vae")
    assert np.array_equal(ckpt["numpy"], np.arange(3)) and "re-save it" in caplog.text
    assert read(tmp_path / "old.pt")["kind"] == "vae"
