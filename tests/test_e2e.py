"""End to end, as a user runs it: DVC -> Prefect -> MLflow on 16 sprites with the tiny profile.

A throwaway project (git + DVC) is laid out in a temporary folder; ``dvc repro`` runs every stage
(training, evaluation, registration), a second ``dvc repro`` must do nothing, ``dvc exp run -S`` must
work and follow the promotion rule, and the registered model is loaded by alias in a fresh Python
process and asked to draw.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TESTS, dvc_project, kill_dvc_repro_in, postgres_database, prefect_server, run
from flows.server import free_port, wait_until_up

pytestmark = pytest.mark.slow
STAGES = ("preprocess", "reference", "alignment", "vae", "diffusion", "finetune", "evaluate")
TRAINING = ("alignment", "vae", "diffusion", "finetune")  # the stages with per-epoch plots


@pytest.fixture(scope="module")
def project(raw_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    env = dvc_project(root, raw_subset, (TESTS / "tiny_params.yaml").read_text())
    with prefect_server(root, env):  # one for the whole module
        yield root, env, run(["dvc", "repro"], root, env)


def mlflow_client(root):
    import mlflow

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # not the registry of an earlier test in this process
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_repro_runs_every_stage_and_writes_metrics(project):
    root, env, repro = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.stdout
        metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
        facts = json.loads((root / "runs" / f"{stage}.json").read_text())  # untracked: times, host, registry
        assert "wall_seconds" not in metrics and facts["wall_seconds"] > 0 and facts["host"]
    assert json.loads((root / "metrics/preprocess.json").read_text())["sprites"] == 16
    assert (root / "outputs/finetune/model/pipeline.pt").is_file()
    assert (root / "dvc.lock").is_file()
    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    for key in ("fid", "kid", "kid_std", "recon_psnr", "recon_ssim", "recon_vgg_distance", "stage3_scorer_r_precision",
                "independent_r_precision", "independent_r_precision_before", "text_sensitivity"):
        assert np.isfinite(evaluation[key]), key
    assert evaluation["generated_sprites"] == 3 and evaluation["real_sprites"] == 16  # val + test of 16
    # the floor: the real sprites of the same 3 captions, under the same protocol (vs all 16 real)
    from pokesprite.evaluation.fid import frechet_distance

    ref = torch.load(root / "outputs/reference/inception_features.pt", weights_only=False)
    held = [i for i, split in enumerate(ref["splits"]) if split in ("val", "test")]
    assert evaluation["fid_real"] == pytest.approx(frechet_distance(ref["features"][held], ref["features"]))
    assert 0 <= evaluation["fid_real"] < evaluation["fid"] and np.isfinite(evaluation["kid_real"])
    assert 0 <= evaluation["recon_ssim"] <= 1 and evaluation["fid"] > 0
    facts = json.loads((root / "runs/evaluate.json").read_text())
    assert facts["registered_version"] == 1 and facts["promoted"] == 1 and "promoted" not in evaluation
    for stage in TRAINING:
        header = (root / "plots" / f"{stage}.csv").read_text().splitlines()[0].split(",")
        assert header[0] == "epoch" and "val_loss" in header, (stage, header)
    assert Image.open(root / "plots/sample_grid.png").size[0] == 2 * 215  # two seeds, sprites at their own size


def test_dvc_metrics_and_plots_show(project):
    root, env, _ = project
    shown = run(["dvc", "metrics", "show", "--json"], root, env).stdout
    metrics = json.loads(shown)
    flat = json.dumps(metrics)
    assert "metrics/evaluate.json" in flat and '"kid"' in flat
    plots = run(["dvc", "plots", "show", "-o", str(root / "dvc_plots")], root, env)
    html = (root / "dvc_plots" / "index.html").read_text()
    assert "VAE loss per epoch" in html and "sample_grid.png" in html, plots.stdout


def test_second_repro_does_nothing(project):
    root, env, _ = project
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env).stdout


def test_prefect_server_records_each_stage_as_a_flow_run_with_its_task_run(project, tmp_path):
    """The server `make repro` starts keeps what its UI shows: a completed flow run per stage and,
    inside it, the stage's task run (its state and retries)."""
    root, env, _ = project
    script = textwrap.dedent("""
        import json
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            flows = {str(r.id): r.name for r in client.read_flow_runs()}
            print(json.dumps([[flows.get(str(t.flow_run_id)), t.name, t.state.type.value]
                              for t in client.read_task_runs()]))
    """)
    task_runs = json.loads(run([sys.executable, "-c", script], tmp_path, env).stdout.splitlines()[-1])
    assert sorted(task_runs) == sorted([stage, stage, "COMPLETED"] for stage in STAGES)


