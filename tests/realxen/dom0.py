"""The dom0 half of the real-Xen test.

dom0-init.sh runs this inside dom0 (a real Linux dom0 on a real Xen, under
QEMU), chrooted into this machine's root shared read-only over virtio-9p, so
it runs with the project's own virtualenv.  It:

1. starts Debian's ``xenstored``, ``xen-init-dom0`` and ``xenconsoled``;
2. starts the pvcalls backend on the ``xen`` platform in this process
   (``--backend pvcalls``), or the handshake-only stand-in
   (``--backend standin``), or Linux's pvcalls-back (``--backend linux``);
3. starts an echo server on 127.0.0.1 and creates a PV domU with
   ``pvcalls = [ "backend=0" ]`` whose initramfs loads pvshim.ko;
4. follows the domU's console, connects a client when the guest says it
   listens, and checks the echo of that client's data; before that client
   connects, it checks that a grant mapping of the guest's page unmapped,
   or a page dom0 shares unshared, while a slice of it is held leaves the
   slice harmless;
5. waits for the domU to power off and checks that the backend let go of
   everything: device Closed or removed, no socket, mapping or port left.

It reports on its stdout, which is dom0's console and so QEMU's serial port::

    REALXEN STEP <name> OK|FAIL <details>
    REALXEN RESULT PASS
    REALXEN RESULT FAIL <step>: <details>

and copies the guest's console lines prefixed with ``domU| ``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

XEN_BIN = Path("/usr/lib/xen-4.17/bin")
XENSTORED_SOCKET = Path("/run/xenstored/socket")
XENSTORED_TRACE = Path("/var/log/xen/xenstored-trace.log")
CONSOLE_DIR = Path("/var/log/xen/console")
DOMU_NAME = "realxen-domu"
LISTEN_PORT = 7000
REAP_TIMEOUT = 30  # seconds xl gets to destroy a guest that powered off
XL_TIMEOUT = 30  # seconds any xl list/destroy may take (xl was seen to abort, so maybe hang)

_out_lock = threading.Lock()


def say(line: str) -> None:
    """One line on dom0's console; lines of different threads never mix."""
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class StepFailed(Exception):
    def __init__(self, step: str, details: str) -> None:
        super().__init__(f"{step}: {details}")
        self.step = step
        self.details = details


def step_ok(step: str, details: str = "") -> None:
    say(f"REALXEN STEP {step} OK {details}".rstrip())


def wait_until(predicate: Callable[[], Any], timeout: float, step: str, what: str) -> Any:
    """Poll ``predicate`` until it returns something true, or fail ``step``.

    Used for conditions of other processes (a socket file appearing, a
    domain disappearing) that offer nothing to block on from here.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(step, f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class Backend(Protocol):
    def stop(self) -> None: ...

    def holdings(self, domid: int) -> dict[str, list[str]]: ...

    def leftovers(self, domid: int) -> list[str]: ...


# -- Xen daemons -------------------------------------------------------------


def start_xen_daemons(procs: list[subprocess.Popen[bytes]]) -> None:
    t0 = time.monotonic()
    procs.append(subprocess.Popen(
        [str(XEN_BIN / "xenstored"), "-N", "-T", str(XENSTORED_TRACE)],
        stdout=subprocess.DEVNULL,
    ))
    wait_until(XENSTORED_SOCKET.exists, 30, "xenstored", str(XENSTORED_SOCKET))
    try:
        init = subprocess.run([str(XEN_BIN / "xen-init-dom0")], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        raise StepFailed("xen-init-dom0", "did not exit within 60 s") from None
    if init.returncode != 0:
        raise StepFailed("xen-init-dom0", init.stdout + init.stderr)
    procs.append(subprocess.Popen([
        str(XEN_BIN / "xenconsoled"), "-i", "--log=guest", f"--log-dir={CONSOLE_DIR}",
    ]))
    step_ok("xen-daemons", f"{time.monotonic() - t0:.1f}s")


def start_backend(kind: str, linux_backend: str | None) -> Backend:
    t0 = time.monotonic()
    backend: Backend
    if kind == "standin":
        from standin import StandinBackend

        standin = StandinBackend(str(XENSTORED_SOCKET), say)
        standin.start()
        backend = standin
    elif kind == "linux":
        from linuxbackend import LinuxBackend

        if linux_backend is None:
            raise StepFailed("backend-start", "--backend linux needs --linux-backend PATH")
        backend = LinuxBackend(linux_backend, say)
    else:
        from realbackend import RealBackend

        backend = RealBackend(say)
    step_ok("backend-start", f"{kind} {time.monotonic() - t0:.1f}s")
    return backend


# -- dom0 peers of the guest's sockets ----------------------------------------


class EchoServer:
    """Echoes every connection to 127.0.0.1:<port> until EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.echoed: list[int] = []  # bytes per finished connection
        self.errors: list[str] = []
        self._lock = threading.Lock()  # guards echoed and errors
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        total = 0
        try:
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
                    total += len(data)
        except OSError as exc:
            with self._lock:
                self.errors.append(f"after {total} bytes: {exc}")
        with self._lock:
            self.echoed.append(total)


