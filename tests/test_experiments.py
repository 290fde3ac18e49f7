"""`pokesprite exp show` / `metrics show` tables, and DVC queued experiments that log to the project.

The tables are checked character for character on input shaped like DVC 3.67's ``dvc exp show
--json`` and ``dvc metrics diff --all --json`` (values from this project's metrics/evaluate.json).
The queue test runs real ``dvc exp run --queue`` + ``dvc queue start -j 2`` on a throwaway project
whose one stage opens its MLflow run with ``pokesprite.tracking`` and registers a model version:
the runs, versions and TensorBoard folders must end up in the project, not in DVC's temporary copies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import TESTS
from pokesprite.config import flatten, load_params, to_dict
from pokesprite.experiments import (DvcCommandError, add_parsers, format_exp_show, format_metrics_show, headlines,
                                    run_dvc)

SHA = {"main": "7ce30a4c1d2e3f405162738495a6b7c8d9e0f1a2",
       "lr-up": "f10c03cc9d2cc5932c8728d9e245bc17d2257e8c",
       "longer-finetune": "ff0a6348a508a972da2b88d1a7e5da85a6c441b6",
       "wide-vae": "9487edd609cf5e439475a2dc680442fe28e9c11c"}


def params(lr=0.0002, epochs=1, channels=(16, 32)):
    return {"seed": 0, "diffusion": {"train": {"lr": lr, "epochs": 6}, "sample": {"guidance_scale": 3.0}},
            "finetune": {"train": {"epochs": epochs}}, "vae": {"model": {"channels": list(channels)}}}


def metrics(kid, fid, r_precision, sensitivity):
    return {"kid": kid, "kid_std": 0.005, "fid": fid, "recon_psnr": 18.666676592518854,
            "independent_r_precision": r_precision, "text_sensitivity": sensitivity, "registered_version": 5}


def state(rev, name, p, m):
    """One ``ExpState`` as ``dvc exp show --json`` writes it."""
    return {"rev": rev, "name": name,
            "data": {"rev": rev, "timestamp": None if rev == "workspace" else "2026-11-27T11:39:57",
                     "params": {"params.yaml": {"data": p}},
                     "metrics": {"metrics/evaluate.json": {"data": m}} if m else {},
                     "deps": {}, "outs": {}, "meta": {}},
            "error": None, "experiments": None}


def experiment(name, p, m, executor=None):
    return {"revs": [state(SHA[name], name, p, m)], "executor": executor, "name": name}


SHOWN = [
    state("workspace", None, params(lr=0.001), metrics(0.3512, 341.25, 0.0444, 0.0121)),
    {**state(SHA["main"], "main", params(), metrics(0.37022703028728915, 356.0009205043584, 0.03333333507180214,
                                                   0.008690939323415421)),
     "experiments": [
         experiment("lr-up", params(lr=0.001), metrics(0.3512, 341.25, 0.0444, 0.0121)),
         experiment("longer-finetune", params(epochs=2), metrics(0.3809, 360.5, 0.0556, 0.0098)),
         experiment("wide-vae", params(channels=(32, 64)), None,
                    {"state": "queued", "name": "dvc-task",
                     "local": {"root": None, "log": None, "pid": None, "returncode": None,
                               "task_id": SHA["wide-vae"]}}),
     ]},
]

EXPECTED = """\
experiment            kid     fid    psnr   R-prec   text-sens  params that differ
--------------------  ------  -----  -----  -------  ---------  --------------------------------------------------------
workspace             0.3512  341.2  18.67  0.0444   0.0121     diffusion.train.lr=0.001
main                  0.3702  356    18.67  0.03333  0.008691   diffusion.train.lr=0.0002 finetune.train.epochs=1
                                                                vae.model.channels=[16,32]