def test_mlflow_has_one_run_per_stage_and_a_champion(project):
    root, _, _ = project
    client = mlflow_client(root)
    exp = client.get_experiment_by_name("pokesprite")
    assert exp.artifact_location.startswith((root / "mlruns").resolve().as_uri())
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == set(STAGES) and len(runs) == len(STAGES)
    for stage, r in by_stage.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["prefect_flow_run_id"]  # each stage ran as a Prefect flow run
        assert r.data.params["seed"] == "0"
        images = [a.path for a in client.list_artifacts(r.info.run_id) if a.path.endswith(".png")]
        assert images or stage == "reference", f"{stage} logged no image"
    vae_history = client.get_metric_history(by_stage["vae"].info.run_id, "val_l1")
    assert [m.step for m in vae_history] == [1, 2]
    assert "sample_grid.png" in [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)]
    champion = client.get_model_version_by_alias("pokesprite", "champion")
    assert int(champion.version) == 1 and champion.run_id == by_stage["evaluate"].info.run_id
    tags = champion.tags
    lock = __import__("yaml").safe_load((root / "dvc.lock").read_text())["stages"]
    out_md5 = {stage: {o["path"]: o["md5"] for o in entry["outs"]} for stage, entry in lock.items()}
    assert tags["dvc_lock.finetune"] == out_md5["finetune"]["outputs/finetune"]
    assert tags["dvc_lock.vae"] == out_md5["vae"]["outputs/vae"]
    assert "dvc_lock.evaluate" not in tags  # its own lock entry is written only after it finishes
    assert tags["data_dvc_md5"] == __import__("yaml").safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    assert tags["git_commit"] == run(["git", "rev-parse", "HEAD"], root, os.environ).stdout.strip()
    assert tags["git_dirty"] == "false"  # dvc.lock, metrics/ and plots/ changed, but they are the run's own
    assert tags["prefect_flow_run_id"] == by_stage["evaluate"].data.tags["prefect_flow_run_id"]
    assert float(tags["metric.kid"]) == json.loads((root / "metrics/evaluate.json").read_text())["kid"]  # exact
    assert tags["promotion"] == "no evaluated champion yet"
    assert re.fullmatch(r"[0-9a-f]{12}", tags["eval_protocol"])
    assert tags["eval_protocol_desc"].startswith("3 held-out captions ") and "vs 16 real" in tags["eval_protocol_desc"]


def test_models_list_prints_versions_aliases_and_metrics(project):
    root, env, _ = project
    out = run([sys.executable, "-m", "pokesprite.cli", "models", "list"], root, env).stdout
    head, rule, first = out.splitlines()[:3]
    assert head.split()[:4] == ["version", "aliases", "created", "fid"] and set(rule) <= {"-", " "}
    assert first.split()[0] in ("1", "2") and "champion" in out
    assert head.split()[-2:] == ["protocol", "commit"] and re.search(r"^protocol [0-9a-f]{6}: 3 held-out captions", out,
                                                                       re.M)
    missing = run([sys.executable, "-m", "pokesprite.cli", "models", "list", "--name", "nope"], root, env, check=False)
    assert missing.returncode == 1 and "no registered model 'nope'" in missing.stderr
    assert "registered here: pokesprite" in missing.stderr
    typo = run([sys.executable, "-m", "pokesprite.cli", "models", "list", "--metrics", "kid,psnr"], root, env,
               check=False)
    assert typo.returncode == 2 and "--metrics psnr: no version has it; choose from " in typo.stderr
    assert "recon_psnr" in typo.stderr


