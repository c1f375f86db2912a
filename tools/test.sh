#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine, then runs
# ruff, mypy and the whole suite (arguments go to pytest).  Root (CI) or a
# user with sudo.  The real-Xen test installs its own packages
# (tests/realxen/prepare.py) and skips, saying why, where it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/debian-packages.sh

# gcc and Python's headers build the barrier helper; xenstore-utils and
# xen-utils-4.17 are the conformance clients of the simulated XenStore;
# libxen-dev has the headers the layout tests compile against.
install_debian_packages gcc libc6-dev python3-dev python3-venv \
    xenstore-utils xen-utils-4.17 libxen-dev

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
# The suite is CPU-bound (most of its time goes to the Ctrl-C sweeps, each
# landing a signal at every place of a call): one worker per CPU, up to
# four, each test in its own worker's main thread (signals need it).
# "-n 0" among the arguments runs it in this process instead.
.venv/bin/python -m pytest -n auto --maxprocesses 4 --dist worksteal "$@"
