"""Where runs are written and what they carry, against real sqlite MLflow stores and real git repos.

The project's store is found from inside DVC's temporary experiment workspace; a new store created
by parallel processes at once stays intact; each stage's run is named after its stage and DVC
experiment, carries the experiment's tags and a summary of the params it changed, and logs every
param; each run gets its own TensorBoard folder.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import TESTS
from pokesprite import lineage, tracking
from pokesprite.config import flatten, load_params, to_dict


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No tracking URI or DVC experiment from the calling shell; MLflow's global URI restored after."""
    import mlflow

    before = mlflow.get_tracking_uri()
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "_configured_uri", None)
    yield
    mlflow.set_tracking_uri(before)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri copies the URI there


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A new, empty MLflow sqlite store, made once: creating one runs MLflow's migrations (seconds)."""
    import mlflow

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def with_store(root: Path, empty_store: Path) -> Path:
    """``root`` holding a copy of the empty store as its mlruns/mlflow.db."""
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, root / "mlruns" / "mlflow.db")
    return root


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, empty_store) -> Path:
    """A git repository with the tiny params.yaml committed (and an empty MLflow store, ignored)."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@pokesprite")
    git(root, "config", "user.name", "pokesprite tests")
    (root / "params.yaml").write_text((TESTS / "tiny_params.yaml").read_text())
    (root / ".gitignore").write_text("/mlruns/\n/tb/\n")
    git(root, "add", "params.yaml", ".gitignore")
    git(root, "commit", "-qm", "params")
    return with_store(root, empty_store)


def set_param(root: Path, section: str, key: str, sub: str, value) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw[section][key][sub] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


# ---- the project's store -----------------------------------------------------------------------

def test_project_root_maps_dvc_temp_workspace_to_the_original(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpk2j4x1"
    (copy / "sub").mkdir(parents=True)
    assert tracking.project_root(project) == project.resolve()
    assert tracking.project_root(copy) == project.resolve()
    assert tracking.project_root(copy / "sub") == project.resolve()
    assert tracking.project_root(project / ".dvc" / "tmp" / "exps") == (project / ".dvc/tmp/exps").resolve()
    monkeypatch.chdir(copy)
    assert tracking.project_root() == project.resolve()
    assert tracking.default_tracking_uri() == f"sqlite:///{project.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))  # DVC's word for the original repository wins
    assert tracking.project_root(copy) == (tmp_path / "elsewhere").resolve()


def test_tracking_uri_honours_the_variable_and_anchors_relative_sqlite_paths(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(copy) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")  # absolute: as given
    assert tracking.tracking_uri(copy) == f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")  # relative: to the project
    assert tracking.tracking_uri(copy) == f"sqlite:///{project.resolve()}/mlruns/mlflow.db"


def test_configure_mlflow_follows_the_project_not_its_own_earlier_choice(tmp_path, empty_store):
    import mlflow

    a, b = with_store(tmp_path / "a", empty_store), with_store(tmp_path / "b", empty_store)
    assert tracking.configure_mlflow(a) == f"sqlite:///{a.resolve()}/mlruns/mlflow.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri()  # MLflow exported it
    assert tracking.configure_mlflow(b) == f"sqlite:///{b.resolve()}/mlruns/mlflow.db"
    tracking.ensure_experiment("in-b")
    with sqlite3.connect(b / "mlruns/mlflow.db") as in_b, sqlite3.connect(a / "mlruns/mlflow.db") as in_a:
        query = "SELECT count(*) FROM experiments WHERE name = 'in-b'"
        assert in_b.execute(query).fetchone() == (1,) and in_a.execute(query).fetchone() == (0,)


def test_a_tracking_server_that_does_not_answer_is_named_at_once(monkeypatch):
    import http.server
    import socket
    import threading
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"the MLflow tracking server http://127.0.0.1:{dead} does not answer "
                                         r"\(.*refused.*\): start it \(make mlflow-server\) or fix "
                                         r"MLFLOW_TRACKING_URI"):
        tracking.configure_mlflow()
    assert time.perf_counter() - start < 5  # not MLflow's minutes of retries

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_port}")  # answers: no error
        with pytest.raises(ValueError, match="does not answer \\(HTTP 404"):
            tracking.check_server(f"http://127.0.0.1:{server.server_port}/some/prefix")
    finally:
        server.shutdown()
    tracking.check_server("sqlite:////nowhere/mlflow.db")  # not a server: nothing to check


def test_a_copied_store_is_refused_before_it_writes_into_the_original(tmp_path, empty_store):
    """MLflow records absolute artifact paths: runs logged from a copied mlruns/ would land in the original."""
    a = with_store(tmp_path / "a", empty_store)
    tracking.configure_mlflow(a)
    tracking.ensure_experiment("pokesprite")
    assert any((a / "mlruns").iterdir())
    shutil.copytree(a / "mlruns", tmp_path / "b" / "mlruns")
    tracking.configure_mlflow(tmp_path / "b")
    with pytest.raises(ValueError, match=r"keeps its artifacts in .*/a/mlruns/artifacts, outside this store's "
                                         r"folder .*/b/mlruns: this mlruns/ was copied or moved"):
        tracking.ensure_experiment("pokesprite")
    tracking.configure_mlflow(a)
    assert tracking.ensure_experiment("pokesprite")  # the original is fine


WORKER = textwrap.dedent("""
    import os, sys, time
    import mlflow
    from mlflow.exceptions import MlflowException
    from pokesprite.tracking import configure_mlflow, ensure_experiment, store_lock

    root, go, kid = sys.argv[1], sys.argv[2], float(sys.argv[3])
    open(go + "." + sys.argv[3], "w").close()  # ready: MLflow imported
    while not os.path.exists(go):  # start together: all open the new store at once
        time.sleep(0.005)
    configure_mlflow(root)
    experiment_id = ensure_experiment("race", root)
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metrics({"kid": kid, "step_metric": 1.0})
        with store_lock():  # the champion decision: read, register, move the alias
            if not client.search_registered_models(filter_string="name='m'"):
                client.create_registered_model("m")
            try:
                champion = client.get_model_version_by_alias("m", "champion")
            except MlflowException:
                champion = None
            version = client.create_model_version("m", source=run.info.artifact_uri, run_id=run.info.run_id)
            client.set_model_version_tag("m", version.version, "kid", str(kid))
            if champion is None or float(champion.tags["kid"]) > kid:
                client.set_registered_model_alias("m", "champion", version.version)
    print("ok", version.version)