def test_registered_model_loads_and_draws_in_a_new_process(project, tmp_path):
    root, env, _ = project
    script = textwrap.dedent(f"""
        import json, sys, mlflow
        mlflow.set_tracking_uri("sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model("models:/pokesprite@champion")
        prompts = ["a small green creature with a bulb on its back", "a blue turtle"]
        images = model.predict(prompts, params={{"seed": 0, "num_steps": 3}})
        ddim = model.predict(prompts, params={{"seed": 0, "num_steps": 3, "sampler": "ddim", "guidance_scale": 1.0}})
        params = {{p.name: p.default for p in model.metadata.signature.params.params}}
        print(json.dumps({{"shape": list(images.shape), "dtype": str(images.dtype), "params": params,
                          "ddim_differs": bool((ddim != images).any()),
                          "code": sys.modules["pokesprite"].__file__}}))
    """)
    out = run([sys.executable, "-c", script], tmp_path, env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 215, 215, 3] and result["dtype"] == "uint8"  # arrays stay RGB; PNGs are RGBA
    # the signature's params default to the trained model's sampling settings (tests/tiny_params.yaml)
    assert result["params"] == {"seed": 0, "num_steps": 4, "guidance_scale": 2.0, "sampler": "ddpm",
                                "format": "array", "rgb": False, "background": "#ffffff"}
    assert result["ddim_differs"]
    # The package came from the logged model, not from a checkout: the model is self-contained.
    assert "mlruns" in result["code"] and str(ROOT) not in result["code"]


def test_generate_cli_writes_reproducible_pngs(project):
    root, env, _ = project
    cmd = [sys.executable, "-m", "pokesprite.cli", "generate", "a small green creature with a bulb on its back",
           "-n", "2", "--seed", "0", "--steps", "3", "--sampler", "ddim", "--guidance", "1.5"]
    first = run(cmd + ["-o", "a"], root, env)
    run(cmd + ["-o", "b"], root, env)
    paths = sorted((root / "a").glob("*.png"))
    assert len(paths) == 2 and first.stdout.count(".png") == 2
    for p in paths:
        assert Image.open(p).size == (215, 215)
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(root / "b" / p.name)))
    missing = run(cmd + ["--model", "models:/no-such-model@champion"], root, env, check=False)
    assert missing.returncode == 1 and "cannot load --model models:/no-such-model@champion" in missing.stderr
    assert "Registered models here: pokesprite." in missing.stderr
    typo = run(cmd + ["--model", "models:/pokesprite@champoin"], root, env, check=False)
    assert typo.returncode == 1 and re.search(r"pokesprite has versions 1(, \d+)*; aliases: @champion = version \d",
                                              typo.stderr), typo.stderr


def test_dvc_exp_run_with_a_changed_param(project):
    """A changed evaluate param re-runs the evaluation only and registers a second version."""
    root, env, _ = project
    from pokesprite.registry import beats, version_metrics

    exp = run(["dvc", "exp", "run", "-S", "evaluate.grid_seeds=3"], root, env)
    assert "Running stage 'evaluate'" in exp.stdout
    assert "Running stage 'finetune'" not in exp.stdout and "Running stage 'reference'" not in exp.stdout
    client = mlflow_client(root)
    assert len(client.search_model_versions("name='pokesprite'")) == 2
    v1, v2 = (client.get_model_version("pokesprite", str(v)) for v in (1, 2))
    # the workspace's params.yaml differs from the commit: the version says how, and is not "dirty"
    assert v2.tags["changed"] == "evaluate.grid_seeds 2 -> 3" and v2.tags["git_dirty"] == "false"
    assert v1.tags["changed"] == "none"
    promote, why = beats(version_metrics(v2), version_metrics(v1), alignment_tolerance=0.02)
    aliases = client.get_registered_model("pokesprite").aliases
    champion = int(aliases["champion"])
    assert champion == (2 if promote else 1) and v2.tags["promotion"] == why  # the tags hold the exact floats
    if champion == 1:
        assert int(aliases["challenger"]) == 2
    # models show: the two versions side by side, the one changed param named with both values
    shown = run([sys.executable, "-m", "pokesprite.cli", "models", "show", "2", "--against", "1"], root, env).stdout
    assert shown.startswith("pokesprite version 2 (@") and "against version 1," in shown
    assert re.search(r"^params that differ \(1 of \d+\):$", shown, re.M), shown
    assert re.search(r"^  evaluate\.grid_seeds\s+3\s+2$", shown, re.M), shown
    assert re.search(r"^  changed\s+evaluate\.grid_seeds 2 -> 3\s+none$", shown, re.M), shown
    kid = f"{version_metrics(v2)['kid']:.6g}"
    assert re.search(rf"^  kid\s+{re.escape(kid)}\s", shown, re.M), shown
    one = json.loads(run([sys.executable, "-m", "pokesprite.cli", "models", "show", "--json"], root, env).stdout)
    assert one["version"] == champion and one["params"]["evaluate.grid_seeds"] in ("2", "3")
    assert one["metrics"]["kid"] == version_metrics(client.get_model_version("pokesprite", str(champion)))["kid"]
    missing = run([sys.executable, "-m", "pokesprite.cli", "models", "show", "9"], root, env, check=False)
    assert missing.returncode == 1 and "no version 9 of 'pokesprite': pokesprite has versions 1, 2;" in missing.stderr


