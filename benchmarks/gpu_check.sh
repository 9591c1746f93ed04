#!/usr/bin/env bash
# One-shot GPU check (issue 15.3): training samples/s (bf16, DECODE-size net, 40² and 64², compile and
# channels-last, simulator on the GPU), predict frames/s at 256² and 2048². At most ~8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: JSON + log under $OUT (or ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run  # the same code paths on the CPU in tiny sizes (default test suite)
#
# The GPU image has torch and accelerate but no pydantic: wheels carried with the run (WHEELS=dir, default
# shared/wheels) are installed into a scratch folder with pip --no-index; never run scripts/bootstrap.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  WHEELS="${WHEELS:-shared/wheels}"
  SITE="$(mktemp -d)/site"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" pydantic
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
LIMIT=480
[[ " $* " == *" --dry-run "* ]] && LIMIT=300
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