class AcceptClient(threading.Thread):
    """Connects to the guest's listening socket, sends random bytes and
    checks that the guest echoes them back exactly; closes only once the
    whole echo is in, which is the guest's cue that it may RELEASE."""

    def __init__(self, port: int, nbytes: int, timeout: float) -> None:
        super().__init__(name="accept-client", daemon=True)
        self.port, self.nbytes, self.timeout = port, nbytes, timeout
        self.result: str | None = None  # "OK ..." or "FAIL ..."

    def run(self) -> None:
        data = os.urandom(self.nbytes)
        expected = hashlib.sha256(data).hexdigest()
        # A second copy, elsewhere in memory, to say what changed if the
        # first one changes under us (a write through a dangling pointer).
        spare = bytearray(data)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as s:
                sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
                sender.start()
                got = 0
                while got < self.nbytes:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    # Checked as it arrives: a difference found here came
                    # over the connection, not from memory changed later.
                    if chunk != data[got:got + len(chunk)]:
                        self.result = "FAIL " + self._describe_mismatch(data, got, chunk)
                        return
                    got += len(chunk)
                sender.join(self.timeout)
            if got != self.nbytes:
                self.result = f"FAIL got back {got} of {self.nbytes} bytes"
            elif hashlib.sha256(data).hexdigest() != expected:
                self.result = "FAIL " + self._describe_overwrite(data, spare)
            else:
                self.result = f"OK sent and got back {got} bytes"
        except OSError as exc:
            self.result = f"FAIL {exc!r}"

    @staticmethod
    def _describe_overwrite(data: bytes, spare: bytearray) -> str:
        """Which bytes of ``data`` changed in place, and where they live."""
        changed = [i for i in range(len(data)) if data[i] != spare[i]]
        if not changed:
            return "the data sent changed in dom0's memory (and changed back)"
        first, last = changed[0], changed[-1]
        # CPython: a bytes object's buffer follows its 32-byte header.
        address = id(data) + 32 + first
        return (f"the data sent was overwritten in dom0's memory while it was sent: "
                f"{len(changed)} bytes changed in offsets {first}..{last} "
                f"(address {address:#x}), now {data[first:first + 16].hex()} "
                f"was {bytes(spare[first:first + 16]).hex()}")

    @staticmethod
    def _describe_mismatch(data: bytes, offset: int, chunk: bytes) -> str:
        """Where the wrong bytes came from: random data makes 32 bytes unique."""
        first = next(i for i, (a, b) in enumerate(zip(chunk, data[offset:], strict=False))
                     if a != b)
        at = offset + first
        window = chunk[first:first + 32]
        source = data.find(window) if len(window) == 32 else -1
        origin = (f"they are the bytes sent at offset {source} ({source - at:+d})"
                  if source >= 0 else "they are not in the data sent (32-byte window)")
        return (f"echo differs at byte {at} (in a {len(chunk)}-byte recv at {offset}): "
                f"got {window[:8].hex()} want {data[at:at + 8].hex()}; {origin}")


# -- the guest ---------------------------------------------------------------


