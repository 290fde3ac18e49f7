"""Where the pipeline's time goes: wall seconds per stage and per phase, on a copy of the project.

    python benchmarks/stage_times.py                          # every stage, params.yaml, a temporary copy
    python benchmarks/stage_times.py --project /tmp/p         # ... in /tmp/p, kept (outputs included)
    python benchmarks/stage_times.py --project /tmp/p --stages reference,evaluate   # reuse its outputs
    python benchmarks/stage_times.py --code HEAD              # the committed code, not the working tree
    python benchmarks/stage_times.py --set vae.train.epochs=2 --set evaluate.max_captions=45
    python benchmarks/stage_times.py --via-flows              # as `dvc repro` runs them (Prefect included)

The project copy holds a snapshot of pokesprite/ and flows/ (of the working tree, or of a git
revision with --code; edits made while it runs do not leak in), the params file (with any --set
applied) and data/ imported from the dataset folder. Each stage runs in its own process, as under
`dvc repro`, with MLflow tracking off (POKESPRITE_TRACKING=off; --tracking keeps it on, in the
copy's own store) and without tqdm bars. A training stage starts from scratch: its outputs folder
is emptied first.

Phases are measured from the outside: the child process wraps the project's functions with timers
(loading networks, reading sprites, Inception features, drawing sprites, training steps, validation,
sample grids, checkpoints, ...), so the library code carries no timing code. A phase's seconds are
its own, without the phases nested in it; "rest of the stage" is what no timer covered inside the
stage function, "Prefect" (with --via-flows) the flow around it, and "process start and end" the
interpreter and imports (of every module timed, so a little more than the stage itself imports).
Drawing and Inception rows also count sprites, so their rate is shown.

Timings on a shared machine are noisy: the table records the 1-minute load average at the start and
end of every stage, and each phase's CPU seconds (all threads of the stage's process), which other
processes inflate much less than its wall seconds (with --threads 1, hardly at all: several threads
spin while waiting for a thread that another process holds up). Prints a table per stage and a
summary; --json writes everything as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE = ("pokesprite", "flows")
STAGE_ORDER = ("preprocess", "reference", "alignment", "vae", "diffusion", "finetune", "evaluate")


# --- phase timers (in the child process) ----------------------------------------------------------

def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds now; CPU time is this process's, all threads, which other processes on a
    busy machine inflate far less than the wall time."""
    return time.perf_counter(), time.process_time()


class PhaseClock:
    """Wall and CPU seconds, calls and items per phase label; a phase's times exclude the timed phases
    nested in it."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self._nested: list[list[float]] = []  # per open timed call: (wall, CPU) spent in timed calls inside it

    def add(self, label: str, seconds: float, cpu: float, items: int = 0) -> None:
        row = self.rows.setdefault(label, {"phase": label, "seconds": 0.0, "cpu": 0.0, "calls": 0, "items": 0})
        row["seconds"] += seconds
        row["cpu"] += cpu
        row["calls"] += 1
        row["items"] += items

    def wrap(self, fn, label):
        """``fn`` timed under ``label``: a string, or a function of fn's arguments giving (label, items)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name, items = label(*args, **kwargs) if callable(label) else (label, 0)
            start = clocks()
            self._nested.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                inner = self._nested.pop()
                took = [end - begin for end, begin in zip(clocks(), start)]
                if self._nested:
                    self._nested[-1] = [a + b for a, b in zip(self._nested[-1], took)]
                self.add(name, took[0] - inner[0], took[1] - inner[1], items)
        return timed


def _count(position: int, name: str):
    """A label function: ``name`` and the length of argument ``position`` (the sprites of a call)."""
    def label(*args, **kwargs):
        return name, len(args[position]) if len(args) > position else 0
    return label


def _draw_label(pipeline, prompts, cfg, desc, **kwargs):
    return f"draw sprites: {desc.removeprefix('evaluate: ')}", len(prompts)