def test_registry_promotes_a_better_version_only(project, tmp_path):
    """Against the real registry: a worse candidate becomes challenger, a better one takes champion."""
    import mlflow

    from pokesprite.registry import CHAMPION, current_champion, register_evaluated

    root, env, _ = project
    client = mlflow_client(root)
    mlflow.set_registry_uri(mlflow.get_tracking_uri())
    name = "promotion-test"
    model_dir = root / "outputs/finetune/model"
    results = []
    assert current_champion(name) is None  # no such model yet
    with mlflow.start_run(run_name="promotion-test"):
        for kid, align in ((0.10, 0.3), (0.20, 0.9), (0.05, 0.1), (0.05, 0.29)):
            results.append(register_evaluated(model_dir, name, {"kid": kid, "independent_r_precision": align},
                                              {"git_commit": "test"}, alignment_tolerance=0.02,
                                              background=(0, 0, 0) if kid == 0.20 else (255, 255, 255)))
    assert [r["alias"] for r in results] == ["champion", "challenger", "challenger", "champion"]
    signature = mlflow.models.get_model_info(f"models:/{name}/{results[1]['version']}").signature
    assert {p.name: p.default for p in signature.params.params}["background"] == "#000000"  # data.background
    assert "not below" in results[1]["reason"] and "text alignment" in results[2]["reason"]
    assert int(current_champion(name).version) == results[3]["version"]
    assert client.get_model_version(name, str(results[0]["version"])).tags["replaced_by"] == str(results[3]["version"])
    assert int(client.get_registered_model(name).aliases[CHAMPION]) == results[3]["version"]
    assert client.get_model_version(name, str(results[0]["version"])).tags["git_commit"] == "test"

    # Prefect retries a flow run's evaluate task: the retry finishes the version its first attempt
    # registered (here cut short before its tags and alias) instead of registering the model again.
    def register(kid, flow_run):
        return register_evaluated(model_dir, name, {"kid": kid, "independent_r_precision": 0.5},
                                  {"git_commit": "test", "prefect_flow_run_id": flow_run},
                                  alignment_tolerance=0.02, background=(255, 255, 255))

    with mlflow.start_run(run_name="retry-test"):
        worse = register(0.5, "flow-run-a")
        client.delete_model_version_tag(name, str(worse["version"]), "metric.kid")
        client.delete_registered_model_alias(name, "challenger")
        retried = register(0.5, "flow-run-a")
        better = register(0.01, "flow-run-b")
        retried_better = register(0.01, "flow-run-b")
    assert retried == worse and worse["alias"] == "challenger"
    assert retried_better == better and better["alias"] == CHAMPION
    assert len(client.search_model_versions(f"name='{name}'")) == 6
    assert client.get_model_version(name, str(worse["version"])).tags["metric.kid"] == "0.5"
    aliases = client.get_registered_model(name).aliases
    assert int(aliases["challenger"]) == worse["version"] and int(aliases[CHAMPION]) == better["version"]

    # A registration killed after register_model (no metrics, no alias, no promotion): a later run of
    # the same model, in another flow run or none, finishes that version instead of adding a seventh.
    from pokesprite.registry import FINGERPRINT_TAG, log_model, model_fingerprint

    with mlflow.start_run(run_name="killed"):
        info = log_model(model_dir, background=(255, 255, 255))
        killed = mlflow.register_model(info.model_uri, name, tags={
            FINGERPRINT_TAG: model_fingerprint(model_dir, (255, 255, 255))}).version
    listed = run([sys.executable, "-m", "pokesprite.cli", "models", "list", "--name", name], root, env).stdout
    assert re.search(rf"^{killed}\s+unfinished\s", listed, re.M), listed
    with mlflow.start_run(run_name="after-the-kill"):
        finished = register(0.9, "flow-run-c")
    assert finished["version"] == int(killed) and finished["alias"] == "challenger"
    assert len(client.search_model_versions(f"name='{name}'")) == 7
    tags = client.get_model_version(name, killed).tags
    assert tags["metric.kid"] == "0.9" and tags["prefect_flow_run_id"] == "flow-run-c" and "promotion" in tags
    assert int(client.get_registered_model(name).aliases["challenger"]) == int(killed)  # the alias moved to it
    # killed after it took the champion alias, before recording why: finished as champion, not against itself
    with mlflow.start_run(run_name="killed-as-champion"):
        info = log_model(model_dir, background=(9, 9, 9))
        champ = mlflow.register_model(info.model_uri, name, tags={
            FINGERPRINT_TAG: model_fingerprint(model_dir, (9, 9, 9))}).version
    client.set_registered_model_alias(name, CHAMPION, champ)
    with mlflow.start_run(run_name="after-the-second-kill"):
        again = register_evaluated(model_dir, name, {"kid": 0.3, "independent_r_precision": 0.5}, {},
                                   alignment_tolerance=0.02, background=(9, 9, 9))
    assert again == {"version": int(champ), "alias": CHAMPION,
                     "reason": "promoted by a run that was killed before it recorded why"}
    aliases = client.get_registered_model(name).aliases
    assert int(aliases[CHAMPION]) == int(champ) and int(aliases["challenger"]) == int(killed)

    # Exact metrics: the same KID again is a tie, which keeps the champion (a rounded tag once made it win).
    kid = 0.4070195677542847
    protocol_a = {"fingerprint": "aaaaaaaaaaaa", "description": "64 captions, ddim 10 steps"}
    protocol_b = {"fingerprint": "bbbbbbbbbbbb", "description": "180 captions, ddpm 50 steps"}
    with mlflow.start_run(run_name="protocol-test"):
        first = register_evaluated(model_dir, "protocol-test", {"kid": kid, "independent_r_precision": 0.1},
                                   {}, alignment_tolerance=0.02, background=(255, 255, 255), protocol=protocol_a)
        tie = register_evaluated(model_dir, "protocol-test", {"kid": kid, "independent_r_precision": 0.1},
                                 {}, alignment_tolerance=0.02, background=(255, 255, 255), protocol=protocol_a)
        # a far better KID, measured otherwise: not compared, so the champion stays
        other = register_evaluated(model_dir, "protocol-test", {"kid": 0.01, "independent_r_precision": 0.9},
                                   {}, alignment_tolerance=0.02, background=(255, 255, 255), protocol=protocol_b)
    assert (first["alias"], tie["alias"], other["alias"]) == (CHAMPION, "challenger", "challenger")
    assert tie["reason"] == "KID 0.40702 is not below the champion's 0.40702"
    assert other["reason"].startswith(f"not compared: champion version {first['version']} was evaluated under "
                                      "another protocol (64 captions, ddim 10 steps), this version under 180 captions")
    assert client.get_model_version("protocol-test", str(other["version"])).tags["eval_protocol"] == "bbbbbbbbbbbb"
    promoted = run([sys.executable, "-m", "pokesprite.cli", "models", "promote", str(other["version"]),
                    "--name", "protocol-test"], root, env)
    assert f"version {other['version']} is now the champion (was version {first['version']})" in promoted.stdout
    aliases = client.get_registered_model("protocol-test").aliases
    assert int(aliases[CHAMPION]) == other["version"] and "challenger" not in aliases  # it held challenger
    assert client.get_model_version("protocol-test", str(first["version"])).tags["replaced_by"] == str(other["version"])
    listed = run([sys.executable, "-m", "pokesprite.cli", "models", "list", "--name", "protocol-test"], root, env)
    assert "Metrics measured under different protocols do not compare" in listed.stdout
    nope = run([sys.executable, "-m", "pokesprite.cli", "models", "promote", "99", "--name", "protocol-test"], root,
               env, check=False)
    assert nope.returncode == 1
    assert "no version 99 of 'protocol-test': protocol-test has versions 1, 2, 3" in nope.stderr


