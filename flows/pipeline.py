"""Prefect flows: one per stage, and ``pipeline`` that runs the four stages as tasks in order.

Retries come from params.yaml (section ``prefect``). Without ``PREFECT_API_URL`` Prefect runs an
embedded API (flow runs are kept in ``~/.prefect`` and appear in ``prefect server start``'s UI);
with it set, runs are reported to that server.
"""
from __future__ import annotations

from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pokesprite import stages
from pokesprite.config import Params, load_params


def _tags() -> dict:
    return {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": str(flow_run.name)}


def _stage_task(name: str):
    runner = stages.RUNNERS[name]

    def run(params: Params, root: str = ".") -> dict:
        return runner(params, root=root, tags=_tags())

    run.__name__ = f"{name}_task"
    return task(run, name=name, cache_policy=NO_CACHE, log_prints=True)


TASKS = {name: _stage_task(name) for name in stages.STAGES}


def _with_retries(name: str, params: Params):
    return TASKS[name].with_options(retries=params.prefect.retries,
                                    retry_delay_seconds=params.prefect.retry_delay_seconds)


@flow(name="pokesprite-stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(stage: str, params_file: str = "params.yaml", root: str = ".") -> dict:
    """Run one stage (preprocess, vae, diffusion or finetune) as a Prefect task."""
    params = load_params(Path(root) / params_file)
    return _with_retries(stage, params)(params, root)


@flow(name="pokesprite-pipeline", log_prints=True)
def pipeline_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    """preprocess -> vae -> diffusion -> finetune, each a task with retries."""
    params = load_params(Path(root) / params_file)
    return {name: _with_retries(name, params)(params, root) for name in stages.STAGES}
