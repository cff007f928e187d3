#!/usr/bin/env bash
# The GPU check (issue 19): one command for the first GPU machine that comes; see README "Development".
#   bash scripts/gpu_check.sh              all rows, <= 8 min; gpu-check.json/.md/.log in $OUT (./gpu-check-out)
#   bash scripts/gpu_check.sh --dry-run    the plan, and whether the wheelhouse is complete (any machine)
#   bash scripts/gpu_check.sh --rows env,distill_bf16    some rows;  --mode cpu: every row at toy shapes on a CPU
# Installs the wheels of scripts/gpu_wheelhouse.sh (folder .whl, or $MINIOPRD_WHEELHOUSE) into a private folder
# without touching the machine's packages or asking any index, and runs minioprd from this working tree
# (PYTHONPATH, no `pip install -e`: pyproject's pins are not what that machine has, and it has no network).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
WHEELHOUSE="${MINIOPRD_WHEELHOUSE:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MINIOPRD_HOME="${MINIOPRD_HOME:-/tmp/minioprd-gpu-check-home}"
export MINIOPRD_GPU_CHECK_WORK="${MINIOPRD_GPU_CHECK_WORK:-/tmp/minioprd-gpu-check-work}"
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
  SITE=/tmp/minioprd-gpu-check-site
  rm -rf "$SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELHOUSE"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: installing $WHEELHOUSE failed: rows that need bitsandbytes will not run" >&2
  fi
elif [ "$dry" = 0 ]; then
  echo "warning: no wheels in $WHEELHOUSE (bash scripts/gpu_wheelhouse.sh, carry .whl): NF4 rows will not run" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The check stops starting rows at 460 s; this is the backstop for the whole command (8 min).
timeout -k 5 480 "$PY" -m minioprd.gpucheck --out "$OUT" --wheelhouse "$WHEELHOUSE" "$@"
rc=$?
[ "$rc" = 124 ] && echo "gpu check: stopped at 480 s; $OUT/gpu-check.json holds the rows done" >&2
exit $rc
