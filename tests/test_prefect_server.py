"""``python -m flows.server -- CMD`` (what ``make repro`` runs): one real Prefect server for the whole
command, which every stage reports to, stopped afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def test_a_prefect_profile_server_is_used_as_it_is(tmp_path):
    """`prefect config set PREFECT_API_URL=...` counts as much as the environment variable."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    run([str(Path(sys.executable).with_name("prefect")), "config", "set", "PREFECT_API_URL=http://prefect.example:4200/api"],
        ROOT, env)
    proc = run([sys.executable, "-m", "flows.server", "--", sys.executable, "-c", "print('ran')"], ROOT, env)
    assert proc.stdout.strip() == "ran" and "Prefect server for this run" not in proc.stdout


PATIENT_CHILD = """
import os, signal, sys, time
print(os.environ["PREFECT_API_URL"], flush=True)
got = []
signal.signal(signal.SIGINT, lambda *_: got.append("INT"))
while len(got) < 2:
    time.sleep(0.05)
time.sleep(2)  # still saving its work after the second Ctrl-C
print("done after", got, flush=True)
sys.exit(5)
"""


def started(cmd: list[str], env: dict, log) -> subprocess.Popen:
    """``cmd`` in a process group of its own, as a terminal runs it, once its child has printed a line."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and "/api\n" not in open(log.name).read():
        time.sleep(0.2)
    return proc


def test_ctrl_c_twice_and_sigterm_leave_the_server_up_until_the_command_ends(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    with open(tmp_path / "int.log", "w") as log:
        proc = started([sys.executable, "-m", "flows.server", "--", sys.executable, "-c", PATIENT_CHILD], env, log)
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.5)
        assert proc.wait(timeout=60) == 5  # the command's status: it ended first, not the wrapper
    assert "done after ['INT', 'INT']" in (tmp_path / "int.log").read_text()
    with open(tmp_path / "term.log", "w") as log:
        proc = started([sys.executable, "-m", "flows.server", "--", sys.executable, "-c",
                        "import os, time; print(os.environ['PREFECT_API_URL'], flush=True); time.sleep(120)"], env, log)
        url = (tmp_path / "term.log").read_text().splitlines()[-1]
        proc.send_signal(signal.SIGTERM)  # to the wrapper alone, as kill or timeout sends it
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # passed on to the command, which it ended
    with pytest.raises(OSError):  # and the server stopped after it
        urllib.request.urlopen(url + "/health", timeout=2)
