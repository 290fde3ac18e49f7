"""Where a model came from: the git commit, the DVC hashes of its stages and data, the Prefect flow run,
the DVC experiment and what its params changed.

Read from the project's own files (``dvc.lock``, ``data.dvc``) and the environment DVC gives a stage
command, without importing DVC, so the tags can be written from inside a running ``dvc repro`` or
``dvc exp run``: DVC records each stage in ``dvc.lock`` as it finishes, so the stages upstream of the
evaluation are already there.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

# What `dvc exp run` (workspace, --temp or --queue) sets for every stage command it runs
# (dvc/repo/experiments/queue/base.py); a plain `dvc repro` sets neither.
EXP_NAME_ENV = "DVC_EXP_NAME"
EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# Tracked files whose changes git_dirty ignores: what `dvc repro` itself rewrites, and params.yaml,
# whose changes the `changed` tag records (every `dvc exp run -S` changes it)
NOT_CODE = ("dvc.lock", "metrics/", "plots/", "params.yaml")


def git_dirty(root: Path) -> bool | None:
    """Do tracked files differ from the commit, apart from ``NOT_CODE``?"""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = [line[3:] for line in out.stdout.splitlines() if line.strip()]
    return any(not path.startswith(NOT_CODE) for path in changed)


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


def dvc_experiment() -> dict[str, str]:
    """``{"dvc_exp_name": ..., "dvc_exp_baseline_rev": ...}`` inside ``dvc exp run``; empty otherwise."""
    names = {"dvc_exp_name": EXP_NAME_ENV, "dvc_exp_baseline_rev": EXP_BASELINE_ENV}
    return {tag: os.environ[env] for tag, env in names.items() if os.environ.get(env)}


def lineage_tags(root: Path, extra: dict | None = None, *, running: str | None = None) -> dict[str, str]:
    """Registry tags: git_commit, git_dirty, data_dvc_md5, dvc_lock.<stage>, the DVC experiment
    (dvc_exp_name, dvc_exp_baseline_rev) when there is one, plus ``extra`` (e.g. the Prefect flow run,
    the params that changed). ``git_dirty`` true means the code differed from ``git_commit``. The
    ``running`` stage is left out: its ``dvc.lock`` entry is still the previous run's."""
    dirty = git_dirty(root)
    tags = {"git_commit": git_commit(root), "git_dirty": None if dirty is None else str(dirty).lower(),
            "data_dvc_md5": data_hash(root),
            **{f"dvc_lock.{k}": v for k, v in dvc_stage_hashes(root).items() if k != running},
            **dvc_experiment(), **(extra or {})}
    return {k: str(v) for k, v in tags.items() if v is not None}


def committed_params(root: Path, rev: str, path: str = "params.yaml") -> dict | None:
    """The params file as committed at ``rev`` (the experiment's baseline, or HEAD), flattened with
    its defaults filled in like a loaded ``Params``; None when git or the file at ``rev`` is missing."""
    from pokesprite.config import ConfigError, Params, flatten, from_dict, to_dict

    try:  # "./" makes the path relative to root, which need not be the top of the git repository
        text = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        return None
    try:
        return flatten(to_dict(from_dict(Params, raw)))
    except ConfigError:  # committed under an older schema: compare the keys as written
        return flatten(raw)


def param_changes(current: dict, baseline: dict) -> dict[str, tuple]:
    """``{key: (baseline value, current value)}`` for every flattened key whose value differs
    (None for a key that one side lacks), in sorted key order."""
    keys = sorted(set(current) | set(baseline))
    return {k: (baseline.get(k), current.get(k)) for k in keys if baseline.get(k) != current.get(k)}


def format_changes(changes: dict[str, tuple], limit: int = 8000) -> str:
    """``diffusion.train.lr 0.0002 -> 0.001, finetune.train.epochs 1 -> 2``, or ``none``; at most
    ``limit`` characters (MLflow's tag value limit)."""
    text = ", ".join(f"{k} {_short(old)} -> {_short(new)}" for k, (old, new) in changes.items()) or "none"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)
