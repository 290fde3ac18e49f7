"""Interrupted stages: a stage dies with the dvc process that started it, a killed MLflow run is
marked KILLED, and a killed training stage (diffusion and finetune, under ``pokesprite train``)
resumes with at most one epoch redone and the same final weights as an uninterrupted run (16
sprites, the tiny profile, CPU). A ``dvc repro`` killed in the vae stage, whose Prefect flow run is
then marked Crashed, is test_e2e's fresh clone: its rerun must still reproduce the committed dvc.lock."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TESTS, kill_once_saved

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "POKESPRITE_TRACKING": "off", "CI": "true"}


def test_a_stage_finds_the_dvc_process_above_it(tmp_path):
    """A process named dvc, two levels up (dvc -> sh -> python, as DVC runs a stage's command)."""
    (tmp_path / "dvc").symlink_to(sys.executable)
    child = "from flows.run import dvc_ancestor; import os; print(dvc_ancestor(), flush=True)"
    shell = f"{sys.executable} -c {child!r}"
    parent = f"import subprocess, os; print(os.getpid(), flush=True); subprocess.run(['sh', '-c', {shell!r}])"
    out = subprocess.run([str(tmp_path / "dvc"), "-c", parent], env=ENV, capture_output=True, text=True, timeout=60)
    dvc_pid, found = out.stdout.split()
    assert found == dvc_pid, out.stderr
    assert subprocess.run([sys.executable, "-c", child], env=ENV, capture_output=True, text=True,
                          timeout=60).stdout.strip() == "None"


def test_a_stage_stops_when_its_dvc_process_dies():
    script = textwrap.dedent("""
        import subprocess, time
        from flows.run import stop_with
        dvc = subprocess.Popen(["sleep", "60"])
        stop_with(dvc.pid, poll_s=0.05)
        dvc.kill(); dvc.wait()
        try:
            time.sleep(30)
            print("ran on")
        except KeyboardInterrupt:
            print("interrupted")
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "interrupted" and time.monotonic() - start < 20, out.stderr


def test_a_killed_runs_mlflow_run_is_marked_killed(tmp_path, monkeypatch):
    import socket

    import mlflow

    from pokesprite.tracking import HOST_TAG, PID_TAG, configure_mlflow, end_dead_runs, ensure_experiment

    dead = subprocess.Popen(["true"])
    dead.wait()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # restored after the test
        monkeypatch.delenv(var, raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        uri = configure_mlflow(tmp_path)
        experiment = ensure_experiment("killed", tmp_path)
        client = mlflow.MlflowClient(uri, uri)
        runs = {}
        for who, pid in (("dead", dead.pid), ("alive", os.getpid())):
            run = client.create_run(experiment,
                                    tags={"stage": "vae", PID_TAG: str(pid), HOST_TAG: socket.gethostname()})
            runs[who] = run.info.run_id
        assert end_dead_runs(experiment, "vae") == [runs["dead"]]
        assert client.get_run(runs["dead"]).info.status == "KILLED"
        assert client.get_run(runs["alive"]).info.status == "RUNNING"
        assert end_dead_runs(experiment, "diffusion") == []
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


# --- Ctrl-C of a stage's command -------------------------------------------------------------------

CTRL_C = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"


def test_ctrl_c_of_a_stage_reports_its_flow_run_and_says_how_to_resume(processed, tmp_path):
    """Ctrl-C reaches the whole foreground process group. The stage's Prefect server must not be in it
    (it is started in a session of its own): else the flow run cannot be reported Crashed, and the
    command retried the dead server for minutes and ended without saying how to resume."""
    import sqlite3

    root = project(tmp_path / "p", processed)
    env = {**ENV, "PREFECT_HOME": str(root / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    log = root / "stage.log"
    with log.open("w") as out:  # a terminal's process group, with SIGINT handled as a shell leaves it
        proc = subprocess.Popen([sys.executable, "-c", CTRL_C, sys.executable, "-m", "flows.run", "vae"], cwd=root,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "vae epoch 1/4" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, 2)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "To continue from it:\n  pokesprite train --stage 1 --resume outputs/vae/last.pt" in text, text[-3000:]
    with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
        assert db.execute("SELECT name, state_type FROM flow_run").fetchall() == [("vae", "CRASHED")]


# --- kill -9 in each training stage, then run it again ------------------------------------------

EPOCHS = {"vae": 4, "diffusion": 4, "finetune": 4}


def project(root: Path, processed: Path) -> Path:
    params = yaml.safe_load((TESTS / "tiny_params.yaml").read_text())
    for stage, epochs in EPOCHS.items():
        params[stage]["train"].update(epochs=epochs, save_every=1, checkpoint_every=0)
        if stage != "finetune":  # stage 3 draws its grid once, at the end
            params[stage]["train"]["sample_every"] = 0
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "outputs").mkdir()
    os.symlink(processed, root / "outputs/preprocess")
    return root


def train(root: Path, stage: str, *, kill_after_epoch: int = 0) -> subprocess.CompletedProcess | None:
    """``pokesprite train --stage STAGE`` in ``root``; with ``kill_after_epoch``, SIGKILL it once its
    last.pt holds that epoch."""
    cmd = [sys.executable, "-m", "pokesprite.cli", "train", "--config", str(root / "params.yaml"), "--stage", stage,
           "--root", str(root), "--no-mlflow"]
    if not kill_after_epoch:
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_once_saved(proc, root / "outputs" / stage / "last.pt", kill_after_epoch, stage)
    return None


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["train"]["model"]


@pytest.fixture(scope="module")
def straight(processed, tmp_path_factory):
    """Each training stage run once, uninterrupted: the reference weights."""
    root = project(tmp_path_factory.mktemp("straight") / "p", processed)
    # one process for the four stages: each start would pay for importing torch and transformers again
    out = subprocess.run([sys.executable, str(TESTS / "train_stages.py"), "alignment", "vae", "diffusion", "finetune"],
                         cwd=root, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.parametrize("stage", ["diffusion", "finetune"])  # the vae: through dvc repro, in test_e2e
def test_a_killed_stage_resumes_and_ends_with_the_same_weights(straight, processed, tmp_path, stage):
    root = project(tmp_path / "p", processed)
    for earlier in ("alignment", "vae", "diffusion")[: ("vae", "diffusion", "finetune").index(stage) + 1]:
        if earlier != stage:  # the stages before it: copies of the straight run's
            shutil.copytree(straight / "outputs" / earlier, root / "outputs" / earlier)
    train(root, stage, kill_after_epoch=2)
    out = train(root, stage)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = re.search(rf"{stage}: resuming from \S+ \(epoch (\d+) of {EPOCHS[stage]}\)", out.stderr)
    assert resumed and int(resumed[1]) >= 2, out.stderr[-3000:]  # what the killed run had saved: at most
    # the epoch it was in when killed is trained again (last.pt is written after every epoch here)
    final, reference = weights(root / "outputs" / stage / "last.pt"), weights(straight / "outputs" / stage / "last.pt")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), stage
