"""Copy a profile with its training budgets (``train.max_minutes``) scaled down to fit the time left.

    python gpu/fit_budgets.py CONFIG DEST SECONDS [--overhead 180]

SECONDS is what the train command may take; OVERHEAD the part of it that no budget governs
(preprocess, reference, alignment, evaluation, model loading: about 3 minutes on an H100 with
profiles/gpu.yaml). Budgets that already fit, and 0 (= no budget), are kept. Prints and writes
(DEST's folder / fitted_budgets.json) what it did.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

STAGES = ("vae", "diffusion", "finetune")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("seconds", type=float)
    ap.add_argument("--overhead", type=float, default=180.0)
    args = ap.parse_args(argv)
    params = yaml.safe_load(args.config.read_text())
    before = {s: float(params.get(s, {}).get("train", {}).get("max_minutes", 0) or 0) for s in STAGES}
    available = max(args.seconds - args.overhead, 0.0) / 60
    total = sum(before.values())
    scale = min(1.0, available / total) if total > 0 else 1.0
    after = {s: round(max(m * scale, 0.05), 3) if m > 0 else 0.0 for s, m in before.items()}
    for s, m in after.items():
        if s in params and "train" in params[s]:
            params[s]["train"]["max_minutes"] = m
    args.dest.write_text(yaml.safe_dump(params, sort_keys=False))
    record = {"config": str(args.config), "train_seconds": args.seconds, "overhead_s": args.overhead,
              "scale": round(scale, 3), "max_minutes_before": before, "max_minutes_after": after}
    (args.dest.parent / "fitted_budgets.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
