"""Copy a profile with its training budgets and evaluation size fitted to the time left.

    python gpu/fit_budgets.py CONFIG DEST SECONDS [--overhead 180] [--throughput JSON]
                              [--eval-share 0.35] [--held-out 180] [--fallback-rate R]
                              [--set KEY=VALUE ...]

SECONDS is what the train command may take. OVERHEAD is the part that neither a budget nor the
evaluation's drawing governs (preprocess, reference, alignment, model loading, each stage's work
beyond its ``train.max_minutes``, the evaluation's scoring). Measured on an H200 with
profiles/gpu.yaml: preprocess 5 s, reference 35 s, alignment 8 s, and beyond their budgets the VAE
8 s, the diffusion stage 33 s (encoding latents, the sample grid, with a variant run beside it);
the evaluation's own share is not measured yet, hence the default of 180 s. With THROUGHPUT
(benchmarks/gpu_throughput.py's JSON, which measures drawing as the evaluation does: its ``sample``
stage), the evaluation's drawing time is estimated too:

    sprites = held-out x (1 + 1 before stage 3 + the guidance scales other than the model's) + fid_samples

and when drawing would take more than EVAL_SHARE of SECONDS - OVERHEAD, ``evaluate.fid_samples`` is
lowered (to a multiple of ``evaluate.batch_size``, or 0) until it fits. Without a measured rate
(no JSON, or a benchmark cut short), FALLBACK_RATE sprites/s is assumed when given. The training budgets
(``train.max_minutes`` of vae, diffusion, finetune) are then scaled down together to what is left;
budgets that already fit, and 0 (= no budget), are kept. Prints and writes (DEST's folder /
fitted_<DEST's stem>.json) what it did. SECONDS 0 keeps the budgets and the evaluation as they are.
``--set diffusion.prediction=v`` (dotted key, YAML value) changes a key first; its section must exist.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

STAGES = ("vae", "diffusion", "finetune")
DRAW_MARGIN = 1.25  # drawing estimates are multiplied by this (a busier GPU, the first batch's warm-up)


def held_out_draws(evaluate: dict, guidance_scale: float, held_out: int) -> int:
    """Sprites the evaluation draws in batches besides ``fid_samples``: the held-out set, again with the
    stage-2 text encoder, and once per guidance-curve scale other than the model's own."""
    n = min(held_out, evaluate.get("max_captions") or held_out)
    extra_scales = [s for s in evaluate.get("guidance_scales") or [] if float(s) != float(guidance_scale)]
    return n * (2 + len(extra_scales))


def set_keys(params: dict, items: list[str]) -> dict:
    """Apply ``KEY=VALUE`` items (YAML values; dotted keys whose section exists in ``params``, naming a
    value, not a section; pokesprite's config loader rejects a misspelt leaf); return them as a dict."""
    done = {}
    for item in items:
        key, sep, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict) or isinstance(node.get(leaf), dict):
            raise SystemExit(f"--set {item}: expected KEY=VALUE with a dotted KEY of the profile")
        node[leaf] = done[key] = yaml.safe_load(value)
    return done


def fit(params: dict, seconds: float, overhead: float, sprites_per_s: float | None = None,
        eval_share: float = 0.35, held_out: int = 180) -> dict:
    """Change ``params`` in place (max_minutes, maybe evaluate.fid_samples); return what was done."""
    evaluate = params.setdefault("evaluate", {})
    record = {"train_seconds": seconds, "overhead_s": overhead, "sprites_per_s": sprites_per_s,
              "fid_samples_before": int(evaluate.get("fid_samples") or 0)}
    if seconds <= 0:
        return record
    draw_s = 0.0
    if sprites_per_s:
        batch = int(evaluate.get("batch_size") or 1)
        scale = float(params.get("diffusion", {}).get("sample", {}).get("guidance_scale", 1.0))
        fixed = held_out_draws(evaluate, scale, held_out)
        per_sprite = DRAW_MARGIN / sprites_per_s
        room = max(eval_share * (seconds - overhead) - fixed * per_sprite, 0.0)
        fid = record["fid_samples_before"]
        if fid * per_sprite > room:
            fid = int(room / per_sprite) // batch * batch
            fid = fid if fid >= 2 else 0
            evaluate["fid_samples"] = fid
        draw_s = (fixed + fid) * per_sprite
        record.update({"held_out_draws": fixed, "fid_samples": fid, "draw_seconds_estimate": round(draw_s, 1)})
    before = {s: float(params.get(s, {}).get("train", {}).get("max_minutes", 0) or 0) for s in STAGES}
    available = max(seconds - overhead - draw_s, 0.0) / 60
    total = sum(before.values())
    factor = min(1.0, available / total) if total > 0 else 1.0
    after = {s: round(max(m * factor, 0.05), 3) if m > 0 else 0.0 for s, m in before.items()}
    for s, m in after.items():
        if s in params and "train" in params[s]:
            params[s]["train"]["max_minutes"] = m
    record.update({"scale": round(factor, 3), "max_minutes_before": before, "max_minutes_after": after})
    return record


def sampling_rate(throughput: Path | None) -> float | None:
    """Sprites per second of the benchmark's ``sample`` stage, or None when it was not measured."""
    if throughput is None or not throughput.is_file():
        return None
    try:
        return float(json.loads(throughput.read_text())["stages"]["sample"]["samples_per_s"])
    except (ValueError, KeyError, TypeError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("seconds", type=float)
    ap.add_argument("--overhead", type=float, default=180.0)
    ap.add_argument("--throughput", type=Path, help="benchmarks/gpu_throughput.py --json output")
    ap.add_argument("--eval-share", type=float, default=0.35,
                    help="at most this share of SECONDS - OVERHEAD for drawing (lowers evaluate.fid_samples)")
    ap.add_argument("--held-out", type=int, default=180, help="validation + test sprites")
    ap.add_argument("--fallback-rate", type=float, default=0.0,
                    help="sprites/s to assume when THROUGHPUT has no sample stage (0: leave the evaluation as it is)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change these keys first")
    args = ap.parse_args(argv)
    params = yaml.safe_load(args.config.read_text())
    rate = sampling_rate(args.throughput)
    record = {"config": str(args.config), "set": set_keys(params, args.set),
              "sprites_per_s_measured": rate is not None,
              **fit(params, args.seconds, args.overhead, rate or args.fallback_rate or None, args.eval_share,
                    args.held_out)}
    args.dest.write_text(yaml.safe_dump(params, sort_keys=False))
    (args.dest.parent / f"fitted_{args.dest.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
