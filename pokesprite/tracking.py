"""Experiment tracking behind one small interface, and where it is written.

``Tracker`` keeps metrics in memory only (tests, quick runs); ``MlflowTracker`` also writes them to
the active MLflow run. Tracking defaults to a sqlite database under the project's ``mlruns/`` with
artifacts beside it; ``MLFLOW_TRACKING_URI`` overrides it (a server, another database).

The project is the folder a stage runs in, except inside the temporary copy of the workspace that
``dvc exp run --queue`` / ``--temp`` runs stages in (``<project>/.dvc/tmp/exps/<tmp>/``, deleted
afterwards): there it is ``<project>``, so that queued experiments log and register in the project's
own store, not in a store that disappears with the copy. Parallel queue workers share that sqlite
store: ``configure_mlflow`` creates its tables under a file lock (MLflow 3.17 migrates a new database
without one, and two processes doing so at once leave it half-migrated), and ``store_lock`` lets a
read-decide-write sequence such as the champion decision run one process at a time.

Each stage's MLflow run is named ``<stage>`` or, inside a DVC experiment, ``<stage> · <experiment>``;
it logs the params of its own and every upstream stage (default: all of params.yaml), so that MLflow's
compare view shows what an experiment changed before the stage, and tags the experiment, its baseline
commit and a ``changed`` summary. Each run
has its own TensorBoard folder, ``tb/<stage>/<time>[_<experiment>][_<run id>]``: outside the stage's
DVC output, which DVC deletes before every run of the stage.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
TENSORBOARD_DIR = "tb"
EXP_WORKSPACES = (".dvc", "tmp", "exps")  # <project>/.dvc/tmp/exps/<tmp>: DVC's temporary experiment copies
# The experiment kind MLflow's UI records for model-training experiments (its ExperimentKind
# CUSTOM_MODEL_DEVELOPMENT). MLflow 3.17's UI decides the view by its sidebar switch instead (see
# ensure_experiment); the tag keeps the intent for UIs that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
LOCK_WAIT_NOTICE_S = 5.0  # log that the lock is held elsewhere after this long


def tracking_enabled() -> bool:
    """False when ``$POKESPRITE_TRACKING`` is ``off``: stages then log to TensorBoard and files only."""
    value = os.environ.get("POKESPRITE_TRACKING", "mlflow").strip().lower()
    if value not in ("mlflow", "off"):
        raise ValueError(f"POKESPRITE_TRACKING must be mlflow or off, got {value!r}")
    return value == "mlflow"


def project_root(root: Path | str | None = None) -> Path:
    """The project folder for ``root`` (default: the working directory): ``root`` itself, except inside
    DVC's temporary experiment workspace, ``<project>/.dvc/tmp/exps/<tmp>/``, where it is the repository
    DVC copied (``$DVC_ROOT``, which DVC sets to it for queued experiments, else ``<project>``)."""
    path = Path(root or Path.cwd()).resolve()
    parts, n = path.parts, len(EXP_WORKSPACES)
    for i in range(1, len(parts) - n):
        if parts[i:i + n] == EXP_WORKSPACES:
            return Path(os.environ.get("DVC_ROOT") or Path(*parts[:i])).resolve()
    return path


def default_tracking_uri(root: Path | str | None = None) -> str:
    return f"sqlite:///{project_root(root) / STORE_DIR / 'mlflow.db'}"


_configured_uri: str | None = None  # what configure_mlflow chose; MLflow copies it into $MLFLOW_TRACKING_URI


def tracking_uri(root: Path | str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` or the project's ``mlruns/mlflow.db``. A relative sqlite path in the
    variable (``sqlite:///mlruns/mlflow.db``) is taken relative to the project, not to DVC's copy.
    (``mlflow.set_tracking_uri`` writes the variable too: a value ``configure_mlflow`` put there for
    one project does not override the next project's default.)"""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env if env and env != _configured_uri else default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{project_root(root) / uri[len('sqlite:///'):]}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for a server or another database)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str | None = None, *, timeout: float = 3600.0):
    """Hold the store's file lock (``<database>.lock``, or ``<project>/mlruns/store.lock`` for a server):
    one process at a time, across processes. Re-entrant within a process; released by the OS if the
    holder dies."""
    from filelock import FileLock, Timeout

    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    path = db.with_name(db.name + ".lock") if db else project_root() / STORE_DIR / "store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=True)
    try:
        lock.acquire(timeout=min(LOCK_WAIT_NOTICE_S, timeout))
    except Timeout:
        log.info("waiting for %s (another run is writing to the MLflow store)", path)
        try:
            lock.acquire(timeout=max(timeout - LOCK_WAIT_NOTICE_S, 0))
        except Timeout:
            raise TimeoutError(f"{path}: still locked after {timeout:.0f} s by another process writing to the "
                               "MLflow store (a pokesprite stage or a `dvc queue` worker); let it finish or stop "
                               "it (`dvc queue status`, `dvc queue kill`), then run again") from None
    try:
        yield path
    finally:
        lock.release()