def test_train_cli_runs_a_stage_from_the_previous_stages_checkpoint(project, tmp_path):
    """`pokesprite train --stage 2` finds the VAE's best.pt itself, logs to the named experiment, and
    refuses a missing checkpoint or a mismatched --resume with an error that names them."""
    root, env, _ = project
    other = tmp_path / "other"  # a separate project folder, so the DVC-tracked outputs stay untouched
    for part in ("preprocess", "vae"):
        shutil.copytree(root / "outputs" / part, other / "outputs" / part)
    cli = [sys.executable, "-m", "pokesprite.cli", "train", "--config", str(root / "params.yaml"), "--root", str(other)]
    stats = run([*cli[:-1], str(root), "--data-stats"], root, env)
    assert "sprites: 16" in stats.stdout
    run(cli + ["--stage", "2", "--experiment-name", "cli-experiment"], root, env)
    ckpt = torch.load(other / "outputs/diffusion/last.pt", weights_only=False)
    assert ckpt["kind"] == "diffusion" and ckpt["epoch"] == 2 and ckpt["vae_checkpoint"].endswith("vae/best.pt")
    assert (other / "outputs/diffusion/best.pt").is_file() and any((other / "tb/diffusion").iterdir())
    client = mlflow_client(other)
    exp = client.get_experiment_by_name("cli-experiment")
    assert [r.data.tags["stage"] for r in client.search_runs([exp.experiment_id])] == ["diffusion"]

    missing = run(cli + ["--stage", "3", "--diffusion-checkpoint", str(tmp_path / "nope.pt")], root, env, check=False)
    assert missing.returncode == 2 and "nope.pt: no such checkpoint (--diffusion-checkpoint)" in missing.stderr
    mismatch = run(cli + ["--stage", "1", "--resume", str(other / "outputs/diffusion/last.pt")], root, env,
                   check=False)
    assert mismatch.returncode == 2 and "holds a diffusion checkpoint but --stage 1 is vae" in mismatch.stderr


