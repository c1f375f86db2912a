"""The real-Xen harness's host side, without booting anything: what it does
when the host cannot even start QEMU, and that a time limit ends every
process it started."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from scripts import load_script

HERE = Path(__file__).resolve().parent


harness = load_script(HERE / "harness.py", "realxen_harness_host")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_a_time_limit_ends_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        harness.run_bounded(["sh", "-c", script], timeout=1)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(grandchild):
        assert time.monotonic() < deadline, f"pid {grandchild} outlived the time limit"
        time.sleep(0.05)


def test_no_manifest_is_a_failed_boot_not_an_exception(tmp_path: Path) -> None:
    result = harness.boot(tmp_path, timeout=5)
    assert not result.passed and result.step == "host-setup"
    assert "manifest.json" in result.details


def test_a_host_failure_before_qemu_leaves_no_command_file(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/manifest.json").write_text(json.dumps({"xen": "x"}))
    result = harness.boot(tmp_path, python=str(tmp_path / "no-such-python"), timeout=5)
    assert not result.passed and result.step == "host-setup"
    assert list((tmp_path / "run").iterdir()) == []