def configure_mlflow(root: Path | str | None = None, *, create: bool = True) -> str:
    """Point MLflow at ``$MLFLOW_TRACKING_URI`` or the project's ``mlruns/mlflow.db``; return the URI.

    A sqlite store is created (tables, migrations) under ``store_lock``, before anything else opens it;
    with ``create=False`` (commands that only read: generate, serve, models list) a missing one is a
    FileNotFoundError that says where to run from, instead of a new empty store.
    """
    import mlflow

    global _configured_uri
    uri = tracking_uri(root)
    check_server(uri)
    if not create and (db := sqlite_path(uri)) is not None and not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}: run this in the project folder (make repro makes "
                                "mlruns/ there), or set MLFLOW_TRACKING_URI to your tracking server")
    if os.environ.get("MLFLOW_TRACKING_URI") != uri:
        _configured_uri = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if (db := sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(uri):
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # opening the store creates and migrates its tables
            client.search_registered_models(max_results=1)
    return uri


def check_server(uri: str, timeout: float = 10.0) -> None:
    """An http(s) tracking URI must answer MLflow's ``/health``, checked before any work: MLflow's own
    client retries a server that is down for minutes per call. A ValueError says what to fix."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as answer:
            if answer.status == 200:
                return
            reason = f"HTTP {answer.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise ValueError(f"the MLflow tracking server {uri} does not answer ({reason}): start it (make mlflow-server) "
                     "or fix MLFLOW_TRACKING_URI")


def ensure_experiment(name: str, root: Path | str | None = None) -> str:
    """The id of experiment ``name``, created if missing with its artifacts under ``mlruns/artifacts``
    (not the sqlite default ./mlartifacts) and tagged as a model-training experiment.

    Which view MLflow 3.17's UI opens is set by its sidebar switch, "GenAI" / "Model training", kept
    in the browser (default GenAI: the traces overview), or by ``?workflowType=machine_learning`` in
    the address, which ``experiment_url`` adds; the experiment tag does not change it. Uses the store
    ``configure_mlflow`` chose (``root`` is accepted for older callers and unused).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        uri = mlflow.get_tracking_uri()
        db = sqlite_path(uri)
        location = (db.parent / "artifacts").resolve().as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:  # created by a parallel run since the lookup
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
                         f"--experiment-id {exp.experiment_id}) or set another mlflow.experiment in params.yaml")
    check_artifacts_are_local(exp)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before pokesprite tagged experiments
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def check_artifacts_are_local(exp) -> None:
    """A sqlite store's experiment must keep its artifacts beside the database (``mlruns/artifacts``).

    MLflow records absolute paths: an ``mlruns/`` copied or moved from another folder still points
    at the original's artifacts, and runs logged here would write into that project (or fail once it
    is gone). A ValueError says so before any training."""
    import mlflow
    from urllib.parse import unquote, urlparse

    db = sqlite_path(mlflow.get_tracking_uri())
    location = urlparse(exp.artifact_location or "")
    if db is None or location.scheme != "file":
        return
    artifacts = Path(unquote(location.path)).resolve()
    if not artifacts.is_relative_to(db.parent.resolve()):
        raise ValueError(f"{db}: MLflow experiment {exp.name!r} keeps its artifacts in {artifacts}, outside this "
                         f"store's folder {db.parent}: this mlruns/ was copied or moved from another project "
                         "(MLflow records absolute paths). Run from the original folder, or move mlruns/ aside "
                         "to start a new store here.")


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI at ``base`` (e.g. http://127.0.0.1:5000) that opens the experiment's
    runs (or the run) in the model-training view, whatever the browser's GenAI / Model training switch."""
    path = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#/{path}?workflowType=machine_learning"


def run_name(stage: str, experiment: str | None = None) -> str:
    """``evaluate`` or, inside the DVC experiment ``exp-3f2a1``, ``evaluate · exp-3f2a1``."""
    return f"{stage} · {experiment}" if experiment else stage


def stage_run_tags(stage: str, params, root: Path | str, tags: dict | None = None) -> dict[str, str]:
    """The tags of a stage's run: ``stage``, ``git_commit``, inside a DVC experiment ``dvc_exp_name``
    and ``dvc_exp_baseline_rev``, ``changed`` (the params that differ from params.yaml at the baseline
    commit, or at HEAD outside an experiment), plus ``tags``."""
    from pokesprite.config import flatten, to_dict
    from pokesprite.lineage import committed_params, dvc_experiment, format_changes, git_commit, param_changes

    experiment = dvc_experiment()
    out = {"stage": stage, **experiment}
    if commit := git_commit(Path(root)):
        out["git_commit"] = commit
    baseline = committed_params(Path(root), experiment.get("dvc_exp_baseline_rev", "HEAD"))
    if baseline is not None:
        out["changed"] = format_changes(param_changes(flatten(to_dict(params)), baseline))
    return {**out, **{k: str(v) for k, v in (tags or {}).items()}}


@contextlib.contextmanager
def start_stage_run(stage: str, params, root: Path | str = ".", tags: dict | None = None,
                    logged: dict | None = None):
    """Open the MLflow run of one stage in the project's store (see the module docstring): named after
    the stage and the DVC experiment, with ``stage_run_tags``, logging the flattened params ``logged``
    (default: every param of ``params``). Yields the active run."""
    import mlflow

    from pokesprite.config import flatten, to_dict
    from pokesprite.lineage import dvc_experiment

    configure_mlflow(root)
    experiment_id = ensure_experiment(params.mlflow.experiment, root)
    end_dead_runs(experiment_id, stage)
    name = run_name(stage, dvc_experiment().get("dvc_exp_name"))
    owner = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                          tags={**stage_run_tags(stage, params, root, tags), **owner}) as run:
        logged = flatten(to_dict(params)) if logged is None else logged
        mlflow.log_params({k: str(v)[:6000] for k, v in logged.items()})
        yield run


