"""Data-parallel training: 2 gloo processes under torchrun train what 1 process trains.

One tiny project trains vae, diffusion and finetune (with the alignment scorer finetune needs) twice:
once in one process, once under ``torchrun --nproc_per_node=2`` with the same global batch. Each
step draws its random numbers for the global batch and each process keeps its rows, so the two runs
differ only by rounding (sums over a batch split in two are added in another order), which AdamW
amplifies for parameters whose gradients are near zero. Measured on 2 CPU cores, the final weights
of the two runs differ by 4.1% (vae), 1.5% (diffusion) and 0.07% (finetune) of how far the last
epoch moved them; a VAE checkpoint of the two processes resumed in one is as close (4.1%). One
process with 1 thread against 2 threads differs by as much. A slip that gives the processes
different random numbers moves them apart by more than an epoch's update: with the text encoder's
dropout left on (masks per process), finetune differed by 9.9 times its last epoch's update.

The text encoder's dropout masks are drawn per process by design (``distributed.private_rng``), so
both runs here have dropout off (a sitecustomize that makes dropout the identity).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TESTS

pytestmark = pytest.mark.slow
TOLERANCE = 0.1  # |w_2 - w_1| / |w_1 after the last epoch - w_1 before it|; rounding gives ~0.01
EPOCHS = 2
TRAINED = {"vae": "1", "diffusion": "2", "finetune": "3"}
# Loaded at start-up by both runs: dropout layers and attention dropout become the identity.
NO_DROPOUT = """import torch
import torch.nn.functional as F

torch.nn.Dropout.forward = lambda self, x: x
_attention = F.scaled_dot_product_attention
F.scaled_dot_product_attention = lambda *args, dropout_p=0.0, **kwargs: _attention(*args, dropout_p=0.0, **kwargs)
"""


def project_params() -> str:
    params = yaml.safe_load((TESTS / "tiny_params.yaml").read_text())
    for stage in TRAINED:
        params[stage]["train"].update(epochs=EPOCHS, checkpoint_every=1)
        if stage != "finetune":  # stage 3 draws its grid once, at the end
            params[stage]["train"]["sample_every"] = 0
    params["finetune"]["train"]["lr"] = 1e-3  # a visible step in two epochs
    return yaml.safe_dump(params, sort_keys=False)


def train(root: Path, stages: list[str], nproc: int, env: dict, *extra: str) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(TESTS / "train_stages.py"), *extra, *stages]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(raw_subset, tmp_path_factory):
    """Project roots: "one" (every stage in one process), "two" (vae on two processes as `dvc repro`
    runs it with POKESPRITE_NPROC=2, through Prefect and MLflow, then diffusion under torchrun),
    "two_finetune" (finetune on two processes from one's vae, diffusion and scorer, so that it is
    compared on equal inputs), "resumed" (one process resuming the two-process vae's epoch 1)."""
    base = tmp_path_factory.mktemp("ddp")
    nodrop = base / "nodrop"
    nodrop.mkdir()
    (nodrop / "sitecustomize.py").write_text(NO_DROPOUT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(nodrop), str(ROOT)])}
    template = base / "template"
    shutil.copytree(raw_subset, template / "data")
    (template / "params.yaml").write_text(project_params())
    subprocess.run([sys.executable, "-m", "pokesprite.cli", "train", "--stage", "preprocess", "--no-mlflow"],
                   cwd=template, env=env, check=True, capture_output=True)
    roots = {name: base / name for name in ("one", "two", "two_finetune", "resumed")}
    for root in roots.values():
        shutil.copytree(template, root)
    train(roots["one"], list(TRAINED.values()), 1, env)
    flow_env = {**env, "POKESPRITE_NPROC": "2", "PREFECT_HOME": str(roots["two"] / ".prefect")}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "POKESPRITE_TRACKING"):
        flow_env.pop(var, None)
    flow = subprocess.run([sys.executable, "-m", "flows.run", "vae"], cwd=roots["two"], env=flow_env,
                          capture_output=True, text=True, timeout=900)
    assert flow.returncode == 0, f"flows.run vae failed:\n{flow.stdout[-3000:]}\n{flow.stderr[-6000:]}"
    (roots["two"] / "flow.log").write_text(flow.stdout + flow.stderr)
    train(roots["two"], ["2"], 2, env)
    for stage in ("vae", "diffusion", "alignment"):
        shutil.copytree(roots["one"] / "outputs" / stage, roots["two_finetune"] / "outputs" / stage)
    train(roots["two_finetune"], ["3"], 2, env)
    train(roots["resumed"], ["1"], 1, env, "--resume", str(roots["two"] / "outputs/vae/epoch_0001.pt"))
    return roots


