#!/usr/bin/env bash
# Installs the project on a fresh Debian 12 machine and runs the main job:
# the PV Calls demo on the embedded simulated Xen host.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# A C compiler and Python's headers build the one compiled helper (memory
# barriers for shared rings); venv makes an environment pip may write to.
DEB_PACKAGES="gcc libc6-dev python3-dev python3-venv"
if command -v apt-get >/dev/null; then
    missing=""
    for p in $DEB_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e .
exec .venv/bin/pvcalls-backend demo "$@"