def domu_config(args: argparse.Namespace, echo_port: int) -> str:
    extra = (
        # Quiet boot; the initramfs turns the console up for pvshim.
        "console=hvc0 loglevel=4"
        f" pvshim.echo_port={echo_port} pvshim.listen_port={LISTEN_PORT}"
        f" pvshim.nbytes={args.nbytes} pvshim.step_timeout={args.step_timeout}"
    )
    return "\n".join([
        f'name = "{DOMU_NAME}"',
        'type = "pv"',
        f'kernel = "{args.domu_kernel}"',
        f'ramdisk = "{args.domu_initrd}"',
        f'extra = "{extra}"',
        "memory = 256",
        "vcpus = 1",
        'pvcalls = [ "backend=0" ]',
        'on_poweroff = "destroy"',
        'on_crash = "preserve"',
        "",
    ])


class XlFailed(Exception):
    """xl itself failed: it says nothing about the guest."""


def xl_destroy() -> None:
    """``xl destroy`` the guest; a hanging xl is said, not waited for."""
    try:
        subprocess.run([str(XEN_BIN / "xl"), "destroy", DOMU_NAME], capture_output=True,
                       timeout=XL_TIMEOUT)
    except subprocess.TimeoutExpired:
        say(f"REALXEN NOTE xl destroy did not exit within {XL_TIMEOUT} s")


def domain_exists(name: str) -> bool:
    try:
        return domain_state(name) is not None
    except XlFailed:
        return True  # to be safe: callers destroy what may exist


