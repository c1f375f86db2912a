"""Host side of the real-Xen test: boot Xen + dom0 under QEMU, read the verdict.

``boot()`` starts QEMU (TCG) with Xen as the multiboot kernel and dom0's
kernel and initramfs as modules, shares this machine's root read-only into
dom0 over virtio-9p, and reads the serial console until dom0's harness
(``dom0.py``) prints its ``REALXEN RESULT`` line, or until the time runs
out.  Every console line is kept in a log file.

As a command it runs the test by hand, or many times to measure how
reliable it is::

    python3 tests/realxen/harness.py [--runs N] [--backend pvcalls|standin|linux]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE = HERE / "cache"

XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=768M,max:768M dom0_max_vcpus=2"
    # Xen's SMAP/SMEP handling crashes dom0 under QEMU's TCG.
    " smap=0 smep=0 loglvl=warning guest_loglvl=all noreboot"
)
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen loglevel=4"
# Every feature TCG has, but XSAVE (and so AVX): with it, computations in
# dom0 user space went wrong in about one boot in five on a loaded machine
# (see README.md, "Timing and reliability"); Xen then uses FXSAVE.
CPU = "max,xsave=off,avx=off,avx2=off,xsaveopt=off,xsavec=off,xsaves=off"


@dataclass
class RunResult:
    """What one boot showed.  ``step`` names the failing step, if any."""

    passed: bool
    step: str | None
    details: str
    seconds: float
    lines: list[str] = field(repr=False)
    log: Path | None = None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    @property
    def stalled(self) -> bool:
        return self.step in ("timeout", "qemu-exited")


def qemu_command(
    manifest: dict[str, str], cmdfile: Path, accel: str = "tcg,thread=multi", cpu: str = CPU
) -> list[str]:
    # realxen.repo: dom0 lays tmpfs over /tmp, /run, /var/lib and /var/log of
    # this machine's root; a checkout below one of them is bound back in.
    dom0 = (f"{manifest['dom0_kernel']} {DOM0_CMDLINE} realxen.cmd={cmdfile}"
            f" realxen.repo={REPO}")
    return [
        "qemu-system-x86_64",
        "-machine", "q35", "-accel", accel, "-cpu", cpu,
        "-smp", "2", "-m", "2048",
        "-display", "none", "-vga", "none", "-nodefaults", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", manifest["xen"],
        "-append", XEN_CMDLINE,
        "-initrd", f"{dom0},{manifest['dom0_initrd']}",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]


def dom0_command(
    manifest: dict[str, str], backend: str, nbytes: int, python: str, trace: bool,
    timeout: float,
) -> list[str]:
    return [
        # faulthandler: should the backend's process die of a signal (heap
        # corruption was seen), every thread's Python stack is printed.
        python, "-u", "-X", "faulthandler", str(HERE / "dom0.py"),
        "--backend", backend,
        "--domu-kernel", manifest["domu_kernel"],
        "--domu-initrd", manifest["domu_initrd"],
        "--nbytes", str(nbytes),
        "--linux-backend", manifest["linux_backend"],
        # dom0's clock starts a few seconds after QEMU's; keep a margin for
        # the failure report to reach the console.
        "--budget", str(max(30.0, timeout - 20.0)),
    ] + (["--trace"] if trace else [])


def compile_bytecode(python: str) -> None:
    """Byte-compile what dom0 imports, here, where it is fast.

    dom0 sees this tree read-only through 9p and would otherwise compile
    every module from source under TCG on each boot, which costs tens of
    seconds.  Up-to-date files are skipped, so this is cheap when run again.
    """
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    targets = [REPO / "workqueue", REPO / "xenback", REPO / "pvcalls", HERE, Path(site)]
    subprocess.run(
        [python, "-m", "compileall", "-q", "-x", r"/cache/",
         *[str(t) for t in targets if t.exists()]],
        check=True, stdout=subprocess.DEVNULL, timeout=300,
    )


def run_bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, capture_output=True, text=True)`` in a session
    of its own; on timeout the whole process group is killed (not just
    ``argv[0]``: prepare.py's apt-get, dpkg or make would otherwise run on,
    holding the dpkg lock) and :class:`subprocess.TimeoutExpired` raised."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _reader(stream: IO[bytes], lines: queue.Queue[str | None], start: float) -> None:
    """Console lines, each stamped with the seconds since QEMU started."""
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\r\n")
        lines.put(f"{time.monotonic() - start:7.2f} {text}")
    lines.put(None)


def boot(
    cache: Path = DEFAULT_CACHE,
    *,
    backend: str = "pvcalls",
    nbytes: int = 1 << 20,
    timeout: float = 240.0,
    python: str = sys.executable,
    log: Path | None = None,
    echo: bool = False,
    trace: bool = False,
    accel: str = "tcg,thread=multi",
    cpu: str = CPU,
) -> RunResult:
    """Boot once and return what the console said; never raises on failure
    (a host-side failure before QEMU runs is step ``host-setup``)."""
    start = time.monotonic()
    cmdfile = cache / "run" / f"dom0-cmd-{os.getpid()}"
    try:
        manifest = json.loads((cache / "out/manifest.json").read_text())
        cmdfile.parent.mkdir(exist_ok=True)
        compile_bytecode(python)
        cmdfile.write_text(
            "\n".join(dom0_command(manifest, backend, nbytes, python, trace, timeout)) + "\n")
        start = time.monotonic()
        proc = subprocess.Popen(
            qemu_command(manifest, cmdfile, accel, cpu),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        cmdfile.unlink(missing_ok=True)
        return RunResult(False, "host-setup", f"before QEMU ran: {type(exc).__name__}: {exc}",
                         time.monotonic() - start, [], None)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines, start), daemon=True).start()
    seen: list[str] = []
    step: str | None = "timeout"
    details = f"no REALXEN RESULT within {timeout:.0f} s"
    passed = False
    last_step = "xen-boot"
    try:
        deadline = start + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                details += f" (last step seen: {last_step})"
                break
            if line is None:
                step, details = "qemu-exited", f"QEMU exited (last step seen: {last_step})"
                break
            seen.append(line)
            if echo:
                print(line, flush=True)
            if m := re.search(r"(?:REALXEN|PVSHIM) STEP (\S+)", line):
                last_step = m.group(1)
            if m := re.search(r"REALXEN RESULT (PASS|FAIL) ?(.*)", line):
                passed = m.group(1) == "PASS"
                if passed:
                    step, details = None, ""
                else:
                    step, _, details = m.group(2).partition(": ")
                break
    finally:
        # dom0 powers off by itself, but Xen then only halts; end QEMU.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        cmdfile.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(seen) + "\n")
    return RunResult(passed, step, details, seconds, seen, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="boot the real-Xen test by hand")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--backend", choices=["pvcalls", "standin", "linux"], default="pvcalls")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--nbytes", type=int, default=1 << 20)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--echo", action="store_true", help="print the console as it comes")
    parser.add_argument("--accel", default="tcg,thread=multi", help="QEMU's -accel")
    parser.add_argument("--cpu", default=CPU, help="QEMU's -cpu")
    parser.add_argument("--trace", action="store_true",
                        help="log xenstored's pvcalls trace even when the run passes")
    parser.add_argument("--python", default=str(REPO / ".venv/bin/python"))
    args = parser.parse_args(argv)
    passes = 0
    for i in range(args.runs):
        result = boot(
            args.cache, backend=args.backend, nbytes=args.nbytes, timeout=args.timeout,
            python=args.python, log=args.cache / "logs" / f"run-{int(time.time())}-{i}.log",
            echo=args.echo, trace=args.trace, accel=args.accel, cpu=args.cpu,
        )
        passes += result.passed
        verdict = "PASS" if result.passed else f"FAIL {result.step}: {result.details}"
        print(f"run {i + 1}/{args.runs}: {verdict} ({result.seconds:.1f} s) log {result.log}",
              flush=True)
        if not result.passed and not args.echo:
            print(result.tail(25), flush=True)
    print(f"{passes}/{args.runs} passed")
    return 0 if passes == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
