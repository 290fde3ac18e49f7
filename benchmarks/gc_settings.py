"""What pokesprite.gc_settings saves: a stage-like process, timed with Python's default garbage
collector settings and with ``gc_settings.for_commands()``, alternately.

    python benchmarks/gc_settings.py            # 5 processes each
    python benchmarks/gc_settings.py --reps 9 --json gc.json

Each process does what every stage's process does around its work: imports torch, Prefect and
MLflow, opens the project's MLflow store (sqlite, in a temporary folder), loads the bundled text
encoder and encodes a caption. The parent times each process from start to exit; the child reports
when its work ended, so the table splits the time into "work" (imports included) and "exit" (exit
handlers and the interpreter's teardown, where the default settings run a last full collection),
plus the collections each generation ran. Medians; one process at a time.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("default", "commands")


def child(mode: str, folder: str) -> None:
    import gc

    began = time.time()
    if mode == "commands":
        from pokesprite import gc_settings

        gc_settings.for_commands()
    for name in ("torch", "prefect", "mlflow"):
        importlib.import_module(name)
    from pokesprite.models.text import TextEncoder
    from pokesprite.tracking import configure_mlflow

    configure_mlflow(folder)
    encoder = TextEncoder.from_pretrained("bundled", dim=32, max_tokens=32)
    encoder.encode_hidden(["a small yellow creature with red cheeks"])
    print(json.dumps({"work_ended": time.time(), "work": time.time() - began,
                      "collections": [g["collections"] for g in gc.get_stats()]}), flush=True)


def measure(mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pokesprite-gc-") as folder:
        start = time.time()
        out = subprocess.run([sys.executable, __file__, "--child", mode, folder], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        ended = time.time()
    if out.returncode:
        raise SystemExit(f"the {mode} process failed:\n{out.stderr[-3000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"total": ended - start, "work": report["work"], "exit": ended - report["work_ended"],
            "collections": report["collections"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="processes per setting (default 5)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    runs = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            runs[mode].append(measure(mode))
            print(f"{rep + 1}/{args.reps} {mode:8s} {runs[mode][-1]['total']:6.2f} s", file=sys.stderr, flush=True)
    print("| settings | total s | work s | exit s | collections (gen 0 / 1 / 2) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in runs[mode]) for k in ("total", "work", "exit")}
        gens = " / ".join(str(round(statistics.median(r["collections"][g] for r in runs[mode]))) for g in range(3))
        print(f"| {mode} | {med['total']:.2f} | {med['work']:.2f} | {med['exit']:.2f} | {gens} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
