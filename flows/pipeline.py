"""Prefect flows: one per stage, and ``pipeline`` that runs all stages as tasks in order.

Each task is one line around a ``pokesprite.stages`` function; retries come from params.yaml
(section ``prefect``). Without ``PREFECT_API_URL`` Prefect runs an embedded API (flow runs are kept
in ``~/.prefect`` and appear in ``prefect server start``'s UI); with it set, runs are reported to
that server.
"""
from __future__ import annotations

from pathlib import Path

import flows  # noqa: F401  (environment defaults)
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pokesprite import stages
from pokesprite.config import Params, load_params


def lineage() -> dict:
    """MLflow tags that tie a stage's run to the Prefect flow run that executed it."""
    return {"prefect_flow_run_id": str(flow_run.id), "prefect_flow_run_name": str(flow_run.name)}


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(params: Params, root: str = ".") -> dict:
    return stages.run_preprocess(params, root=root, tags=lineage())


@task(name="alignment", cache_policy=NO_CACHE)
def alignment_task(params: Params, root: str = ".") -> dict:
    return stages.run_alignment(params, root=root, tags=lineage())


@task(name="vae", cache_policy=NO_CACHE)
def vae_task(params: Params, root: str = ".") -> dict:
    return stages.run_vae(params, root=root, tags=lineage())


@task(name="diffusion", cache_policy=NO_CACHE)
def diffusion_task(params: Params, root: str = ".") -> dict:
    return stages.run_diffusion(params, root=root, tags=lineage())


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(params: Params, root: str = ".") -> dict:
    return stages.run_finetune(params, root=root, tags=lineage())


@task(name="reference", cache_policy=NO_CACHE)
def reference_task(params: Params, root: str = ".") -> dict:
    return stages.run_reference(params, root=root, tags=lineage())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params, root: str = ".") -> dict:
    return stages.run_evaluate(params, root=root, tags=lineage())


TASKS = {"preprocess": preprocess_task, "reference": reference_task, "alignment": alignment_task, "vae": vae_task,
         "diffusion": diffusion_task, "finetune": finetune_task, "evaluate": evaluate_task}


def run_task(name: str, params_file: str, root: str) -> dict:
    params = load_params(Path(root) / params_file)
    retrying = TASKS[name].with_options(retries=params.prefect.retries,
                                        retry_delay_seconds=params.prefect.retry_delay_seconds)
    return retrying(params, root)


@flow(name="pokesprite-preprocess")
def preprocess_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("preprocess", params_file, root)


@flow(name="pokesprite-alignment")
def alignment_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("alignment", params_file, root)


@flow(name="pokesprite-vae")
def vae_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("vae", params_file, root)


@flow(name="pokesprite-diffusion")
def diffusion_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("diffusion", params_file, root)


@flow(name="pokesprite-finetune")
def finetune_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("finetune", params_file, root)


@flow(name="pokesprite-reference")
def reference_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("reference", params_file, root)


@flow(name="pokesprite-evaluate")
def evaluate_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    return run_task("evaluate", params_file, root)


@flow(name="pokesprite-pipeline")
def pipeline_flow(params_file: str = "params.yaml", root: str = ".") -> dict:
    """Every stage (preprocess ... evaluate) in one flow run, each a task with retries."""
    return {name: run_task(name, params_file, root) for name in stages.STAGES}


FLOWS = {"preprocess": preprocess_flow, "reference": reference_flow, "alignment": alignment_flow, "vae": vae_flow,
         "diffusion": diffusion_flow, "finetune": finetune_flow, "evaluate": evaluate_flow, "pipeline": pipeline_flow}
