"""Retries that help, through real Prefect flow runs of real stages (16 sprites, the tiny profile).

A training stage that fails transiently resumes from the last.pt its failed attempt wrote; an error
that a retry would only repeat (missing input, a config error, a diverged run) fails at once. One
temporary Prefect server (``prefect_test_harness``: its own database) serves the module; MLflow
writes to each project's own store.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from prefect import tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterId, FlowRunFilterTags)

import pokesprite.train.vae as vae_trainer
from conftest import TESTS
from flows import run as entry_point
from flows.pipeline import is_permanent, run_flow
from pokesprite import stages
from pokesprite.config import ConfigError, load_params
from pokesprite.data.raw import DatasetError
from pokesprite.stage_table import RESUME_FILE, STAGES, prepare_run
from pokesprite.stages import Layout, stage_params
from pokesprite.train.stability import TrainingDiverged

# A VAE stage of a few seconds an epoch: 4 training sprites (one batch), no perceptual loss, a
# reconstruction grid after every epoch; retries with no delay.
FAST_VAE = {"vae.train.epochs": 3, "vae.train.max_train_items": 4, "vae.train.sample_every": 1,
            "vae.loss.perceptual_weight": 0.0, "prefect.retries": 2, "prefect.retry_delay_seconds": 0.0}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # $PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


@pytest.fixture(scope="module")
def clean_env():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "POKESPRITE_TRACKING", "DVC_EXP_NAME", "DVC_STAGE"):
            mp.delenv(var, raising=False)
        yield mp


def make_project(root: Path, processed: Path | None, changes: dict) -> Path:
    """A project folder: the tiny profile with ``changes`` as params.yaml, and the preprocess output."""
    params = yaml.safe_load((TESTS / "tiny_params.yaml").read_text())
    for key, value in changes.items():
        *path, leaf = key.split(".")
        section = params
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = value
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if processed is not None:
        shutil.copytree(processed, root / "outputs" / "preprocess")
    return root


def mlflow_runs(root: Path, stage: str) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["pokesprite"], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time ASC"], output_format="list")


def flow_runs_tagged(tag: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def task_runs_of(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


class FailOnce:
    """The VAE trainer's reconstruction grid, raising OSError on its second call only: in epoch 2,
    after epoch 1's last.pt and before epoch 2's."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise OSError("No space left on device (injected)")
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def retried(prefect_api, clean_env, processed, tmp_path_factory):
    """The vae stage as `dvc exp run` runs it, failing transiently once in epoch 2."""
    root = make_project(tmp_path_factory.mktemp("retried") / "project", processed, FAST_VAE)
    fail, resumes = FailOnce(vae_trainer.reconstruction_grid), []
    real_fit = vae_trainer.fit

    def fit(stage, cfg, *, resume=None, **kwargs):  # records what each attempt resumes from
        resumes.append((resume, stages.read_checkpoint(resume)["epoch"] if resume else None))
        return real_fit(stage, cfg, resume=resume, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vae_trainer, "reconstruction_grid", fail)
        mp.setattr(vae_trainer, "fit", fit)
        mp.setenv("DVC_EXP_NAME", "lr-sweep-1")
        metrics = run_flow("vae", "params.yaml", str(root))
    return root, metrics, resumes, fail.calls


def test_a_transient_failure_is_retried_and_resumes_from_last_pt(retried):
    root, metrics, resumes, grid_calls = retried
    last = root / "outputs" / "vae" / "last.pt"
    # attempt 1 from scratch; attempt 2 from the last.pt attempt 1 wrote after epoch 1, not from epoch 0
    assert resumes == [(None, None), (last, 1)]
    assert grid_calls == 5  # epochs 1, 2 (failed); then 2, 3 and the final grid: epoch 1 was not redone
    assert [h["epoch"] for h in stages.read_checkpoint(last)["history"]] == [1, 2, 3]
    assert metrics["best_epoch"] in (1, 2, 3) and (root / "metrics" / "vae.json").is_file()
    # plots/vae.csv and the finished MLflow run show every epoch, the ones before the resume included
    rows = (root / "plots" / "vae.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    failed, finished = mlflow_runs(root, "vae")
    assert (failed.info.status, finished.info.status) == ("FAILED", "FINISHED")
    assert finished.data.tags["resumed_from"] == str(last)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "val_l1")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "val_l1")] == [1, 2]


def test_the_retry_is_one_task_run_of_a_tagged_flow_run_with_a_link_to_mlflow(retried):
    root, _, _, _ = retried
    finished = mlflow_runs(root, "vae")[-1]
    flow_run_id = finished.data.tags["prefect_flow_run_id"]
    (flow_run,) = flow_runs_tagged("dvc-exp:lr-sweep-1")
    assert str(flow_run.id) == flow_run_id and flow_run.name == "vae"
    assert set(flow_run.tags) == {"stage:vae", "dvc-exp:lr-sweep-1", f"pid:{os.getpid()}",
                                  f"host:{socket.gethostname()}"}
    assert flow_run.state.is_completed()
    (task_run,) = task_runs_of(flow_run.id)
    assert task_run.name == "vae" and task_run.run_count == 2 and task_run.state.is_completed()
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert artifact.key == "mlflow-vae"
    assert f"#/experiments/{finished.info.experiment_id}/runs/{finished.info.run_id}" in artifact.data


