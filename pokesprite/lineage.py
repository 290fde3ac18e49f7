"""Where a model came from: the git commit, the DVC hashes of its stages and data, the Prefect flow run.

Read from the project's own files (``dvc.lock``, ``data.dvc``) without importing DVC, so the tags can
be written from inside a running ``dvc repro``: DVC records each stage in ``dvc.lock`` as it finishes,
so the stages upstream of the evaluation are already there.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


GENERATED = ("dvc.lock", "metrics/", "plots/")  # tracked files that `dvc repro` itself rewrites


def git_dirty(root: Path) -> bool | None:
    """Do tracked files differ from the commit (apart from what DVC writes during the run)?"""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = [line[3:] for line in out.stdout.splitlines() if line.strip()]
    return any(not path.startswith(GENERATED) for path in changed)


def _out_hashes(entry: dict) -> str:
    """The md5 of a stage's outputs (its model/data folders; the small metrics and plots files left out)."""
    outs = [o for o in entry.get("outs") or [] if not str(o.get("path", "")).startswith(("metrics/", "plots/"))]
    return ",".join(str(o.get("md5") or o.get("hash") or "") for o in outs)


def dvc_stage_hashes(root: Path) -> dict[str, str]:
    """``{stage: md5 of its outputs}`` from ``dvc.lock`` (empty when there is none yet)."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    return {name: _out_hashes(entry) for name, entry in stages.items() if entry.get("outs")}


def data_hash(root: Path) -> str | None:
    """The dataset version: the md5 that ``data.dvc`` records for ``data/``."""
    path = Path(root) / "data.dvc"
    if not path.is_file():
        return None
    return _out_hashes(yaml.safe_load(path.read_text()) or {}) or None


def lineage_tags(root: Path, extra: dict | None = None, *, running: str | None = None) -> dict[str, str]:
    """Registry tags: git_commit, git_dirty, data_dvc_md5, dvc_lock.<stage>, plus ``extra`` (e.g. the
    Prefect flow run). ``git_dirty`` true means the code differed from ``git_commit``. The ``running``
    stage is left out: its ``dvc.lock`` entry is still the previous run's."""
    dirty = git_dirty(root)
    tags = {"git_commit": git_commit(root), "git_dirty": None if dirty is None else str(dirty).lower(),
            "data_dvc_md5": data_hash(root),
            **{f"dvc_lock.{k}": v for k, v in dvc_stage_hashes(root).items() if k != running}, **(extra or {})}
    return {k: str(v) for k, v in tags.items() if v is not None}
