"""Gather a GPU run into at most 8 files of under 16 MiB each, for the trip back.

    python gpu/collect.py --work WORK --out OUT [--config F]

WORK is gpu/run.sh's work folder (logs/, run/ = the train command's --out). Writes to OUT:
metrics.json (every stage metric, stage and step wall times, throughput, device, date, versions,
commit), sample_grid.png, memorisation.png and guidance_curve.png when the run drew them,
curves.csv (every plots/*.csv with a stage column), logs.txt (the tail of each step's log) and
checkpoints.tar (the checkpoints that fit, most useful first). With run.sh's --variant (WORK/variant):
its metrics under "variant" in metrics.json, its curves as stages variant_<stage>, and its grid as
variant_sample_grid.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

MAX_BYTES = 16 * 2 ** 20 - 64 * 1024  # each returned file, with room for the tar's headers
LOG_TAIL_LINES = 300
IMAGES = ("sample_grid.png", "memorisation.png", "guidance_curve.png")
CHECKPOINTS = ("outputs/finetune/model/pipeline.pt", "outputs/alignment/model.pt", "outputs/vae/best.pt",
               "outputs/diffusion/best.pt")  # most useful first; the text encoder (~90 MB) never fits


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def steps_table(logs: Path) -> dict:
    """logs/steps.tsv (name, exit code, seconds, limit), written by run.sh."""
    steps = {}
    if (logs / "steps.tsv").is_file():
        for line in (logs / "steps.tsv").read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            steps[name] = {"exit": int(rc), "seconds": int(seconds), "limit_s": int(limit)}
    return steps


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def environment(repo: Path, bundle: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    manifest = read_json(bundle / "manifest.json")
    return {"device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "python": platform.python_version(),
            "git_commit": git.stdout.strip() or manifest.get("git_commit"),
            "git_dirty_when_packed": manifest.get("git_dirty"),
            "bundle_conversions": {k: {n: v for n, v in e.items() if "sha" not in n and n != "path"}
                                   for k, e in manifest.get("restored", {}).items() if k != "data"}}


def merge_curves(plots: dict[str, Path], dest: Path) -> int:
    """{prefix: plots folder} of plots/<stage>.csv (epoch, metric columns) -> one table with a stage
    column (prefix + stage)."""
    rows, columns = [], ["stage", "epoch"]
    for path, prefix in sorted((p, prefix) for prefix, folder in plots.items() for p in folder.glob("*.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                rows.append({"stage": prefix + path.stem, **row})
                columns += [c for c in row if c not in columns]
    if rows:
        with dest.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)


def log_tails(logs: Path, dest: Path) -> None:
    parts = []
    if (logs / "steps.tsv").is_file():
        parts.append("== steps (name, exit code, seconds, limit) ==\n" + (logs / "steps.tsv").read_text())
    for path in sorted(logs.glob("*.log")):
        if path.name == "collect.log":  # being written by this very step
            continue
        lines = path.read_text(errors="replace").splitlines()
        cut = f" (last {LOG_TAIL_LINES} of {len(lines)} lines)" if len(lines) > LOG_TAIL_LINES else ""
        parts.append(f"== {path.name}{cut} ==\n" + "\n".join(lines[-LOG_TAIL_LINES:]) + "\n")
    dest.write_text("\n".join(parts))


def pack_checkpoints(run: Path, dest: Path) -> dict:
    included, left_out, total = [], [], 0
    for rel in CHECKPOINTS:
        path = run / rel
        if not path.is_file():
            continue
        size = path.stat().st_size
        (included if total + size <= MAX_BYTES else left_out).append((rel, size))
        total += size if total + size <= MAX_BYTES else 0
    if included:
        with tarfile.open(dest, "w") as tar:
            for rel, _ in included:
                tar.add(run / rel, arcname=rel)
    return {"included": dict(included), "left_out": dict(left_out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="profiles/gpu.yaml")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    logs, run = args.work / "logs", args.work / "run"
    args.out.mkdir(parents=True, exist_ok=True)

    stage_metrics = {p.stem: read_json(p) for p in sorted((run / "metrics").glob("*.json"))}
    report = {**environment(repo, repo / "gpu" / "bundle"), "config": args.config,
              "fitted_budgets": read_json(args.work / "fitted_config.json"),
              "steps": steps_table(logs),
              "stage_wall_seconds": {p.stem: read_json(p).get("wall_seconds")
                                     for p in sorted((run / "runs").glob("*.json"))},
              "metrics": stage_metrics, "throughput": read_json(logs / "throughput.json")}
    for name in IMAGES:
        found = [p for p in (run / "outputs/evaluate" / name, run / "plots" / name) if p.is_file()]
        if found and found[0].stat().st_size <= MAX_BYTES:
            shutil.copyfile(found[0], args.out / name)
    plots = {"": run / "plots"}
    variant = args.work / "variant"
    if variant.is_dir():
        report["variant"] = {"set": read_json(args.work / "fitted_variant.json").get("set"),
                             "metrics": {p.stem: read_json(p) for p in sorted((variant / "metrics").glob("*.json"))}}
        found = [p for p in (variant / "outputs/evaluate/sample_grid.png", variant / "plots/sample_grid.png")
                 if p.is_file()]
        if found and found[0].stat().st_size <= MAX_BYTES:
            shutil.copyfile(found[0], args.out / "variant_sample_grid.png")
        plots["variant_"] = variant / "plots"
    report["curve_rows"] = merge_curves(plots, args.out / "curves.csv")
    report["checkpoints"] = pack_checkpoints(run, args.out / "checkpoints.tar")
    log_tails(logs, args.out / "logs.txt")
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    files = sorted(p for p in args.out.iterdir() if p.is_file())
    for p in files:
        print(f"{p.stat().st_size / 2 ** 20:8.2f} MiB  {p.name}")
    too_big = [p.name for p in files if p.stat().st_size > 16 * 2 ** 20]
    if len(files) > 8 or too_big:
        print(f"error: {len(files)} files in {args.out} (at most 8), over 16 MiB: {too_big}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
