"""The Prefect deployments of prefect.yaml, deployed to a real Prefect server on 127.0.0.1 and run by a
process worker on the ``pokesprite`` work pool, as a team starts a stage from the UI or the CLI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TESTS, run
from flows.server import free_port, wait_until_up


def test_a_stage_deployment_runs_on_a_process_worker(raw_subset, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pokesprite", "flows"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "prefect.yaml", project / "prefect.yaml")
    shutil.copyfile(TESTS / "tiny_params.yaml", project / "params.yaml")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "POKESPRITE_TRACKING": "off",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    run([sys.executable, "-m", "pokesprite.cli", "data", "import", str(raw_subset)], project, env)
    processes = []

    def start(cmd, log):
        processes.append(subprocess.Popen(cmd, cwd=project, env=env, stdout=open(tmp_path / log, "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        return processes[-1]

    try:
        server = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server.log")
        wait_until_up(f"http://127.0.0.1:{port}/api/health", server, log=tmp_path / "server.log")
        run(["prefect", "work-pool", "create", "pokesprite", "--type", "process"], project, env)
        deployed = run(["prefect", "--no-prompt", "deploy", "--all"], project, env)
        assert "pokesprite-stage/stage" in deployed.stdout and "pokesprite-pipeline/pipeline" in deployed.stdout
        start(["prefect", "worker", "start", "--pool", "pokesprite"], "worker.log")
        started = run(["prefect", "deployment", "run", "pokesprite-stage/stage", "--param", "stage=preprocess",
                       "--watch", "--watch-timeout", "600"], project, env)
        assert "Flow run finished successfully in 'Completed'" in started.stdout, started.stdout[-3000:]
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    assert (project / "outputs/preprocess/index.csv").is_file()  # made by the worker, in the deployed folder
    worker = (tmp_path / "worker.log").read_text()
    assert "Flow run 'preprocess' - Finished in state Completed()" in worker, worker[-3000:]
    # the stage's own lines reach the flow run's log (Prefect's handlers, as prefect.yaml's env asks)
    assert "| INFO    | pokesprite.stages - preprocess done in" in worker, worker[-3000:]
