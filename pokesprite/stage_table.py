"""The pipeline's stages, in the one table that dvc.yaml, the Prefect flows and ``pokesprite train`` follow.

``STAGES`` maps each stage name, in an order that runs every stage after the stages it reads, to
its ``StageSpec``: the ``pokesprite.stages`` function that runs it, the params.yaml keys it reads
(DVC's ``params:``; its MLflow run logs them and those of every stage upstream of it), the data it
reads (data/ or earlier stages' outputs) and the outputs it writes. Its code dependencies are not
written down but computed (``code_deps``): every first-party file that the stage's command,
``python -m flows.run STAGE``, can import on the way to that function, so no edit of code a stage
runs can leave its outputs looking up to date.

``dvc.yaml`` is generated from this module and committed; a test fails when the two differ::

    python -m pokesprite.stage_table --write dvc.yaml   # regenerate
    python -m pokesprite.stage_table --check dvc.yaml   # exit 1 (with a diff) when it is stale
"""
from __future__ import annotations

import argparse
import ast
import difflib
import functools
import hashlib
import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pokesprite import stages

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent  # the repository: pokesprite/ and flows/
RESUME_FILE = "resume.json"  # in a training stage's folder: the fingerprint its last.pt was trained under
PACKAGES = ("pokesprite", "flows")  # first-party code: what code dependencies are made of
DVC_YAML = "dvc.yaml"


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[..., dict]  # pokesprite.stages.run_<name>(params, *, root, out, tags, device, ...)
    params: tuple[str, ...]  # params.yaml keys it reads: sections ("vae") or sub-keys ("evaluate.seed")
    deps: tuple[str, ...]  # data it reads: data/ or earlier stages' outputs
    outs: tuple[str, ...]  # what it writes, cached by DVC
    files: tuple[str, ...] = ()  # small outputs kept in git: per-epoch plots/<stage>.csv, the sample grid
    loads: tuple[str, ...] = ()  # first-party files it loads by path rather than by import
    number: str | None = None  # its `pokesprite train --stage` number
    resumable: bool = False  # trains through pokesprite.train.loop.fit: writes last.pt, takes resume=
    parallel: bool = False  # runs data-parallel under torchrun (pokesprite.train.distributed)

    @property
    def metrics(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def cmd(self) -> str:
        return f"python -m flows.run {self.name}"


@dataclass(frozen=True)
class Curve:
    """A top-level ``dvc plots`` definition: columns ``y`` of ``file`` against ``x``."""
    title: str
    file: str
    x: str
    y: tuple[str, ...]


REFERENCE_KEYS = ("seed", "kid_subsets", "kid_subset_size", "candidates", "scorer_epochs", "scorer_dim")

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("preprocess", stages.run_preprocess,
              params=("seed", "data.background", "data.image_size", "data.split", "text"),
              deps=("data",), outs=("outputs/preprocess",)),
    # Each stage lists the keys it reads itself; what preprocess made of `data` reaches the others
    # through outputs/preprocess. The FID/KID reference and the independent scorer read these evaluate
    # keys only, so experiments that change training, augmentation or sampling do not redo them.
    StageSpec("reference", stages.run_reference, params=tuple(f"evaluate.{k}" for k in REFERENCE_KEYS),
              deps=("outputs/preprocess",), outs=("outputs/reference",)),
    StageSpec("alignment", stages.run_alignment, params=("seed", "finetune.alignment"),
              deps=("outputs/preprocess",), outs=("outputs/alignment",), files=("plots/alignment.csv",),
              parallel=True),
    StageSpec("vae", stages.run_vae, params=("seed", "data.augment", "data.background", "text", "vae"),
              deps=("outputs/preprocess",), outs=("outputs/vae",), files=("plots/vae.csv",),
              number="1", resumable=True, parallel=True),
    StageSpec("diffusion", stages.run_diffusion, params=("seed", "text", "diffusion"),
              deps=("outputs/preprocess", "outputs/vae/best.pt"), outs=("outputs/diffusion",),
              files=("plots/diffusion.csv",), number="2", resumable=True, parallel=True),
    StageSpec("finetune", stages.run_finetune, params=("seed", "finetune"),
              deps=("outputs/preprocess", "outputs/vae/best.pt", "outputs/diffusion/best.pt", "outputs/alignment"),
              outs=("outputs/finetune",), files=("plots/finetune.csv",), number="3", resumable=True,
              parallel=True),
    StageSpec("evaluate", stages.run_evaluate, params=("data.background", "finetune.alignment", "evaluate", "mlflow"),
              deps=("outputs/preprocess", "outputs/reference", "outputs/alignment", "outputs/vae/best.pt",
                    "outputs/diffusion/best.pt", "outputs/finetune/model"),
              outs=("outputs/evaluate",), files=("plots/sample_grid.png",),
              loads=("pokesprite/mlflow_model.py",),  # the registered model's code ("models from code")
              number="eval"),
)}