def test_the_mlflow_run_logs_exactly_the_params_the_table_lists(retried):
    root, _, _, _ = retried
    finished = mlflow_runs(root, "vae")[-1]
    keys = (*STAGES["preprocess"].params, *STAGES["vae"].params)  # the stage's keys and those upstream of it
    expected = stage_params(load_params(root / "params.yaml"), keys)
    assert set(finished.data.params) == set(expected)
    assert {k.split(".")[0] for k in finished.data.params} == {"seed", "data", "text", "vae"}
    assert "data.split" in finished.data.params and "diffusion.train.lr" not in finished.data.params
    assert finished.data.params["vae.train.epochs"] == "3"


def test_prepare_run_resumes_only_under_the_same_params_inputs_and_code(retried, tmp_path):
    """The finished stage's last.pt is resumed (nothing left to train), without the temporary files
    of interrupted writes; a copy of the project with other params, or other inputs, starts afresh:
    its stage folder is cleared and re-stamped."""
    root, _, _, _ = retried
    layout, params = Layout(root), load_params(root / "params.yaml")
    last = layout.stage_dir("vae") / "last.pt"
    kept = sorted(layout.stage_dir("vae").rglob("*"))
    # what a kill during atomic_save and save_image_atomic leaves: DVC would hash them into the output
    leftovers = [last.with_name(".last.pt.0123456789ab.tmp"), last.parent / "samples" / ".epoch_0001.0a1b2c3d.png",
                 last.parent / ".model.0123456789ab" / "text_encoder" / "config.json",  # atomic_folder's staging
                 last.parent / ".model.ba9876543210.old" / ".hidden"]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"half a file")
    assert prepare_run("vae", params, layout) == last and last.is_file()
    assert sorted(layout.stage_dir("vae").rglob("*")) == sorted({*kept, leftovers[1].parent})
    for i, change in enumerate(({"vae.train.lr": 0.002}, {"text.max_tokens": 16}, "input")):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(root / "outputs", copy / "outputs")
        if change == "input":
            with open(copy / "outputs/preprocess/index.csv", "a") as f:
                f.write("\n")
            changed = params
        else:
            changed = load_params(make_project(tmp_path / f"changed{i}", None, {**FAST_VAE, **change}) / "params.yaml")
        assert prepare_run("vae", changed, Layout(copy)) is None, change
        assert sorted(p.name for p in (copy / "outputs/vae").iterdir()) == [RESUME_FILE], change
        assert prepare_run("vae", changed, Layout(copy)) is None  # still nothing to resume: no last.pt
    assert prepare_run("diffusion", params, Layout(tmp_path / "copy0")) is None  # nothing there


@pytest.mark.parametrize("exc, permanent", [
    (ConfigError("unknown key vae.chanels"), True), (DatasetError("data/x.png: not an image"), True),
    (TrainingDiverged("vae: stopped"), True), (FileNotFoundError("outputs/preprocess/index.csv"), True),
    (ValueError("expected a vae checkpoint"), True),
    (OSError("No space left on device"), False), (ConnectionError("MLflow server"), False),
    (RuntimeError("CUDA out of memory"), False), (None, False)])
def test_which_failures_are_retried(exc, permanent):
    assert is_permanent(exc) == permanent


def config_error_project(root: Path) -> Path:
    """A diffusion stage whose VAE checkpoint holds an unknown config key (an incompatible version)."""
    make_project(root, None, FAST_VAE)
    (root / "outputs" / "vae").mkdir(parents=True)
    torch.save({"kind": "vae", "config": {"chanels": [8, 8]}, "latent_scale": 1.0, "state_dict": {}},
               root / "outputs" / "vae" / "best.pt")
    return root


CASES = {  # case -> (stage, how to make its project, the error, a phrase of its message)
    "missing-input": ("vae", lambda root, processed: make_project(root, None, FAST_VAE),
                      FileNotFoundError, "run the preprocess stage first"),
    "diverged": ("vae", lambda root, processed: make_project(
        root, processed, {**FAST_VAE, "vae.train.lr": 1.0e30, "vae.train.max_bad_batches": 1}),
                 TrainingDiverged, "Lower vae.train.lr"),
    "config-error": ("diffusion", lambda root, processed: config_error_project(root),
                     ConfigError, "vae.model.chanels"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_error_a_retry_would_repeat_fails_at_once(case, prefect_api, clean_env, processed, tmp_path):
    stage, make, error, phrase = CASES[case]
    root = make(tmp_path / "project", processed)
    assert load_params(root / "params.yaml").prefect.retries == 2
    with tags(f"case:{case}"), pytest.raises(error, match=phrase):
        run_flow(stage, "params.yaml", str(root))
    (flow_run,) = flow_runs_tagged(f"case:{case}")
    assert flow_run.state.is_failed() and f"stage:{stage}" in flow_run.tags
    (task_run,) = task_runs_of(flow_run.id)
    assert task_run.run_count == 1 and task_run.state.is_failed()  # one attempt of the allowed three
    assert len(mlflow_runs(root, stage)) == 1  # each attempt opens one MLflow run


def test_the_entry_point_prints_one_clear_message(prefect_api, clean_env, tmp_path, monkeypatch, capsys):
    """`python -m flows.run diffusion` (the DVC command) on an incompatible checkpoint: exit 2 and
    one line that names the bad key, after a single attempt."""
    root = config_error_project(tmp_path / "project")
    monkeypatch.chdir(root)
    with tags("case:entry-point"):
        assert entry_point.main(["diffusion"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: diffusion: ") and "vae.model.chanels" in errors[0]
    (flow_run,) = flow_runs_tagged("case:entry-point")
    assert [t.run_count for t in task_runs_of(flow_run.id)] == [1]
