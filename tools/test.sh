#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian 12 machine, then runs
# the whole suite, ruff and mypy.  Root (CI) or a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
DEB_PACKAGES="gcc libc6-dev python3-dev python3-venv xenstore-utils xen-utils-4.17 libxen-dev"
# The real-Xen test brings its own packages (tests/realxen/prepare.sh).
if command -v apt-get >/dev/null; then
    missing=""
    for p in $DEB_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        $SUDO apt-get update -qq || echo "apt-get update failed; Debian-package tests may skip" >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null \
            || echo "could not install:$missing; the tests that need them skip" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