PID_TAG, HOST_TAG = "pokesprite.pid", "pokesprite.host"  # the process that runs a stage's MLflow run


def end_dead_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``stage`` whose process, on this machine, no longer exists
    (a stage killed with SIGKILL, or whose machine lost power, never ends its run); returns their ids."""
    import mlflow

    host, ended = socket.gethostname(), []
    running = mlflow.search_runs([experiment_id], output_format="list",
                                 filter_string=f"attributes.status = 'RUNNING' AND tags.stage = '{stage}'")
    for run in running:
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit() or pid_alive(int(tags[PID_TAG])):
            continue
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        log.info("%s: MLflow run %s (process %s) had died; marked KILLED", stage, run.info.run_id, tags[PID_TAG])
        ended.append(run.info.run_id)
    return ended


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def tensorboard_run_dir(base: Path | str, stage: str, run_id: str | None = None) -> Path:
    """A new folder for one run's TensorBoard events, ``<project>/tb/<stage>/<time>[_<experiment>][_<run id>]``
    (``base`` as for ``project_root``), so that every run of a stage stays viewable:
    ``tensorboard --logdir tb``."""
    from pokesprite.lineage import dvc_experiment

    parts = [dt.datetime.now().strftime("%Y%m%d-%H%M%S"), dvc_experiment().get("dvc_exp_name"),
             run_id[:8] if run_id else None]
    name = "_".join(p for p in parts if p)
    folder = project_root(base) / TENSORBOARD_DIR / stage
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = folder / (name if n == 1 else f"{name}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free run folder for {name}")


class Tracker:
    """Collects per-epoch metrics in memory and, given ``tensorboard_dir``, writes TensorBoard events.

    Per-step scalars (loss, learning rate, gradient norm) go to TensorBoard only; per-epoch metrics
    and images go everywhere. Subclasses also send them to an experiment tracker.
    """

    def __init__(self, tensorboard_dir: Path | None = None):
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    @property
    def writer(self):
        if self._writer is None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), flush_secs=30)
        return self._writer

    def log_step(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append((step, float(v)))
            if self.writer is not None:
                self.writer.add_scalar(f"epoch/{k}", float(v), step)

    def log_image(self, image, name: str) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(name.rsplit(".", 1)[0], np.asarray(image.convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker(Tracker):
    """Writes to the currently active MLflow run."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        super().log_metrics(metrics, step)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}, step=step)

    def log_image(self, image, name: str) -> None:
        import mlflow

        super().log_image(image, name)
        mlflow.log_image(image, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