def domain_state(name: str) -> str | None:
    """xl's state flags of domain ``name`` ("-b----", "---s--", "----c-"...),
    or None once it is gone.

    All domains are listed rather than asking for ``name``: then a failing
    xl (seen to abort on a loaded machine) cannot pass for a missing domain.
    """
    try:
        out = subprocess.run([str(XEN_BIN / "xl"), "list"], capture_output=True, text=True,
                             timeout=XL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise XlFailed(f"xl list did not exit within {XL_TIMEOUT} s") from None
    if out.returncode != 0:
        raise XlFailed(f"xl list exited {out.returncode}: {out.stderr.strip()[-300:]}")
    for line in out.stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[4] if len(fields) >= 6 else "??????"
    return None


class ConsoleFollower:
    """Follows the domU's console log (written by xenconsoled) line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._partial = ""

    def lines(self) -> list[str]:
        if self._file is None:
            if not self.path.exists():
                return []
            self._file = open(self.path, errors="replace")  # noqa: SIM115
        text = self._partial + self._file.read()
        *complete, self._partial = text.split("\n")
        return [line.rstrip("\r") for line in complete]



def check_holding(backend: Backend, domid: int, baseline: dict[str, list[str]]) -> None:
    """While the guest has a connected socket, the backend must visibly hold
    more than before the guest connected (``baseline``: xenstored and
    xenconsoled have event channels to the guest too) in every respect:
    this shows that the release check at the end looks where these things
    really are."""
    held = backend.holdings(domid)
    if not held:  # a backend that cannot tell (Linux's, the stand-in)
        return
    counts = " ".join(
        f"{what.replace(' ', '-')}={len(baseline.get(what, []))}->{len(items)}"
        for what, items in held.items()
    )
    unseen = [what for what, items in held.items()
              if len(items) <= len(baseline.get(what, []))]
    if unseen:
        raise StepFailed("backend-holding", f"nothing seen in {', '.join(unseen)} ({counts})")
    step_ok("backend-holding", counts)


def check_stale_views(backend: Any, domid: int) -> None:
    """A grant mapping unmapped, or shared pages unshared, while a slice of
    them is held must leave the slice harmless: reading and writing it must
    not crash this process (which is the backend's), nor reach the guest
    or the grantee (see realbackend.py)."""
    if not hasattr(backend, "check_unmap_with_view"):
        return  # Linux's backend, the stand-in: nothing of ours to check
    checks = (("unmap-with-view", lambda: backend.check_unmap_with_view(domid)),
              ("unshare-with-view", backend.check_unshare_with_view))
    for step, check in checks:
        try:
            details = check()
        except Exception as exc:  # an assertion or a platform error: the step failed
            raise StepFailed(step, f"{type(exc).__name__}: {exc}") from None
        step_ok(step, details)


def guest_domid() -> int:
    """The guest's domid.  ``xl domid`` was once seen to abort (SIGABRT) on a
    loaded machine; that is the toolstack's trouble, not the backend's, so
    it is said and retried."""
    for _attempt in range(3):
        try:
            out = subprocess.run(
                [str(XEN_BIN / "xl"), "domid", DOMU_NAME], capture_output=True, text=True,
                timeout=XL_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            say(f"REALXEN NOTE xl domid did not exit within {XL_TIMEOUT} s")
            continue
        if out.returncode == 0:
            return int(out.stdout)
        say(f"REALXEN NOTE xl domid exited {out.returncode}: {out.stderr.strip()[-300:]}")
        time.sleep(1)
    raise StepFailed("xl-create", "xl domid failed three times")


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def diagnose(domid: int | None) -> None:
    """What the toolstack and XenStore say, for a failure report."""
    commands = [[str(XEN_BIN / "xl"), "list"],
                ["tail", "-n", "20", f"/var/log/xen/xl-{DOMU_NAME}.log"],
                ["xenstore-ls", "-f", "/local/domain/0/backend/pvcalls"]]
    if domid is not None:
        commands.append(["xenstore-ls", "-f", f"/local/domain/{domid}/device"])
    for argv in commands:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            say(f"diag| {' '.join(argv)}: {exc!r}")
            continue
        for line in (out.stdout + out.stderr).splitlines():
            say(f"diag| {line}")


def run_guest(args: argparse.Namespace, echo: EchoServer, backend: Backend) -> int:
    """Create the domU, follow its scenario, wait until it is gone.

    Returns the domid the guest had."""
    cfg = Path("/run/realxen-domu.cfg")
    cfg.write_text(domu_config(args, echo.port))
    t0 = time.monotonic()
    create = subprocess.run(
        [str(XEN_BIN / "xl"), "create", str(cfg)], capture_output=True, text=True,
        timeout=args.step_timeout,
    )
    if create.returncode != 0:
        raise StepFailed("xl-create", (create.stdout + create.stderr).strip())
    domid = guest_domid()
    step_ok("xl-create", f"dom{domid} {time.monotonic() - t0:.1f}s")
    # The guest needs seconds to boot before its frontend connects.
    baseline = backend.holdings(domid)

    console = ConsoleFollower(CONSOLE_DIR / f"guest-{DOMU_NAME}.log")
    # Give up early enough for the host, whose own budget includes the boot,
    # to read which step hung.
    guest_timeout = min(args.guest_timeout, args.budget - uptime())
    deadline = time.monotonic() + guest_timeout
    client: AcceptClient | None = None
    result: str | None = None
    halted_at: float | None = None
    reaped_by_harness = False
    last_step = "guest-boot"
    while True:
        for line in console.lines():
            say(f"domU| {line}")
            if m := re.search(r"PVSHIM STEP (\S+) (BEGIN|OK|FAIL)(.*)", line):
                last_step = m.group(1)
                if m.group(2) == "FAIL":
                    result = result or f"FAIL {m.group(1)}:{m.group(3)}"
            elif m := re.search(r"PVSHIM LISTENING port=(\d+)", line):
                check_holding(backend, domid, baseline)
                check_stale_views(backend, domid)
                client = AcceptClient(int(m.group(1)), args.nbytes, args.step_timeout)
                client.start()
            elif m := re.search(r"PVSHIM RESULT (PASS|FAIL.*)", line):
                result = result or m.group(1)
            elif re.search(r"reboot: (System halted|Power down)", line):
                halted_at = halted_at or time.monotonic()
        try:
            state = domain_state(DOMU_NAME)
        except XlFailed as exc:
            say(f"REALXEN NOTE {exc}")
            state = "??????"  # unknown: only the deadline below decides
        if state is None:
            break
        if state[4] == "c":
            # on_crash is "preserve" so that the guest's last words reach
            # its console log before it is destroyed.
            time.sleep(2)
            for line in console.lines():
                say(f"domU| {line}")
            diagnose(domid)
            xl_destroy()
            raise StepFailed(last_step, "the guest crashed (its console above)")
        if (halted_at is not None and not reaped_by_harness
                and time.monotonic() - halted_at > REAP_TIMEOUT):
            # The guest is down; reaping it is xl's business, not the
            # backend's (which must cope either way).  Seen about once in
            # ten boots on a loaded machine: xl's daemon never acts.
            say(f"REALXEN NOTE the halted guest was not reaped within {REAP_TIMEOUT} s;"
                " destroying it from the harness")
            diagnose(domid)
            xl_destroy()
            reaped_by_harness = True
            continue
        if time.monotonic() > deadline:
            diagnose(domid)
            raise StepFailed(last_step, f"guest still running after {guest_timeout:.0f} s")
        time.sleep(0.1)
    for line in console.lines():
        say(f"domU| {line}")
    step_ok("domu-gone", f"{time.monotonic() - t0:.1f}s after xl create"
            + (" (destroyed by the harness)" if reaped_by_harness else ""))

    client_result = "never started: the guest did not listen"
    if client is not None:
        client.join(args.step_timeout)
        client_result = client.result or "did not finish"
    if result is None:
        raise StepFailed(last_step, "the guest stopped without a PVSHIM RESULT")
    if result != "PASS":
        # The guest's step comes first; the client's view is the detail.
        step, _, details = result[5:].partition(":")
        if client is not None and not client_result.startswith("OK"):
            details += f" (dom0 client: {client_result})"
        raise StepFailed(step, details.strip() or "guest reported failure")
    step_ok("guest-scenario")
    if not client_result.startswith("OK"):
        raise StepFailed("dom0-accept-client", client_result)
    step_ok("dom0-accept-client", client_result[3:])
    if echo.echoed != [args.nbytes] or echo.errors:
        raise StepFailed("dom0-echo-server", f"echoed {echo.echoed}, errors {echo.errors}")
    step_ok("dom0-echo-server", f"echoed {echo.echoed[0]} bytes")
    return domid


def check_released(backend: Backend, domid: int, timeout: float) -> None:
    """After the guest is gone the backend must hold nothing of it."""
    left: list[str] = []

    def clean() -> bool:
        nonlocal left
        left = backend.leftovers(domid)
        return not left

    try:
        wait_until(clean, timeout, "backend-released", "the backend to release the guest")
    except StepFailed:
        raise StepFailed("backend-released", "; ".join(left)) from None
    step_ok("backend-released")


def dump_xenstore_trace() -> None:
    """The pvcalls part of xenstored's trace: who wrote which node when."""
    try:
        lines = XENSTORED_TRACE.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        if "pvcalls" in line:
            say(f"xs| {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["pvcalls", "standin", "linux"], default="pvcalls")
    parser.add_argument("--linux-backend", help="pvcalls-back.ko for --backend linux")
    parser.add_argument("--domu-kernel", required=True)
    parser.add_argument("--domu-initrd", required=True)
    parser.add_argument("--nbytes", type=int, default=1 << 20)
    parser.add_argument("--step-timeout", type=int, default=60)
    parser.add_argument("--guest-timeout", type=int, default=150)
    parser.add_argument("--budget", type=float, default=600,
                        help="dom0 uptime by which to report, whatever happened")
    parser.add_argument("--trace", action="store_true", help="print xenstored's pvcalls trace")
    args = parser.parse_args(argv)
    uptime = Path("/proc/uptime").read_text().split()[0]
    step_ok("dom0-python", f"dom0 uptime {uptime}s")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="dom0| %(name)s %(levelname)s %(message)s"
    )

    procs: list[subprocess.Popen[bytes]] = []
    backend: Backend | None = None
    failed: StepFailed | None = None
    try:
        start_xen_daemons(procs)
        backend = start_backend(args.backend, args.linux_backend)
        echo = EchoServer()
        domid = run_guest(args, echo, backend)
        check_released(backend, domid, args.step_timeout)
    except StepFailed as exc:
        failed = exc
    except Exception as exc:  # a harness bug: report it like a failed step
        traceback.print_exc(file=sys.stdout)
        failed = StepFailed("dom0-harness", repr(exc))
    if failed is not None or args.trace:
        dump_xenstore_trace()
    if failed is not None and domain_exists(DOMU_NAME):
        xl_destroy()
    if backend is not None:
        try:
            backend.stop()
        except Exception:
            traceback.print_exc(file=sys.stdout)
    for proc in procs:
        proc.terminate()
    if failed is None:
        say("REALXEN RESULT PASS")
        return 0
    say(f"REALXEN RESULT FAIL {failed.step}: {failed.details}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
