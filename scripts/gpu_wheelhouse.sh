#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks (minioprd/gpucheck.py WHEELS) for its Python 3.12 / manylinux x86_64,
# into .whl/ (or $1), which git ignores and the device tool carries (`carry=[".whl"]`, 64 MiB at most).
# Needs pip and a package index; then checks the folder with the GPU check's --dry-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
specs=$(PYTHONPATH="$PWD" "$PY" -c "from minioprd.gpucheck import WHEELS; print(' '.join(f'{k}=={v}' for k, v in WHEELS.items()))")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" $specs
# one version of each package only (two stop the whole install there): drop wheels no longer asked for
keep=$(PYTHONPATH="$PWD" "$PY" -c "
import sys; from pathlib import Path; from minioprd.gpucheck import wheelhouse_status
print(' '.join(wheelhouse_status(Path(sys.argv[1]))['extra']))" "$DEST")
for f in $keep; do rm -f "$DEST/$f"; done
ls -l "$DEST"
PYTHONPATH="$PWD" "$PY" -m minioprd.gpucheck --dry-run --wheelhouse "$DEST"