""")


def test_parallel_processes_create_and_share_a_new_store(tmp_path):
    """Two processes open a store that does not exist yet at the same moment (as `dvc queue start
    -j N` workers do on a fresh project), log a run each and register a version each: the store is
    created once, intact, with every run and version, and the champion is the lowest KID."""
    root, go = tmp_path / "project", tmp_path / "go"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    kids = (0.3, 0.1)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(go), str(k)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in kids]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0 and out.startswith("ok"), err[-3000:]

    import mlflow

    db = root / "mlruns" / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not [t for t in tables if t.startswith("_alembic_tmp")]  # no half-done migration
    client = mlflow.MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.data.metrics["kid"] for r in runs) == sorted(kids)
    versions = client.search_model_versions("name='m'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert float(client.get_model_version_by_alias("m", "champion").tags["kid"]) == min(kids)


def test_store_lock_waits_then_names_the_lock_file(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pokesprite.tracking import store_lock
        with store_lock({uri!r}):
            print("held", flush=True)
            time.sleep(3)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError, match=r"mlflow\.db\.lock: still locked after 0 s"):
        with tracking.store_lock(uri, timeout=0.2):
            pass
    holder.wait(timeout=30)
    with tracking.store_lock(uri, timeout=5) as path:  # free again
        with tracking.store_lock(uri, timeout=0.2):  # and re-entrant within a process
            assert path == tmp_path / "mlruns" / "mlflow.db.lock"


# ---- experiments and runs ----------------------------------------------------------------------

def test_ensure_experiment_opens_in_the_training_view(tmp_path, empty_store):
    import mlflow

    tracking.configure_mlflow(with_store(tmp_path, empty_store))
    client = mlflow.MlflowClient()
    new = tracking.ensure_experiment("fresh")
    exp = client.get_experiment(new)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
    old = client.create_experiment("made-elsewhere")  # an experiment from before the tag
    assert tracking.ensure_experiment("made-elsewhere") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.delete_experiment(old)
    with pytest.raises(ValueError, match=f"'made-elsewhere' is deleted: restore it .*--experiment-id {old}"):
        tracking.ensure_experiment("made-elsewhere")
    assert tracking.experiment_url("http://127.0.0.1:5000/", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_stage_run_outside_an_experiment(repo):
    """`dvc repro` with an edited params.yaml: run named after the stage, every param logged, and the
    edit summarised against HEAD's params.yaml."""
    import mlflow

    set_param(repo, "finetune", "train", "epochs", 2)
    set_param(repo, "diffusion", "train", "lr", 0.002)
    params = load_params(repo / "params.yaml")
    with tracking.start_stage_run("evaluate", params, repo, {"prefect_flow_run_id": "f-1"}) as run:
        run_id = run.info.run_id
    got = mlflow.MlflowClient().get_run(run_id)
    assert got.info.run_name == "evaluate"
    assert got.info.experiment_id == mlflow.get_experiment_by_name("pokesprite").experiment_id
    tags = got.data.tags
    assert tags["stage"] == "evaluate" and tags["prefect_flow_run_id"] == "f-1"
    assert tags["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert tags["changed"] == "diffusion.train.lr 0.001 -> 0.002, finetune.train.epochs 1 -> 2"
    assert "dvc_exp_name" not in tags
    expected = {k: str(v) for k, v in flatten(to_dict(params)).items()}
    assert got.data.params == expected  # upstream stages' params too: vae.*, diffusion.*, ...
    assert got.data.params["vae.model.channels"] == "[8, 8, 16, 16]"
    assert (repo / "mlruns" / "mlflow.db").is_file()


def test_stage_run_logs_the_params_it_is_given(repo):
    import mlflow

    params = load_params(repo / "params.yaml")
    with tracking.start_stage_run("vae", params, repo, logged={"seed": 0, "vae.model.channels": [8, 16]}) as run:
        pass
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.params == {"seed": "0",
                                                                            "vae.model.channels": "[8, 16]"}


def test_stage_run_inside_a_queued_experiment_writes_to_the_project(repo, monkeypatch):
    """A stage running in DVC's temporary copy of the workspace, with the environment DVC gives it:
    the run lands in the original project's store, named and tagged after the experiment."""
    import mlflow

    baseline = git(repo, "rev-parse", "HEAD")
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    git(repo, "clone", "-q", str(repo), str(copy))  # same commits, as DVC's executor pushes them
    set_param(copy, "finetune", "train", "epochs", 3)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-3f2a1")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    monkeypatch.chdir(copy)
    params = load_params("params.yaml")
    with tracking.start_stage_run("evaluate", params, ".") as run:
        tb = tracking.tensorboard_run_dir(".", "evaluate", run.info.run_id)
    assert mlflow.get_tracking_uri() == f"sqlite:///{repo.resolve()}/mlruns/mlflow.db"
    assert not (copy / "mlruns").exists()
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.info.run_name == "evaluate · exp-3f2a1"
    assert got.data.tags["dvc_exp_name"] == "exp-3f2a1" and got.data.tags["dvc_exp_baseline_rev"] == baseline
    assert got.data.tags["changed"] == "finetune.train.epochs 1 -> 3"
    assert got.data.params["finetune.train.epochs"] == "3"
    assert tb.parent == repo.resolve() / "tb" / "evaluate"
    assert tb.name.endswith(f"_exp-3f2a1_{run.info.run_id[:8]}")
    assert lineage.lineage_tags(copy)["dvc_exp_name"] == "exp-3f2a1"  # and onto the registered version


def test_tensorboard_gets_one_folder_per_run(tmp_path):
    first = tracking.tensorboard_run_dir(tmp_path, "vae", "0123456789abcdef")
    second = tracking.tensorboard_run_dir(tmp_path, "vae")
    third = tracking.tensorboard_run_dir(tmp_path, "vae")
    assert first.parent == second.parent == third.parent == tmp_path.resolve() / "tb" / "vae"
    assert first.name.endswith("_01234567") and len({first, second, third}) == 3
    assert all(p.is_dir() for p in (first, second, third))


# ---- params changes ---------------------------------------------------------------------------

def test_param_changes_and_their_summary():
    changes = lineage.param_changes({"a.lr": 0.001, "a.ch": [8, 16], "b": "x", "new": True},
                                    {"a.lr": 0.0002, "a.ch": [8, 16], "b": "x", "gone": 1})
    assert changes == {"a.lr": (0.0002, 0.001), "gone": (1, None), "new": (None, True)}
    assert lineage.format_changes(changes) == "a.lr 0.0002 -> 0.001, gone 1 -> (unset), new (unset) -> True"
    assert lineage.format_changes({}) == "none"
    assert lineage.format_changes({"k" * 50: (1, 2)}, limit=20) == "k" * 17 + "..."


def test_committed_params_reads_a_commit_not_the_workspace(repo):
    set_param(repo, "vae", "train", "epochs", 9)
    committed = lineage.committed_params(repo, "HEAD")
    assert committed["vae.train.epochs"] == 2 and committed["finetune.train.epochs"] == 1
    assert committed == flatten(to_dict(load_params(TESTS / "tiny_params.yaml")))
    assert lineage.committed_params(repo, "no-such-rev") is None


def test_only_a_missing_model_or_alias_reads_as_no_champion(tmp_path, empty_store, monkeypatch):
    """A registry that fails must not read as "no champion yet": that promotes without comparing."""
    import mlflow

    from pokesprite.registry import CHAMPION, current_champion

    tracking.configure_mlflow(with_store(tmp_path, empty_store))
    client = mlflow.MlflowClient()
    assert current_champion("sprites") is None  # no such model
    client.create_registered_model("sprites")
    assert current_champion("sprites") is None  # a model without the alias
    with mlflow.start_run():
        mlflow.log_text("x", "x.txt")
        source = mlflow.get_artifact_uri("x.txt")
    client.create_model_version("sprites", source)
    client.set_registered_model_alias("sprites", CHAMPION, "1")
    assert str(current_champion("sprites").version) == "1"

    def unavailable(self, name):
        raise mlflow.exceptions.MlflowException("the registry is unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "get_registered_model", unavailable)
    with pytest.raises(mlflow.exceptions.MlflowException, match="unavailable"):
        current_champion("sprites")


def test_lineage_tags_name_upstream_stages_and_ignore_the_runs_own_files(tmp_path):
    """dvc_lock.<stage> is the md5 of the stage's model/data outputs (metrics and plots left out), the
    running stage is left out, and git_dirty ignores dvc.lock, metrics/, plots/ and params.yaml but
    not a code change."""
    root = tmp_path / "lin"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@pokesprite")
    git(root, "config", "user.name", "pokesprite tests")
    (root / "metrics").mkdir()
    for name in ("params.yaml", "dvc.lock", "code.py", "metrics/m.json"):
        (root / name).write_text("a\n")
    git(root, "add", ".")
    git(root, "commit", "-qm", "x")
    (root / "dvc.lock").write_text(
        "stages:\n"
        "  vae:\n    outs:\n    - path: outputs/vae\n      md5: aaa.dir\n    - path: metrics/vae.json\n      md5: mmm\n"
        "  evaluate:\n    outs:\n    - path: outputs/evaluate\n      md5: eee.dir\n")
    (root / "params.yaml").write_text("b\n")
    (root / "metrics" / "m.json").write_text("b\n")
    tags = lineage.lineage_tags(root, running="evaluate")
    assert tags["dvc_lock.vae"] == "aaa.dir"
    assert "dvc_lock.evaluate" not in tags
    assert tags["git_dirty"] == "false"
    (root / "code.py").write_text("b\n")
    assert lineage.lineage_tags(root)["git_dirty"] == "true"