# (module:attribute, label[, only this module]). A function is rebound in every first-party module that
# imported it, unless "only this module"; a method is wrapped on its class.
HOOKS = (
    ("pokesprite.data.dataset:SpriteDataset.__init__", "read sprites"),
    ("pokesprite.data.preprocess:preprocess", "composite, split, index"),
    ("pokesprite.data.preprocess:preview_grid", "preview grid"),
    ("pokesprite.models.text:load_tokenizer", "load networks"),
    ("pokesprite.models.text:TextEncoder.from_pretrained", "load networks"),
    ("pokesprite.models.text:TextEncoder.encode_hidden", _count(1, "cache caption features")),
    ("pokesprite.models.vae:VAE.from_checkpoint", "load networks"),
    ("pokesprite.models.vgg:load_vgg", "load networks"),
    ("pokesprite.models.alignment:AlignmentModel.__init__", "load networks"),
    ("pokesprite.models.alignment:load_alignment", "load networks"),
    ("pokesprite.models.alignment:similarity_matrix", _count(1, "alignment scorer")),
    ("pokesprite.pipeline:SpritePipeline.load", "load networks"),
    ("pokesprite.pipeline:SpritePipeline.from_checkpoints", "load networks"),
    ("pokesprite.pipeline:SpritePipeline.save", "write checkpoints and outputs"),
    ("pokesprite.checkpoints:atomic_save", "write checkpoints and outputs"),
    ("pokesprite.images:save_image_atomic", "write checkpoints and outputs"),
    ("pokesprite.tracking:Tracker.log_image", "write checkpoints and outputs"),
    ("pokesprite.train.alignment:cache_features", _count(1, "cache tower features")),
    ("pokesprite.stages:similarity_image", "sample grids"),
    ("pokesprite.train.vae:latent_std", "latent scale"),
    ("pokesprite.train.vae:reconstruction_grid", "sample grids"),
    ("pokesprite.train.diffusion:encode_latents", _count(1, "cache latents")),
    ("pokesprite.train.diffusion:sample_grid", _count(1, "sample grids")),
    ("pokesprite.evaluation.inception:load_inception", "load networks"),
    ("pokesprite.evaluation.inception:inception_features", _count(1, "Inception features")),
    ("pokesprite.evaluation.scorer:IndependentScorer.fit", "independent scorer"),
    ("pokesprite.evaluation.fid:frechet_distance", "FID / KID"),
    ("pokesprite.evaluation.fid:kernel_inception_distance", "FID / KID"),
    ("pokesprite.evaluation.reference:load_reference", "read reference"),
    ("pokesprite.evaluation.drawing:draw", _draw_label),
    ("pokesprite.evaluation.evaluate:sample", _count(1, "draw sprites: grid"), True),
    ("pokesprite.evaluation.evaluate:reconstruct", _count(1, "reconstruction")),
    ("pokesprite.losses:PerceptualLoss.distance", "VGG distances"),
    ("pokesprite.evaluation.evaluate:memorisation_report", "memorisation"),
    ("pokesprite.evaluation.grid:labelled_grid", "sample grids"),
    ("pokesprite.evaluation.guidance_curve:curve_image", "sample grids"),
)
IMPORTERS = ("pokesprite.evaluation.evaluate", "pokesprite.train.vae", "pokesprite.train.diffusion",
             "pokesprite.train.finetune", "pokesprite.train.alignment", "pokesprite.stages")
TRACKING_HOOKS = (("pokesprite.registry:register_evaluated", "MLflow: log and register the model"),)


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    module = importlib.import_module(module_name)
    owner_path, _, attr = qualname.rpartition(".")
    owner = module
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    return module, owner, attr


def install(clock: PhaseClock, hooks) -> None:
    """Wrap every hook's function with ``clock``."""
    for target, label, *only in hooks:
        module, owner, attr = _resolve(target)
        if isinstance(owner, type):
            raw = owner.__dict__[attr]
            kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
            timed = clock.wrap(raw.__func__ if kind else raw, label)
            setattr(owner, attr, kind(timed) if kind else timed)
            continue
        original = getattr(owner, attr)
        timed = clock.wrap(original, label)
        homes = [module] if only and only[0] else [m for name, m in list(sys.modules.items())
                                                    if name.split(".")[0] in CODE and m is not None]
        for home in homes:
            if getattr(home, attr, None) is original:
                setattr(home, attr, timed)


def install_fit(clock: PhaseClock) -> None:
    """Time the shared training loop: validation, end-of-epoch pictures and weight exports apart from
    the training steps (forward, backward, optimiser, EMA) that make up the rest of ``fit``."""
    import pokesprite.train.loop as loop

    original = loop.fit

    def fit(stage, cfg, **kwargs):
        wrapped = {"validate": clock.wrap(stage.validate, "validation"),
                   "export": clock.wrap(stage.export, "write checkpoints and outputs")}
        if stage.on_epoch_end is not None:
            wrapped["on_epoch_end"] = clock.wrap(stage.on_epoch_end, "sample grids")
        return original(dataclasses.replace(stage, **wrapped), cfg, **kwargs)

    timed = clock.wrap(fit, "training steps")
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in CODE and getattr(module, "fit", None) is original:
            module.fit = timed


