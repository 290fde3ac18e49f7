"""Prefect flows that run the stages of ``pokesprite.stage_table``: no stage is named here.

``stage_flow`` runs one stage as one flow run (``pokesprite-stage``, the run named after the stage;
``python -m flows.run STAGE``, each DVC stage's command); ``pipeline_flow`` runs every stage, in
table order, as the tasks of one ``pokesprite-pipeline`` flow run. Each task is one call of the
stage's function, with the MLflow tags that tie its run to the flow run.

Retries (params.yaml ``prefect``) are for failures that may pass: an error that a retry would only
repeat (``PERMANENT``) fails at once. A training stage, retried or run again after an interruption
(its outputs persist under DVC), continues from its ``last.pt`` when that was trained under the same
params, inputs and code (``stage_table.prepare_run``), instead of from epoch 0. Flow runs are tagged
``stage:NAME`` (and ``dvc-exp:NAME`` inside ``dvc exp run``) and carry a link artifact to their
MLflow run. Without ``PREFECT_API_URL`` Prefect runs an embedded API (flow runs are kept in
``~/.prefect`` and appear in ``prefect server start``'s UI); with it set, runs go to that server.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pokesprite import stages
from pokesprite.config import ConfigError, Params, load_params
from pokesprite.data.raw import DatasetError
from pokesprite.stage_table import STAGES, prepare_run
from pokesprite.train import distributed
from pokesprite.train.stability import TrainingDiverged

log = logging.getLogger(__name__)
# Failures a retry would only repeat: a bad params value or dataset file, a diverged run, a missing
# input (data/ or an earlier stage's output), a checkpoint of the wrong kind (ValueError).
PERMANENT = (ConfigError, DatasetError, TrainingDiverged, FileNotFoundError, ValueError)
MLFLOW_UI = "http://127.0.0.1:5000"  # where `make ui` serves MLflow when the store is a local file


def is_permanent(exc: BaseException | None) -> bool:
    return isinstance(exc, PERMANENT)


def retry_transient(_task, _task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry unless the failure is one a retry would repeat."""
    return not is_permanent(state.data if isinstance(state.data, BaseException) else None)