# `dvc plots show`: each curve once, with its title; images by path.
CURVES = (
    Curve("VAE loss per epoch", "plots/vae.csv", "epoch", ("train_loss", "val_loss")),
    Curve("VAE reconstruction PSNR per epoch", "plots/vae.csv", "epoch", ("val_psnr",)),
    Curve("Diffusion loss per epoch", "plots/diffusion.csv", "epoch", ("train_loss", "val_loss")),
    Curve("Stage-3 loss per epoch (epoch 0 = before)", "plots/finetune.csv", "epoch",
          ("val_loss", "val_clip", "val_consistency")),
    Curve("Alignment scorer loss per epoch", "plots/alignment.csv", "epoch", ("train_loss", "val_loss")),
    Curve("KID and R-precision against the guidance scale (evaluate.guidance_scales)",
          "outputs/evaluate/guidance_curve.csv", "scale", ("kid", "r_precision")),
)
IMAGES = ("plots/sample_grid.png",)


def stage_by_number(number: str) -> StageSpec:
    return next(s for s in STAGES.values() if s.number == number)


def upstream(name: str) -> list[str]:
    """The stages whose outputs ``name`` reads, directly or through others, in table order."""
    def produces(spec: StageSpec, dep: str) -> bool:
        return any(dep == out or dep.startswith(out + "/") for out in spec.outs)

    needed: set[str] = set()
    todo = [name]
    while todo:
        for dep in STAGES[todo.pop()].deps:
            for spec in STAGES.values():
                if produces(spec, dep) and spec.name not in needed:
                    needed.add(spec.name)
                    todo.append(spec.name)
    return [n for n in STAGES if n in needed]


# --- code dependencies: the first-party files a stage's command can import -------------------------

def module_file(module: str, root: Path = ROOT) -> Path | None:
    """``pokesprite.train.vae`` -> root/pokesprite/train/vae.py (or its package's __init__.py); None if absent."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def parse(path: Path) -> ast.Module:
    return _parse(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _parse(path: Path, mtime_ns: int) -> ast.Module:  # keyed by the modification time: an edit re-parses
    return ast.parse(path.read_text(), filename=str(path))


def _imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules (and of their possible submodules) that these import nodes name."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up level - 1 more
                parts = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def _calls(tree: ast.Module) -> dict[str, set[str]]:
    """Top-level function name -> the same module's top-level functions it names."""
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {name: {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in functions and n.id != name}
            for name, fn in functions.items()}


def reachable(tree: ast.Module, names: Iterable[str]) -> set[str]:
    """``names`` and the module's top-level functions they name, transitively."""
    calls, seen, todo = _calls(tree), set(), list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(calls.get(name, ()))
    return seen


