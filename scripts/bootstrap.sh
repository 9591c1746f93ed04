#!/usr/bin/env bash
# Creates ./.venv (once) and installs decode_accel with its test, benchmark and napari extras.
# torch==2.13.0 is installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
#
# The napari plugin's viewer tests (tests/test_napari.py) also need an X server and the libraries of Qt's
# xcb platform and of Mesa's software OpenGL. Run as root where apt-get exists (CI, a fresh Debian/Ubuntu
# machine), this script installs the Debian packages below once (quietly; the log is .venv/napari-apt.log);
# otherwise, or when that fails, those tests skip and name what is missing. DECODE_ACCEL_NAPARI=0 leaves
# out both the napari extra (~300 MB from PyPI) and the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NAPARI=${DECODE_ACCEL_NAPARI:-1}
# Xvfb (it pulls libgl1 -> Mesa's GLX and llvmpipe), fontconfig for vispy, glib + dbus for Qt, and the xcb
# libraries PyQt5's libqxcb.so links against; checked on a bare Debian 12 (debootstrap minbase): there they
# took 57 s to install (apt-get update included; ~60 MB, mostly Mesa/LLVM); installed, the check is 11 dpkg-query
# calls. A mirror that does not answer costs at most the timeouts below, once.
NAPARI_DEBS=(xvfb libfontconfig1 libglib2.0-0 libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
             libxcb-keysyms1 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0)

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi

install_napari_debs() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 || return 0
    local missing=() p
    for p in "${NAPARI_DEBS[@]}"; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    local log=.venv/napari-apt.log failed=.venv/.napari-apt-failed
    # one try per package list: a machine without a package mirror is not asked again on every test run
    if [ -f "$failed" ] && [ "$(cat "$failed")" = "${missing[*]}" ]; then
        return 0
    fi
    local apt=(apt-get -y -qq -o DPkg::Lock::Timeout=120 -o Acquire::Retries=2 -o Acquire::http::Timeout=30)
    export DEBIAN_FRONTEND=noninteractive
    echo "bootstrap: apt-get install ${missing[*]} (for the napari viewer tests; log: $log)"
    # without package lists (a fresh container) the install fails at once: fetch them, then install
    if ! timeout 600 "${apt[@]}" install --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        if ! { timeout 300 "${apt[@]}" update >>"$log" 2>&1 &&
               timeout 600 "${apt[@]}" install --no-install-recommends "${missing[@]}" >>"$log" 2>&1; }; then
            echo "${missing[*]}" >"$failed"
            echo "bootstrap: could not install ${missing[*]} (see $log; rm $failed to retry);" \
                 "the napari viewer tests will skip" >&2
            return 0
        fi
    fi
    rm -f "$failed"
}

# pip's output goes to .venv/pip.log (its warnings about package mirrors and editable installs are noise on
# every fresh set-up); a failure shows the log's end
pip_install() {
    if ! .venv/bin/python -m pip install -q "$@" >>.venv/pip.log 2>&1; then
        echo "bootstrap: pip install $* failed; the end of .venv/pip.log:" >&2
        tail -n 20 .venv/pip.log >&2
        return 1
    fi
}

stamp=.venv/.decode_accel_installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    echo "bootstrap: installing torch and decode_accel[all] into .venv (log: .venv/pip.log)"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    pip_install "torch==2.13.0"
    pip_install -e ".[all]"
    touch "$stamp"
fi
if [ "$NAPARI" != 0 ]; then
    install_napari_debs
    # the extra on its own, once: without it the rest of the suite still runs (the napari tests skip)
    if ! .venv/bin/python -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('napari', 'pytestqt', 'PyQt5')))" 2>/dev/null; then
        echo "bootstrap: installing the napari extra into .venv (log: .venv/pip.log)"
        pip_install -e ".[napari]" || echo "bootstrap: without the napari extra the napari tests skip" >&2
    fi
fi
