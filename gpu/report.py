"""The committed record of a GPU run: reports/gpu/metrics.json from what gpu/run.sh brought back.

    python gpu/report.py RUN_DIR [--dest reports/gpu]

RUN_DIR is the folder gpu/run.sh filled (its metrics.json, sample_grid.png, ...). Writes DEST/metrics.json:
the headline numbers at the top level (device, date, fid, kid, recon_psnr, independent_r_precision
after and before stage 3, fid_all / kid_all, memorisation, seed_schedule_train_seconds), a
``throughput`` object keyed by stage (samples/s, TFLOP/s, matmul_fraction, ...), the guidance
curve, the training each stage did, the recipe variant's numbers beside the main run's, and the
whole collected report under ``run``. Copies the pictures (sample_grid.png, memorisation.png,
guidance_curve.png, variant_sample_grid.png) beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HEADLINE = ("fid", "kid", "kid_std", "fid_real", "kid_real", "fid_all", "kid_all", "kid_all_std", "fid_all_generated_sprites",
            "recon_psnr", "recon_ssim", "independent_r_precision", "independent_r_precision_before",
            "independent_r_precision_real", "stage3_scorer_r_precision", "stage3_scorer_r_precision_before",
            "chance_r_precision", "memorisation_rate", "memorisation_threshold", "text_sensitivity")
COMPARED = ("fid", "kid", "kid_std", "independent_r_precision", "independent_r_precision_before",
            "text_sensitivity")
PICTURES = ("sample_grid.png", "memorisation.png", "guidance_curve.png", "variant_sample_grid.png")


def training(stage_metrics: dict) -> dict:
    """Per training stage: epochs trained, wall seconds and the final numbers the stage reported."""
    return {s: {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for s, m in stage_metrics.items() if s in ("vae", "diffusion", "finetune")}


def build(run: dict) -> dict:
    evaluate = run.get("metrics", {}).get("evaluate", {})
    throughput = run.get("throughput", {})
    stages = throughput.get("stages", {})
    report = {"device": run.get("device"), "date": run.get("date"), "git_commit": run.get("git_commit"),
              "config": run.get("config"), "torch": run.get("torch"),
              **{k: evaluate.get(k) for k in HEADLINE if k in evaluate},
              "seed_schedule_train_seconds": throughput.get("seed_schedule_s", {}).get("total"),
              "throughput": {name: {"batch": r.get("batch"), "samples_per_s": r.get("samples_per_s"),
                                    "step_ms": r.get("step_ms"), "gflop_per_sample": r.get("gflop_per_sample"),
                                    "achieved_tflops": r.get("achieved_tflops"),
                                    "matmul_fraction": r.get("fraction_of_matmul_peak"),
                                    "seed_schedule_seconds": throughput.get("seed_schedule_s", {}).get(name)}
                             for name, r in stages.items()},
              "matmul_tflops": throughput.get("matmul_tflops"),
              "throughput_sweep": throughput.get("sweep", []),
              "guidance_curve": {k: v for k, v in evaluate.items() if k.startswith("guidance.")},
              "training": training(run.get("metrics", {})),
              "stage_wall_seconds": run.get("stage_wall_seconds"),
              "fitted_budgets": run.get("fitted_budgets"),
              "steps": run.get("steps")}
    variant = run.get("variant")
    if variant:
        v_eval = variant.get("metrics", {}).get("evaluate", {})
        report["variant"] = {"set": variant.get("set"),
                             "compared": {k: {"main": evaluate.get(k), "variant": v_eval.get(k)}
                                          for k in COMPARED if k in evaluate or k in v_eval},
                             "training": training(variant.get("metrics", {}))}
    report["run"] = run
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--dest", type=Path, default=Path("reports/gpu"))
    args = ap.parse_args(argv)
    source = args.run_dir / "metrics.json"
    if not source.is_file():
        raise SystemExit(f"{source}: not found; give the folder gpu/run.sh wrote")
    report = build(json.loads(source.read_text()))
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name in PICTURES:
        if (args.run_dir / name).is_file():
            shutil.copyfile(args.run_dir / name, args.dest / name)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