def weights(root: Path, stage: str, name: str) -> torch.Tensor:
    """The trained model's weights (not the EMA's) in a training checkpoint, as one vector."""
    state = torch.load(root / "outputs" / stage / name, map_location="cpu", weights_only=True)["train"]["model"]
    return torch.cat([state[k].float().flatten() for k in sorted(state)])


def disagreement(a: Path, b: Path, stage: str) -> float:
    """How far b's final weights are from a's, relative to how far a's last epoch moved them."""
    final, before = weights(a, stage, "last.pt"), weights(a, stage, f"epoch_{EPOCHS - 1:04d}.pt")
    return float((weights(b, stage, "last.pt") - final).norm() / (final - before).norm())


@pytest.mark.parametrize("stage", list(TRAINED))
def test_two_processes_train_what_one_process_trains(runs, stage):
    two = runs["two_finetune" if stage == "finetune" else "two"]
    ratio = disagreement(runs["one"], two, stage)
    print(f"{stage}: 2 processes vs 1: {ratio:.4f} of the last epoch's update")
    assert ratio < TOLERANCE
    history = lambda root: torch.load(root / "outputs" / stage / "last.pt", weights_only=True)["history"]  # noqa: E731
    for a, b in zip(history(runs["one"]), history(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:  # the logged numbers are the global batch's
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (stage, a["epoch"], key)
    # process 0 alone wrote: each file once, with the outputs of one process
    assert sorted(p.name for p in (two / "outputs" / stage).iterdir()) == \
        sorted(p.name for p in (runs["one"] / "outputs" / stage).iterdir())


def test_the_dvc_stage_command_runs_on_the_processes_pokesprite_nproc_says(runs):
    import mlflow

    root = runs["two"]
    log = (root / "flow.log").read_text()
    # prefect.retries (0 in the tiny profile) becomes torchrun's restarts of the whole group
    assert ("vae on 2 processes: -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=0 "
            "-m flows.run vae") in log
    assert log.startswith("Prefect server for this run: ")  # in a session of its own, outside torchrun's groups
    assert log.count("vae done in") == 1  # process 0 finished the stage; the other wrote nothing
    assert "Finished in state Completed()" in log  # the Prefect flow run (process 0's)
    assert (root / "metrics" / "vae.json").is_file() and (root / "runs" / "vae.json").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs_ = client.search_runs(client.get_experiment_by_name("pokesprite").experiment_id)
    assert [(r.data.tags.get("stage"), r.info.status) for r in runs_] == [("vae", "FINISHED")]
    assert runs_[0].data.metrics["val_loss"] > 0  # one run, with the epochs' metrics


def test_a_checkpoint_of_two_processes_resumes_in_one(runs):
    ratio = disagreement(runs["one"], runs["resumed"], "vae")
    print(f"vae: 2 processes for epoch 1, then 1 process: {ratio:.4f} of the last epoch's update")
    assert ratio < TOLERANCE


def test_the_batch_must_split_evenly(runs, tmp_path):
    root = tmp_path / "odd"
    shutil.copytree(runs["one"] / "data", root / "data")
    shutil.copytree(runs["one"] / "outputs" / "preprocess", root / "outputs" / "preprocess")
    params = yaml.safe_load(project_params())
    params["vae"]["train"]["batch_size"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "train_stages.py"), "1"]
    result = subprocess.run(cmd, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "vae.train.batch_size must be a multiple of the number of processes (2), got 3" in result.stderr


FAIL_ON_RANK_1 = """import os
import torch

if os.environ.get("RANK") == "1":  # process 1 fails at its second optimiser step, as on a GPU out of memory
    _step, _count = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        _count[0] += 1
        if _count[0] == 2:
            raise RuntimeError("process 1 fails here")
        return _step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
"""


def test_a_failing_process_ends_the_flow_run_as_crashed(runs, tmp_path):
    """When one process fails, torchrun stops the others' process groups: process 0 must still reach
    the Prefect server to end its flow run (Crashed), and exit at once rather than be killed 30 s later."""
    import sqlite3

    root = tmp_path / "failing"
    shutil.copytree(runs["one"] / "data", root / "data")
    shutil.copytree(runs["one"] / "outputs" / "preprocess", root / "outputs" / "preprocess")
    (root / "params.yaml").write_text(project_params())
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "1", "OMP_NUM_THREADS": "1", "POKESPRITE_NPROC": "2",
           "PREFECT_HOME": str(root / ".prefect"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(ROOT)])}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "POKESPRITE_TRACKING"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-m", "flows.run", "vae"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "process 1 fails here" in log
    assert "forcefully exiting via 9" not in log, log[-4000:]  # process 0 ended on torchrun's SIGTERM
    with contextlib.closing(sqlite3.connect(root / ".prefect" / "prefect.db")) as db:
        states = db.execute("SELECT name, state_type FROM flow_run").fetchall()
    assert states == [("vae", "CRASHED")], log[-4000:]
