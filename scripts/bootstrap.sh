#!/usr/bin/env bash
# Creates ./.venv (once) and installs decode_accel with its test and benchmark extras.
# torch==2.13.0 is installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
# DECODE_ACCEL_NAPARI=1 also installs the napari extra (napari + PyQt5, ~300 MB from PyPI, once); by default it
# is left out, so the default setup stays small and its napari tests skip (they also need Xvfb: apt install xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.decode_accel_installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[all]"
    touch "$stamp"
fi
if [ "${DECODE_ACCEL_NAPARI:-0}" = 1 ] && ! .venv/bin/python -c "import napari, pytestqt" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q -e ".[napari]"
fi