def test_a_fresh_clone_pulls_every_output_from_a_remote_and_has_nothing_to_reproduce(project, tmp_path):
    """`dvc push` to a (local-folder) remote, `git clone`, `dvc pull`: the clone has the data and every
    stage's output, and `dvc repro` there runs nothing. Cached checkpoints hold each set of weights once."""
    from pokesprite.train.loop import is_state_dict

    root, env, _ = project
    for stage in ("vae", "diffusion", "finetune"):
        best = torch.load(root / "outputs" / stage / "best.pt", weights_only=True)
        last = torch.load(root / "outputs" / stage / "last.pt", weights_only=True)
        assert "train" not in best and not any(is_state_dict(v) for v in last.values()), stage
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "trained, with a remote"], root, env)
    pushed = run(["dvc", "push"], root, env)
    assert "pushed" in pushed.stdout
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "outputs").exists()
    run(["dvc", "pull"], clone, env)
    for path in ("outputs/finetune/model/pipeline.pt", "outputs/vae/best.pt", "outputs/diffusion/last.pt",
                 "data/pokemon.csv"):
        assert (clone / path).read_bytes() == (root / path).read_bytes(), path
    repro = run(["dvc", "repro"], clone, env)
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout, repro.stdout


@contextlib.contextmanager
def mlflow_server_on_postgresql(folder, env):
    """`make mlflow-server`'s command on 127.0.0.1: runs and registry in a throwaway PostgreSQL,
    artifacts stored by the server under ``folder``/artifacts; yields its URL."""
    with postgres_database() as database:
        port = free_port()
        log = folder / "mlflow-server.log"
        server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", database, "--serve-artifacts",
                                   "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=folder, env=env, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", server, log=log)
            yield f"http://127.0.0.1:{port}"
        finally:
            if server.poll() is None:
                os.killpg(server.pid, 15)
            server.wait(timeout=60)


