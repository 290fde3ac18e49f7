"""Shared fixtures: a 16-sprite slice of the real dataset and the tiny params profile."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `make test` runs the suite in parallel processes (pytest-xdist): each gets its share of the cores for
# torch's threads, and so does every process its tests start. Set before torch is first imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402

from flows.server import free_port  # noqa: E402
from flows.server import prefect_server as start_prefect_server  # noqa: E402
from pokesprite.config import load_params  # noqa: E402
from pokesprite.data import raw  # noqa: E402

TESTS = Path(__file__).parent
ROOT = TESTS.parent
N_SPRITES = 16


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, in their own order: the parallel workers of `make test` are handed
    whole files (``--dist loadfile``) in this order, so the longest work starts first and they finish
    together."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def make_subset(source: Path, dest: Path, n: int = N_SPRITES) -> Path:
    """Copy the first ``n`` sprites of a raw dataset, with their caption lines and table rows."""
    (dest / raw.IMAGES_DIR).mkdir(parents=True)
    for i in range(1, n + 1):
        shutil.copyfile(source / raw.IMAGES_DIR / f"{i:03d}.png", dest / raw.IMAGES_DIR / f"{i:03d}.png")
    lines = (source / raw.CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()[:n]
    (dest / raw.CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    table = (source / raw.TABLE_FILE).read_bytes().decode("utf-16").split("\r\n")
    (dest / raw.TABLE_FILE).write_bytes("\r\n".join(table[:n + 1] + [""]).encode("utf-16"))
    return dest


@pytest.fixture(scope="session")
def full_source() -> Path:
    source = raw.default_source()
    if not source.is_absolute():
        source = (ROOT / source).resolve()
    if not (source / raw.IMAGES_DIR).is_dir():
        pytest.skip(f"raw dataset not found at {source}; set {raw.DEFAULT_SOURCE_ENV}")
    return source


@pytest.fixture(scope="session")
def raw_subset(full_source, tmp_path_factory) -> Path:
    return make_subset(full_source, tmp_path_factory.mktemp("raw") / "pokemon")


@pytest.fixture(scope="session")
def tiny_params():
    return load_params(TESTS / "tiny_params.yaml")


@pytest.fixture(scope="session")
def processed(raw_subset, tiny_params, tmp_path_factory) -> Path:
    from pokesprite.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("processed") / "preprocess"
    preprocess(tiny_params.data, raw_dir=raw_subset, out_dir=out, seed=tiny_params.seed)
    return out


def run(cmd, cwd, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dvc_project(root: Path, raw_subset: Path, params_text: str) -> dict:
    """A throwaway pokesprite project as a user has it: the code, dvc.yaml and ``params_text`` as
    params.yaml in a git repository with DVC, the raw subset imported and added; returns the
    environment to run its commands in (its own Prefect home, no MLflow or Prefect server from outside)."""
    for name in ("pokesprite", "flows"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copyfile(ROOT / name, root / name)
    (root / "params.yaml").write_text(params_text)
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(root / ".prefect"),
           "PYTHONUNBUFFERED": "1"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "POKESPRITE_TRACKING"):
        env.pop(var, None)  # (earlier tests in this process may have set them)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "test@pokesprite"],
                ["git", "config", "user.name", "pokesprite tests"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"],
                [sys.executable, "-m", "pokesprite.cli", "data", "import", str(raw_subset)],
                ["dvc", "add", "-q", "data"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        run(cmd, root, env)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_once_saved(proc: subprocess.Popen, last: Path, epoch: int, what: str) -> None:
    """SIGKILL ``proc`` and every process below it once the checkpoint ``last`` holds ``epoch``: what
    a power cut or the OOM killer leaves behind."""
    import torch

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if torch.load(last, weights_only=True)["epoch"] >= epoch:
                break
        except Exception:  # not there yet, or being replaced
            pass
        time.sleep(0.2)
    assert proc.poll() is None, f"{what} ended before epoch {epoch}"
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def kill_dvc_repro_in(root: Path, env: dict, stage: str, after_epoch: int) -> None:
    """Start ``dvc repro`` in ``root`` and kill it (``kill_once_saved``) in ``stage``."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_once_saved(proc, root / "outputs" / stage / "last.pt", after_epoch, f"dvc repro's {stage} stage")


@contextlib.contextmanager
def prefect_server(root: Path, env: dict):
    """One Prefect server for a project (``flows.server``'s, as `make repro` runs one), its API URL set
    in ``env``: the stages report to it instead of each starting a temporary server (~10 s a stage)."""
    log = root.parent / f"{root.name}-prefect-server.log"  # beside the project: not a file of its git tree
    with start_prefect_server(log, env) as api_url:
        env["PREFECT_API_URL"] = api_url
        yield api_url


@contextlib.contextmanager
def postgres_database():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with one database, ``mlflow``; yields its URI.

    Uses Debian's ``postgresql`` package (apt-get install -y postgresql, as root). PostgreSQL will not
    run as root: as root the cluster belongs to, and runs as, the package's ``postgres`` user."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # not on PATH there; the newest version
    initdb = shutil.which("initdb") or (debian[-1] if debian else None)
    if initdb is None:
        pytest.skip("needs PostgreSQL: apt-get install -y postgresql (as root)")
    bindir = Path(os.path.realpath(initdb)).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="pokesprite-pg-"))  # under /tmp: reachable by that user
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    server = None
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        server = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                                   "-p", str(port), "-k", str(folder)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.5)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