def lineage() -> dict:
    """MLflow tags that tie a stage's run to the Prefect flow run that executed it."""
    return {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": str(flow_run.name)}


def run_tags(*names: str) -> list[str]:
    """Flow-run tags: the given ones, and the experiment's name when `dvc exp run` runs the stage."""
    exp = os.environ.get("DVC_EXP_NAME")
    return [*names, *([f"dvc-exp:{exp}"] if exp else [])]


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def stage_task(name: str, params: Params, root: str = ".", params_file: str = "params.yaml") -> dict:
    """One stage. A training stage continues from the last.pt of an interrupted run or of a failed
    attempt when it was trained under the same params, inputs and code (``prepare_run``)."""
    spec, layout = STAGES[name], stages.Layout(root)
    kwargs, mlflow_tags = {}, lineage()
    if spec.resumable:
        resume = prepare_run(name, params, layout)
        if resume is not None:
            kwargs["resume"], mlflow_tags["resumed_from"] = resume, str(resume)
    try:
        return spec.run(params, root=root, tags=mlflow_tags, **kwargs)
    except KeyboardInterrupt as e:  # flows.run prints the note after Prefect's own crash report
        if spec.resumable:
            e.add_note(stages.resume_hint(name, spec.number, layout, params_file=params_file,
                                          under_dvc="DVC_STAGE" in os.environ))
        raise


def run_stage(name: str, params_file: str, root: str) -> dict:
    """The stage as a task with the retries of params.yaml, then a link to its MLflow run."""
    params = load_params(Path(root) / params_file)
    # Under torchrun a retry of process 0 alone would wait for the others forever: torchrun restarts
    # the whole group instead (flows.run passes --max-restarts=prefect.retries).
    retries = 0 if distributed.launched() else params.prefect.retries
    retrying = stage_task.with_options(retries=retries,
                                       retry_delay_seconds=params.prefect.retry_delay_seconds)
    try:
        with tags(f"stage:{name}"):
            return retrying(name, params, root, params_file)
    finally:
        link_mlflow_run(name, params, root)


def link_mlflow_run(name: str, params: Params, root: str) -> None:
    """A link artifact on the flow run to the latest MLflow run of stage ``name`` that it started."""
    from pokesprite.tracking import configure_mlflow, experiment_url, tracking_enabled

    if not tracking_enabled():
        return
    try:
        import mlflow
        from prefect.artifacts import create_link_artifact

        uri = configure_mlflow(Path(root))
        runs = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list",
                                  filter_string=f"tags.prefect_flow_run_id = '{flow_run.id}' AND tags.stage = '{name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return
        info = runs[0].info
        base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
        create_link_artifact(experiment_url(base, info.experiment_id, info.run_id),
                             link_text=f"MLflow run of {name} ({info.status.lower()})", key=f"mlflow-{name}",
                             description=f"The MLflow run (params, metrics, images) of the {name} stage.")
    except Exception as e:  # a missing link must not hide the stage's own outcome
        log.warning("no MLflow link artifact for %s: %s", name, e)


def show_stage_logs() -> None:
    """pokesprite's INFO lines (epochs, resumes, timings) in the flow run's log, also when a worker
    started the run, whose logging Prefect set up before ``flows`` set PREFECT_LOGGING_EXTRA_LOGGERS."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("pokesprite")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())


@flow(name="pokesprite-stage", flow_run_name="{stage}")
def stage_flow(stage: str, params_file: str = "params.yaml", root: str = ".") -> dict:
    """One stage of the table (what `dvc repro` runs for it)."""
    if stage not in STAGES:  # a deployment's parameter, typed by hand
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    show_stage_logs()
    return run_stage(stage, params_file, root)


@flow(name="pokesprite-pipeline")
def pipeline_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    """Every stage (preprocess ... evaluate) in one flow run, each a task with retries."""
    show_stage_logs()
    return {name: run_stage(name, params_file, root) for name in STAGES}


def process_tags() -> list[str]:
    """Flow-run tags naming the process that runs it, so a later run can tell that it died."""
    return [f"host:{socket.gethostname()}", f"pid:{os.getpid()}"]


def end_dead_flow_runs() -> list[str]:
    """Mark Crashed the Running (or Pending) flow runs, and their running task runs, started on this
    machine by a process that no longer exists. A process killed with SIGKILL (or by the OOM killer,
    or a lost machine) cannot report its end, so without this its flow run stays Running in the UI
    forever. Returns the names of the runs marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                                FlowRunFilterStateType, FlowRunFilterTags, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from pokesprite.tracking import pid_alive

    live = [StateType.RUNNING, StateType.PENDING]
    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live)),
            tags=FlowRunFilterTags(all_=[f"host:{socket.gethostname()}"])))
        for run in runs:
            pid = next((t.removeprefix("pid:") for t in run.tags if t.startswith("pid:")), "")
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            message = (f"process {pid} on {socket.gethostname()} ended without reporting (killed); "
                       "marked when the next pokesprite run started")
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            for task_run in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live)))):
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            log.warning("Prefect flow run %s (process %s) had died; marked Crashed", run.name, pid)
            marked.append(run.name)
    return marked


def run_flow(stage: str, params_file: str = "params.yaml", root: str = ".") -> dict:
    """``stage`` (a name in the table) or ``pipeline`` as a tagged flow run, after marking the flow
    runs of killed processes Crashed."""
    try:
        end_dead_flow_runs()
    except Exception as e:  # tidying the record of earlier runs must not stop this one
        log.warning("could not check for flow runs of killed processes: %s", e)
    if stage == "pipeline":
        with tags(*run_tags("pipeline"), *process_tags()):
            return pipeline_flow(params_file=params_file, root=root)
    with tags(*run_tags(f"stage:{stage}"), *process_tags()):
        return stage_flow(stage=stage, params_file=params_file, root=root)