def test_a_fresh_clone_killed_in_the_vae_reproduces_the_committed_lock_to_the_byte_on_a_shared_server(
        project, raw_subset, tmp_path):
    """Two people who run `dvc repro` on the same commit agree on dvc.lock, even when one's run dies: a
    fresh clone with only the data (imported, as `make data` does) trains every stage from scratch,
    on the CPU, is killed (SIGKILL, every process of it) after the vae's first epoch, and its next
    `dvc repro` keeps the stages that had finished, marks the dead MLflow run KILLED and the dead
    Prefect flow run Crashed, resumes the vae from its last.pt and ends with the committed dvc.lock,
    metrics and plots unchanged (`git status` clean): the same weights as the uninterrupted run.

    The clone reports to a team's shared MLflow server on PostgreSQL (artifacts stored by the server),
    as the README's `make mlflow-server` recipe sets it up: the server ends with one finished run per
    stage and the clone's champion, which a new process loads by alias through the server and asks
    to draw."""
    root, env, _ = project
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "trained", "--allow-empty"], root, env)
    clone = tmp_path / "fresh"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    run([sys.executable, "-m", "pokesprite.cli", "data", "import", str(raw_subset)], clone, env)
    assert "Running stage" not in run(["dvc", "status", "data.dvc"], clone, env).stdout
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    flow_runs = textwrap.dedent("""
        import json
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            print(json.dumps({str(r.id): [r.name, r.state.type.value] for r in client.read_flow_runs()}))
    """)
    before = json.loads(run([sys.executable, "-c", flow_runs], tmp_path, env).stdout.splitlines()[-1])
    with mlflow_server_on_postgresql(server_dir, env) as url:
        served = {**env, "MLFLOW_TRACKING_URI": url}
        kill_dvc_repro_in(clone, served, "vae", after_epoch=1)
        repro = run(["dvc", "repro"], clone, served)
        script = textwrap.dedent("""
            import json, mlflow
            client = mlflow.MlflowClient()
            runs = client.search_runs([client.get_experiment_by_name("pokesprite").experiment_id])
            model = mlflow.pyfunc.load_model("models:/pokesprite@champion")
            images = model.predict(["a blue turtle"], params={"seed": 0, "num_steps": 2})
            print(json.dumps({"runs": sorted([r.data.tags["stage"], r.info.status] for r in runs),
                              "artifacts": sorted({r.info.artifact_uri.split(":")[0] for r in runs}),
                              "champion": client.get_model_version_by_alias("pokesprite", "champion").version,
                              "shape": list(images.shape)}))
        """)
        served_result = json.loads(run([sys.executable, "-c", script], tmp_path, served).stdout.splitlines()[-1])
    after = json.loads(run([sys.executable, "-c", flow_runs], tmp_path, env).stdout.splitlines()[-1])

    log = repro.stdout + repro.stderr
    for stage in STAGES:  # the stages that had finished before the kill are kept
        assert (f"Running stage '{stage}'" in repro.stdout) == (STAGES.index(stage) >= STAGES.index("vae")), stage
    resumed = re.search(r"vae: resuming from \S+ \(epoch (\d+) of 2\)", log)
    assert resumed and int(resumed[1]) >= 1, log[-4000:]
    assert re.search(r"MLflow run \w+ \(process \d+\) had died; marked KILLED", log), log[-4000:]
    assert re.search(r"Prefect flow run vae \(process \d+\) had died; marked Crashed", log), log[-4000:]
    new_runs = sorted(tuple(v) for k, v in after.items() if k not in before)
    assert new_runs == sorted([(stage, "COMPLETED") for stage in STAGES] + [("vae", "CRASHED")]), new_runs
    assert [line.split(",")[0] for line in (clone / "plots/vae.csv").read_text().splitlines()[1:]] == ["1", "2"]

    status = run(["git", "status", "--porcelain"], clone, env).stdout
    assert status == "", f"the clone's dvc repro changed tracked files:\n{status}\n" + \
        run(["git", "diff", "--stat"], clone, env).stdout
    assert (clone / "dvc.lock").read_bytes() == (root / "dvc.lock").read_bytes()
    # Both clones share one Python environment here; people's do not. So no output may name it (as
    # stats.json once named the tokenizer by its install path), nor either project folder.
    places = [p for p in (str(clone), str(root), sys.prefix) if len(p) > 8]
    for path in (clone / "outputs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for place in places:
                assert place.encode() not in data, f"{path.relative_to(clone)} holds the path {place}"

    # The shared server has the clone's runs, stored by the server (mlflow-artifacts:, not this disk's
    # paths), and serves its champion; the clone's own mlruns/ got nothing.
    assert served_result == {"runs": sorted([[stage, "FINISHED"] for stage in STAGES] + [["vae", "KILLED"]]),
                             "artifacts": ["mlflow-artifacts"], "champion": "1", "shape": [1, 215, 215, 3]}
    assert list((server_dir / "artifacts").rglob("pipeline.pt"))
    assert list((server_dir / "artifacts").rglob("sample_grid.png"))
    assert not (clone / "mlruns" / "mlflow.db").exists()