├─ lr-up              0.3512  341.2  18.67  0.0444   0.0121     diffusion.train.lr=0.001
├─ longer-finetune    0.3809  360.5  18.67  0.0556   0.0098     finetune.train.epochs=2
└─ wide-vae (queued)  -       -      -      -        -          vae.model.channels=[32,64]
params that differ: a baseline row lists its values, the other rows what they set differently
kid, fid: lower is better; psnr, R-prec, text-sens: higher is better; psnr = recon_psnr (dB); R-prec =
independent_r_precision (chance 1/32); text-sens = text_sensitivity"""


def test_exp_show_table_on_recorded_json():
    out = format_exp_show(json.loads(json.dumps(SHOWN)))
    assert out == EXPECTED
    assert max(len(line) for line in out.splitlines()) <= 120


def test_exp_show_puts_params_under_rows_when_narrow():
    out = format_exp_show(SHOWN, width=72)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 72
    assert lines[lines.index("main                  0.3702  356    18.67  0.03333  0.008691") + 1] == \
        "    diffusion.train.lr=0.0002 finetune.train.epochs=1"
    assert "    vae.model.channels=[32,64]" in lines


def test_exp_show_chooses_metrics_and_marks_unchanged_experiments():
    same = [SHOWN[0], {**SHOWN[1], "experiments": [experiment("lr-up", params(), metrics(0.1, 1.0, 0.5, 0.2))]}]
    out = format_exp_show(same, metrics=headlines("kid,kid_std"))
    assert out.splitlines()[0].split() == ["experiment", "kid", "kid_std", "params", "that", "differ"]
    assert out.splitlines()[4].split() == ["└─", "lr-up", "0.1", "0.005", "(same", "params", "as", "baseline)"]


DIFF = {"metrics/evaluate.json": {
    "kid": {"old": 0.37022703028728915, "new": 0.3512, "diff": -0.01902703028728915},
    "fid": {"old": 356.0009205043584, "new": 360.5, "diff": 4.4990794956416},
    "recon_psnr": {"old": 18.666676592518854, "new": 18.666676592518854, "diff": 0.0},
    "independent_r_precision": {"old": 0.03333333507180214, "new": 0.0444, "diff": 0.01106666492819786},
    "text_sensitivity": {"old": None, "new": 0.0121}},
    "metrics/vae.json": {"kid": {"old": 9.0, "new": 9.0, "diff": 0.0}}}
PARAMS_DIFF = {"params.yaml": {"finetune.train.epochs": {"old": 1, "new": 2, "diff": 1},
                               "diffusion.train.lr": {"old": 0.0002, "new": 0.001, "diff": 0.0008}}}


def test_metrics_show_workspace_against_head():
    assert format_metrics_show(DIFF, PARAMS_DIFF) == """\
metric     HEAD     workspace  change
---------  -------  ---------  --------  ------
kid        0.3702   0.3512     -0.01903  better
fid        356      360.5      +4.499    worse
psnr       18.67    18.67      0
R-prec     0.03333  0.0444     +0.01107  better
text-sens  -        0.0121
kid, fid: lower is better; psnr, R-prec, text-sens: higher is better; psnr = recon_psnr (dB); R-prec =
independent_r_precision (chance 1/32); text-sens = text_sensitivity
params changed since HEAD: diffusion.train.lr 0.0002 -> 0.001, finetune.train.epochs 1 -> 2"""
    assert format_metrics_show(DIFF, {}).endswith("params changed since HEAD: none")


def test_dvc_errors_say_where_to_run(tmp_path):
    with pytest.raises(DvcCommandError, match=r"not inside of a DVC repository.*\n"
                                              r"Run this in the pokesprite project folder"):
        run_dvc(["exp", "show"], tmp_path)


# ---- a real DVC queue ---------------------------------------------------------------------------

STAGE = textwrap.dedent("""
    # The evaluate stage in miniature: one MLflow run through pokesprite.tracking, a registered version.
    import json, os
    import mlflow
    from pokesprite.config import load_params
    from pokesprite.tracking import start_stage_run, store_lock, tensorboard_run_dir

    params = load_params("params.yaml")
    epochs = params.finetune.train.epochs
    scores = {"kid": epochs / 10, "fid": 300.0 + epochs, "recon_psnr": 18.5,
              "independent_r_precision": 0.03 * epochs, "text_sensitivity": 0.01}
    with start_stage_run("evaluate", params, ".") as run:
        tensorboard_run_dir(".", "evaluate", run.info.run_id)
        mlflow.log_metrics(scores)
        mlflow.set_tag("cwd", os.getcwd())
        client = mlflow.MlflowClient()
        with store_lock():
            if not client.search_registered_models(filter_string="name='pokesprite'"):
                client.create_registered_model("pokesprite")
            client.create_model_version("pokesprite", source=run.info.artifact_uri, run_id=run.info.run_id)
    os.makedirs("metrics", exist_ok=True)
    with open("metrics/evaluate.json", "w") as f:
        json.dump(scores, f)