def imported_files(modules: Iterable[str], *, skip: dict[str, set[str]] | None = None, files: Iterable[str] = (),
                   root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> set[Path]:
    """The first-party files that importing ``modules`` (and calling what is in them) can load.

    A module counts the imports anywhere in it, lazy ones inside functions included (they run when
    the function does), and the ``__init__.py`` of each package above it; ``skip`` names, per module,
    top-level functions whose lazy imports do not count (in pokesprite.stages: the other stages'
    functions). ``files`` are root-relative files loaded by path; their imports count too.
    """
    skip = skip or {}
    found: set[Path] = set()
    todo: list[tuple[str | None, Path | None]] = [(m, None) for m in modules] + [(None, root / f) for f in files]
    while todo:
        module, path = todo.pop()
        if path is None:
            if module.split(".")[0] not in packages or (path := module_file(module, root)) is None:
                continue
        else:
            module = ".".join(path.relative_to(root).with_suffix("").parts)
        if path in found:
            continue
        found.add(path)
        is_package = path.name == "__init__.py"
        module = module.removesuffix(".__init__")
        tree = parse(path)
        skipped = skip.get(module, set())
        nodes = [node for stmt in tree.body
                 if not (isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name in skipped)
                 for node in ast.walk(stmt)]
        names = _imports(nodes, module, is_package)
        parts = module.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages above it
        todo.extend((name, None) for name in names)
    return found


def compact(files: set[Path], root: Path = ROOT) -> list[str]:
    """Root-relative paths, a whole folder where every .py file under it is in ``files``. Empty files
    (package markers) are left out: nothing in them can change a result (DVC warns of empty deps),
    and one that gains code changes the generated list."""
    def covered(folder: Path) -> bool:
        return all(f in files for f in folder.rglob("*.py"))

    out = set()
    for f in files:
        top = f.parent
        while top.parent != root and covered(top.parent):
            top = top.parent
        out.add(top if covered(top) else f)
    return sorted(p.relative_to(root).as_posix() for p in out if p.is_dir() or p.stat().st_size > 0)


def code_deps(spec: StageSpec, root: Path = ROOT) -> list[str]:
    """What the stage's command (``python -m flows.run NAME``) can import on the way to its function:
    flows/, this table, pokesprite.stages less what only the other stages' functions use, and what
    those imports import in turn. pokesprite/config.py (the defaults) is always among them."""
    module = spec.run.__module__
    tree = parse(module_file(module, root))
    others = [s.run.__name__ for s in STAGES.values() if s is not spec and s.run.__module__ == module]
    only_others = reachable(tree, others) - reachable(tree, [spec.run.__name__])
    files = imported_files(["flows.run", "pokesprite.config"], skip={module: only_others}, files=spec.loads, root=root)
    return compact(files, root)


# --- dvc.yaml -----------------------------------------------------------------------------------------

HEADER = """\
# GENERATED from pokesprite/stage_table.py: edit the table there, then
#   python -m pokesprite.stage_table --write dvc.yaml
# (tests/test_stage_table.py fails while this file differs from what the table generates).
#
# Each command runs a Prefect flow whose task calls the stage's function in pokesprite/stages.py; each
# stage is one MLflow run that logs the params listed here for it and every stage before it. Code
# deps are computed: every first-party file the command can import. `dvc metrics show` reads
# metrics/, `dvc plots show` draws the plots below.
"""


def _yaml_list(key: str, items: Iterable, indent: str) -> list[str]:
    lines = [f"{indent}{key}:"]
    for item in items:
        if isinstance(item, str):
            lines.append(f"{indent}  - {item}")
        else:  # (path, {"cache": False}) and the like
            path, options = item
            lines.append(f"{indent}  - {path}:")
            lines += [f"{indent}      {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    return lines


def dvc_yaml() -> str:
    """The dvc.yaml text this table defines."""
    lines = [HEADER.rstrip("\n"), "stages:"]
    for spec in STAGES.values():
        lines += [f"  {spec.name}:", f"    cmd: {spec.cmd}"]
        lines += _yaml_list("deps", [*spec.deps, *code_deps(spec)], "    ")
        lines += _yaml_list("params", spec.params, "    ")
        # A training stage's outputs persist (DVC does not delete them before running it), so that an
        # interrupted run resumes from its last.pt (prepare_run) and files no cache holds survive.
        persist = {"persist": True} if spec.resumable else {}
        lines += _yaml_list("outs", [*((o, persist) if persist else o for o in spec.outs),
                                     *((f, {"cache": False, **persist}) for f in spec.files)], "    ")
        lines += _yaml_list("metrics", [(spec.metrics, {"cache": False, **persist})], "    ")
        lines.append("")
    lines.append("plots:")
    for curve in CURVES:
        lines += [f"  - {curve.title}:", f"      x: {curve.x}", "      y:",
                  f"        {curve.file}: [{', '.join(curve.y)}]"]
    lines += [f"  - {image}" for image in IMAGES]
    return "\n".join(lines) + "\n"


# --- resuming an interrupted training stage ------------------------------------------------------

def _hash_tree(h, path: Path) -> None:
    """Hash a file or a folder's files, leaving out Python's byte-code caches (they hold timestamps and
    differ between machines; .dvcignore leaves them out of DVC's hashes for the same reason)."""
    files = (sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
             if path.is_dir() else [path] if path.is_file() else [])
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def fingerprint(spec: StageSpec, params, layout: stages.Layout) -> str:
    """sha256 of what a stage's result depends on: its params, the data and outputs it reads, and
    its code (``code_deps``), i.e. what DVC compares to decide that the stage must run."""
    h = hashlib.sha256(json.dumps(stages.stage_params(params, spec.params), sort_keys=True, default=str).encode())
    for dep in spec.deps:
        _hash_tree(h, layout.raw if dep == "data" else layout.out / dep)
    for dep in code_deps(spec):
        _hash_tree(h, ROOT / dep)
    return h.hexdigest()


def prepare_run(name: str, params, layout: stages.Layout, device=None) -> Path | None:
    """Before a training stage runs: the ``last.pt`` to resume from, or None after clearing the stage's
    folder for a fresh start. It resumes when the folder's ``last.pt`` was trained under the same
    params, inputs and code (the fingerprint in ``resume.json``), and logs which, and why.

    Under ``torchrun`` process 0 decides (and clears) and every process gets its answer; ``device``
    (the stage's) decides the process group's backend."""
    from pokesprite.train import distributed

    if distributed.launched():
        stages.resolve_device(device)  # joins the process group
        return distributed.broadcast(decide_resume(name, params, layout) if distributed.is_main() else None)
    return decide_resume(name, params, layout)


STAGING_FOLDER = re.compile(r"^\..+\.[0-9a-f]{12}(\.old)?$")  # files.atomic_folder's, beside the folder it replaces


def interrupted_writes(folder: Path) -> list[Path]:
    """The temporary files and folders in ``folder`` (and below) of writes that a kill cut short:
    every file pokesprite writes atomically goes through a temporary file whose name starts with a
    dot, every folder through a staging folder ``.<name>.<12 hex digits>``, and nothing else in a
    stage's folder has such a name."""
    found: list[Path] = []
    for p in sorted(folder.rglob(".*")):
        if any(q in p.parents for q in found):
            continue  # inside a staging folder found already
        if p.is_file() or (p.is_dir() and STAGING_FOLDER.match(p.name)):
            found.append(p)
    return found


def decide_resume(name: str, params, layout: stages.Layout) -> Path | None:
    """``prepare_run`` in one process."""
    from pokesprite.checkpoints import read

    spec, folder = STAGES[name], layout.stage_dir(name)
    current = fingerprint(spec, params, layout)
    last, stamp = folder / "last.pt", folder / RESUME_FILE
    try:
        written = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else None
    except (ValueError, KeyError, TypeError):
        written = None
    if not last.is_file():
        why = f"no {last}"
    elif written != current:
        why = f"{last} was trained under other params, inputs or code"
    else:
        try:
            state = read(last).get("train") or {}
            log.info("%s: resuming from %s (epoch %s of %s): same params, inputs and code", name, last,
                     state.get("epoch"), state.get("epochs"))
            for leftover in interrupted_writes(folder):  # else DVC would hash them into the stage's output
                log.info("%s: removing %s, left by a write that was interrupted", name, leftover)
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            return last
        except ValueError as e:
            why = str(e)
    log.info("%s: starting afresh: %s", name, why)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    stamp.write_text(json.dumps({"fingerprint": current}) + "\n")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pokesprite.stage_table",
                                     description="Print, write or check the dvc.yaml that the stage table defines.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write it to PATH (e.g. dvc.yaml)")
    group.add_argument("--check", metavar="PATH", help="exit 1 with a diff when PATH differs from it")
    args = parser.parse_args(argv)
    text = dvc_yaml()
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write} ({len(STAGES)} stages)")
    elif args.check:
        current = Path(args.check).read_text() if Path(args.check).is_file() else ""
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       args.check, "generated from pokesprite/stage_table.py"))
            print(f"{args.check} is stale: run python -m pokesprite.stage_table --write {args.check}",
                  file=sys.stderr)
            return 1
        print(f"{args.check} is up to date")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
