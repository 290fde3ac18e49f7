"""The Makefile's recipes as make expands them (``make -n``: printed, not run)."""
from __future__ import annotations

import subprocess

from conftest import ROOT


def dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_mlflow_server_gets_the_documented_defaults_exactly():
    """A comment after a default's value once became trailing spaces in the database name."""
    out = dry_run("mlflow-server")
    assert '--backend-store-uri "postgresql://mlflow:change-me@127.0.0.1:5432/mlflow" ' in out
    assert f'--artifacts-destination "{ROOT}/mlflow-server-artifacts"' in out
    assert "--host 127.0.0.1 --port 5000 " in out
    custom = dry_run("mlflow-server", "MLFLOW_DB=postgresql://u:p@db:5433/runs", "MLFLOW_HOST=0.0.0.0")
    assert '--backend-store-uri "postgresql://u:p@db:5433/runs" ' in custom and "--host 0.0.0.0 " in custom