def child(stage: str, project: Path, result: Path, via_flows: bool) -> int:
    """Run one stage in ``project`` with the phase timers on; write its timings to ``result``."""
    import logging

    from pokesprite import gc_settings, malloc_settings

    gc_settings.for_commands()  # as the stage's command (flows.run) has them
    malloc_settings.for_commands()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pokesprite.stages as stages
    from pokesprite.config import load_params
    from pokesprite.stage_table import STAGES
    from pokesprite.tracking import tracking_enabled

    clock = PhaseClock()
    hooks = HOOKS + (TRACKING_HOOKS if tracking_enabled() else ())
    # Import every module first, so that rebinding reaches every importer.
    for module in {target.partition(":")[0] for target, *_ in hooks} | set(IMPORTERS):
        importlib.import_module(module)

    install(clock, hooks)
    install_fit(clock)
    spec, inside = STAGES[stage], []

    def run(*args, **kwargs):  # the stage function, however it is called
        began = clocks()
        try:
            return spec.run(*args, **kwargs)
        finally:
            inside.append([end - begin for end, begin in zip(clocks(), began)])

    STAGES[stage] = dataclasses.replace(spec, run=run)
    load = os.getloadavg()[0]
    start = clocks()
    if via_flows:
        from flows.run import main

        code = main([stage, "--params", "params.yaml"])
    else:
        STAGES[stage].run(load_params(project / "params.yaml"), root=project)
        code = 0
    seconds, cpu = (end - begin for end, begin in zip(clocks(), start))
    phases = list(clock.rows.values())
    within = [sum(t[k] for t in inside) for k in (0, 1)]
    phases.append({"phase": "rest of the stage", "seconds": within[0] - sum(p["seconds"] for p in phases),
                   "cpu": within[1] - sum(p["cpu"] for p in phases), "calls": len(inside), "items": 0})
    if via_flows:
        phases.append({"phase": "Prefect (server, flow and task runs)", "seconds": seconds - within[0],
                       "cpu": cpu - within[1], "calls": 1, "items": 0})
    _write_json(result, {"stage": stage, "stage_seconds": seconds, "stage_cpu": cpu, "phases": phases,
                         "load_start": load, "load_end": os.getloadavg()[0], "exit_code": code,
                         "metrics": _metrics(stages, project, stage)})
    return code


def _metrics(stages, project: Path, stage: str) -> dict:
    path = stages.Layout(project).metrics / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# --- the project copy and the stage processes (in the parent) --------------------------------------

def apply_sets(params_text: str, sets: list[str]) -> str:
    """params.yaml text with ``section.key=value`` overrides (values parsed as YAML)."""
    import yaml

    if not sets:
        return params_text
    params = yaml.safe_load(params_text)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return yaml.safe_dump(params, sort_keys=False)


def snapshot_code(project: Path, revision: str | None) -> None:
    """pokesprite/ and flows/ into ``project``: the working tree's, or those of git ``revision``."""
    for name in CODE:
        shutil.rmtree(project / name, ignore_errors=True)
    if revision is None:
        for name in CODE:
            shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, *CODE], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive, check=True)


def prepare_project(project: Path, params_file: Path, sets: list[str], data_source: Path,
                    revision: str | None) -> None:
    """Snapshot the code and params into ``project`` and import the dataset there unless it has one."""
    project.mkdir(parents=True, exist_ok=True)
    snapshot_code(project, revision)
    (project / "benchmarks").mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).resolve(), project / "benchmarks" / "stage_times.py")
    (project / "params.yaml").write_text(apply_sets(params_file.read_text(), sets))
    if not (project / "data").is_dir():
        from pokesprite.data.raw import import_dataset

        import_dataset(data_source, project / "data")


