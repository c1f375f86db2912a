#!/usr/bin/env bash
# Installs the project on a fresh Debian 12 machine and runs the main job:
# the PV Calls demo on the embedded simulated Xen host.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/debian-packages.sh

# A C compiler and Python's headers build the one compiled helper (memory
# barriers for shared rings); venv makes an environment pip may write to.
install_debian_packages gcc libc6-dev python3-dev python3-venv

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e .
exec .venv/bin/pvcalls-backend demo "$@"
