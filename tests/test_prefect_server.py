"""``python -m flows.server -- CMD`` (what ``make repro`` runs): one real Prefect server for the whole
command, which every stage reports to, stopped afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, run
from flows.server import free_port, wait_until_up

CHILD = """
import os, sys, urllib.request
url = os.environ["PREFECT_API_URL"]
print(url)
with urllib.request.urlopen(url + "/health", timeout=5) as r:
    print("health", r.status)
sys.exit(3)
"""


def test_the_command_runs_against_a_server_that_answers_and_is_stopped_after(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = run([sys.executable, "-m", "flows.server", "--", sys.executable, "-c", CHILD], ROOT, env, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the command's own exit status
    url, health = proc.stdout.strip().splitlines()[-2:]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and health == "health 200"
    try:  # stopped at the end
        urllib.request.urlopen(url + "/health", timeout=2)
        raise AssertionError(f"the Prefect server at {url} still answers after the command ended")
    except OSError:
        pass


def test_a_configured_server_is_used_as_it_is(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "http://prefect.example:4200/api"}
    code = "import os; print(os.environ['PREFECT_API_URL'])"
    proc = run([sys.executable, "-m", "flows.server", "--", sys.executable, "-c", code], ROOT, env)
    assert proc.stdout.strip() == "http://prefect.example:4200/api"
    assert "Prefect server for this run" not in proc.stdout


def test_no_command_is_an_error_that_shows_the_usage():
    proc = run([sys.executable, "-m", "flows.server"], ROOT, dict(os.environ), check=False)
    assert proc.returncode == 2 and "python -m flows.server -- dvc repro" in proc.stderr


def test_a_server_that_exits_before_it_answers_is_an_error_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-c", "import sys; print('no database here'); sys.exit(2)"],
                                  stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 2.*no database here"):
        wait_until_up(f"http://127.0.0.1:{free_port()}/api/health", server, log, timeout=60)