""")

DVC_YAML = """\
stages:
  evaluate:
    cmd: python stage.py
    deps: [stage.py]
    params: [finetune.train.epochs]
    metrics:
      - metrics/evaluate.json:
          cache: false
"""


def sh(cmd, cwd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.mark.slow
def test_queued_experiments_log_to_the_project_store(tmp_path, capsys):
    import mlflow

    root = tmp_path / "project"
    root.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(name, None)
    (root / "params.yaml").write_text((TESTS / "tiny_params.yaml").read_text())
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("/mlruns/\n/tb/\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "test@pokesprite"],
                ["git", "config", "user.name", "pokesprite tests"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        sh(cmd, root, env)
    baseline = sh(["git", "rev-parse", "HEAD"], root, env).strip()
    for epochs in (2, 3):
        sh(["dvc", "exp", "run", "--queue", "-S", f"finetune.train.epochs={epochs}", "-n", f"q{epochs}"], root, env)
    try:  # two workers open the (not yet existing) store at about the same time
        sh(["dvc", "queue", "start", "-j", "2"], root, env)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = sh(["dvc", "queue", "status"], root, env)
            if not any(word in status for word in ("Queued", "Running")):
                break
            time.sleep(5)
        assert status.count("Success") == 2, status + sh(["dvc", "queue", "logs", "q2"], root, env)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True, timeout=120)

    db = root / "mlruns" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    exp = client.get_experiment_by_name("pokesprite")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"evaluate · q2", "evaluate · q3"}
    for epochs in (2, 3):
        run = runs[f"evaluate · q{epochs}"]
        assert "/.dvc/tmp/exps/" in run.data.tags["cwd"]  # it ran in DVC's temporary copy...
        assert run.data.tags["dvc_exp_name"] == f"q{epochs}" and run.data.tags["dvc_exp_baseline_rev"] == baseline
        assert run.data.tags["changed"] == f"finetune.train.epochs 1 -> {epochs}"
        assert run.data.metrics["kid"] == pytest.approx(epochs / 10)
        logged = load_params(TESTS / "tiny_params.yaml")
        assert len(run.data.params) == len(flatten(to_dict(logged)))
        assert run.data.params["finetune.train.epochs"] == str(epochs)
    versions = client.search_model_versions("name='pokesprite'")  # ...and registered here
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs.values()}
    tb = sorted(p.name for p in (root / "tb" / "evaluate").iterdir())
    assert len(tb) == 2 and "_q2_" in tb[0] + tb[1] and "_q3_" in tb[0] + tb[1]

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["exp", "show", "--root", str(root)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith(("├─", "└─"))}
    assert rows["q3"][2:4] == ["0.3", "303"] and rows["q3"][-1] == "finetune.train.epochs=3"
    assert rows["q2"][2:4] == ["0.2", "302"] and rows["q2"][-1] == "finetune.train.epochs=2"