def child_env(project: Path, tracking: bool, threads: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(project), CI="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(project / ".prefect"))
    env.pop("DVC_STAGE", None)
    env.pop("DVC_ROOT", None)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # torch's intra-op threads
    if tracking:
        env.pop("POKESPRITE_TRACKING", None)
    else:
        env["POKESPRITE_TRACKING"] = "off"
    return env


def run_stage(stage: str, project: Path, *, via_flows: bool, tracking: bool, threads: int | None = None) -> dict:
    """One stage in its own process; its phases, with 'process start' and 'rest of the stage' added."""
    training = stage in ("alignment", "vae", "diffusion", "finetune")
    if training:
        shutil.rmtree(project / "outputs" / stage, ignore_errors=True)
    logs = project / "logs"
    logs.mkdir(exist_ok=True)
    result = logs / f"{stage}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(project / "benchmarks" / "stage_times.py"), "--child", stage,
               "--project", str(project), "--result", str(result)] + (["--via-flows"] if via_flows else [])
    start, cpu_before = time.perf_counter(), _children_cpu()
    with open(logs / f"{stage}.log", "w") as log:
        code = subprocess.call(command, cwd=project, env=child_env(project, tracking, threads), stdout=log,
                               stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_before
    if code != 0 or not result.is_file():
        raise SystemExit(f"{stage} failed (exit {code}); its log: {logs / f'{stage}.log'}")
    timings = json.loads(result.read_text())
    timings["phases"].append({"phase": "process start and end (imports)", "seconds": wall - timings["stage_seconds"],
                              "cpu": cpu - timings["stage_cpu"], "calls": 1, "items": 0})
    timings["wall_seconds"], timings["cpu_seconds"] = wall, cpu
    return timings


def _children_cpu() -> float:
    """User + system CPU seconds of the ended child processes."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def format_stage(t: dict) -> str:
    lines = [f"{t['stage']}: {t['wall_seconds']:.1f} s, {t['cpu_seconds']:.1f} CPU s "
             f"(load {t['load_start']:.2f} -> {t['load_end']:.2f})",
             f"  {'phase':<44}{'seconds':>9}{'share':>7}{'CPU s':>8}{'calls':>7}{'items':>7}{'items/s':>9}"]
    for p in sorted(t["phases"], key=lambda p: -p["seconds"]):
        rate = f"{p['items'] / p['seconds']:.2f}" if p["items"] and p["seconds"] > 0 else ""
        lines.append(f"  {p['phase']:<44}{p['seconds']:>9.1f}{p['seconds'] / t['wall_seconds']:>7.0%}"
                     f"{p['cpu']:>8.1f}{p['calls']:>7}{p['items'] or '':>7}{rate:>9}")
    return "\n".join(lines)


def format_summary(timings: list[dict]) -> str:
    total, cpu = sum(t["wall_seconds"] for t in timings), sum(t["cpu_seconds"] for t in timings)
    lines = [f"{'stage':<12}{'seconds':>9}{'share':>7}{'CPU s':>9}  load start -> end", "-" * 53]
    lines += [f"{t['stage']:<12}{t['wall_seconds']:>9.1f}{t['wall_seconds'] / total:>7.0%}{t['cpu_seconds']:>9.1f}  "
              f"{t['load_start']:.2f} -> {t['load_end']:.2f}" for t in timings]
    lines += ["-" * 53, f"{'total':<12}{total:>9.1f}{'':>7}{cpu:>9.1f}  ({total / 60:.1f} min)"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGE_ORDER),
                    help="comma-separated stages to time, run in pipeline order (default: all); the stages "
                         "they read must have run in --project already")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param in the copy, e.g. --set vae.train.epochs=2 (repeatable)")
    ap.add_argument("--project", type=Path,
                    help="the project copy to use and keep (its data/ and outputs are reused); default: a "
                         "temporary folder, removed at the end")
    ap.add_argument("--code", metavar="REV", help="time the code of this git revision (default: the working tree)")
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("POKESPRITE_DATA_SOURCE", REPO.parent / "shared" / "pokemon")),
                    help="dataset folder imported into the copy's data/ (default: $POKESPRITE_DATA_SOURCE or "
                         "../shared/pokemon)")
    ap.add_argument("--via-flows", action="store_true",
                    help="run each stage as its DVC command does (python -m flows.run STAGE: Prefect flow; "
                         "a fresh Prefect home in the copy)")
    ap.add_argument("--tracking", action="store_true", help="keep MLflow tracking on (the copy's own store)")
    ap.add_argument("--threads", type=int,
                    help="torch's intra-op threads in the stages (OMP_NUM_THREADS); with 1, CPU seconds stay "
                         "about the same however busy the machine is (no threads waiting for each other)")
    ap.add_argument("--json", type=Path, help="also write the timings here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child, args.project.resolve(), args.result, args.via_flows)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGE_ORDER))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(STAGE_ORDER)}")
    stages = [s for s in STAGE_ORDER if s in stages]
    folder = args.project
    project = (folder or Path(tempfile.mkdtemp(prefix="stage_times_"))).resolve()
    timings = []
    try:
        prepare_project(project, args.params, args.sets, args.data, args.code)
        for stage in stages:
            print(f"[{time.strftime('%H:%M:%S')}] {stage} ... (log: {project / 'logs' / stage}.log)", flush=True)
            timings.append(run_stage(stage, project, via_flows=args.via_flows, tracking=args.tracking,
                                     threads=args.threads))
            print(format_stage(timings[-1]), flush=True)
    finally:
        if folder is None:
            shutil.rmtree(project, ignore_errors=True)
    print()
    print(format_summary(timings))
    if args.json:
        _write_json(args.json, {"project": str(project), "code": args.code or "working tree",
                                "params": str(args.params), "sets": args.sets,
                                "via_flows": args.via_flows, "tracking": args.tracking, "stages": timings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
