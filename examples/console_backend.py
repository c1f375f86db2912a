"""A PV console backend (``xen/io/console.h``) in a page of code.

It serves ``backend/console`` devices: each guest shares one page holding
``struct xencons_interface`` (``ring-ref``) and an event channel (``port``).
Whatever the guest writes to the ``out`` ring is appended to
``<log_dir>/console-<domid>.log`` (``console-<domid>-<devid>.log`` for a
second console); :meth:`ConsoleBackend.send_input` feeds
the ``in`` ring.  Run it against a simulated host::

    .venv/bin/python examples/console_backend.py --demo

On a real dom0, ``--log-dir DIR`` serves the host's guests until SIGINT
or SIGTERM; it exits 2 saying why without Xen, or while another console
backend serves the domain.

Everything xenbus (discovery, InitWait, Connected, closing, removal, domain
death, error nodes) is the framework's, and so is keeping out a second
console backend of the domain, in any process on the host (its start()
raises :class:`xenback.HostLockHeld`); this file only moves bytes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from workqueue import Workqueue
from xenback import (
    BackendDevice,
    BackendDriver,
    DeviceWork,
    FlexRing,
    HostLockHeld,
    Platform,
    PlatformUnavailable,
    RingError,
    wire,
)

logger = logging.getLogger("console_backend")


def console_rings(page: memoryview) -> tuple[FlexRing, FlexRing]:
    """The ``out`` (guest to backend) and ``in`` rings of a ``struct
    xencons_interface`` page; either end uses them (the backend consumes
    ``out`` and produces ``in``)."""
    def off(field: str) -> int:
        return wire.offsetof("struct xencons_interface", field)

    inp, out, end = off("in"), off("out"), off("in_cons")  # in[1024], out[2048], indexes
    return (FlexRing(page[out:end], page, prod_offset=off("out_prod"), cons_offset=off("out_cons")),
            FlexRing(page[inp:out], page, prod_offset=off("in_prod"), cons_offset=off("in_cons")))


class Console(DeviceWork):
    """One guest console: a work item that drains ``out`` and fills ``in``.

    Queued by the event channel (guest wrote output or consumed input) and
    by :meth:`ConsoleBackend.send_input`; a Work never runs concurrently
    with itself, so the rings have one user at a time.  A DeviceWork: what
    it raises (the log's disk full, ``on_output`` failing) fails the
    device, error node and Closing, rather than leave the guest's output
    unread for ever.
    """

    def __init__(self, dev: BackendDevice, page: memoryview, log: Path,
                 on_output: Callable[[int, bytes], object] | None) -> None:
        super().__init__(dev, Console.run)
        self.on_output = on_output
        self.out, self.inp = console_rings(page)
        self.log = log.open("ab")
        self.port = 0
        self.lock = threading.Lock()  # guards pending_input (appended by any thread)
        self.pending_input = bytearray()

    def run(self) -> None:
        try:
            output = b"".join(bytes(v) for v in self.out.readable())
            self.out.consume(len(output))
            with self.lock:
                moved = 0
                for view in self.inp.writable():
                    n = min(len(view), len(self.pending_input) - moved)
                    view[:n] = self.pending_input[moved:moved + n]
                    moved += n
                self.inp.produce(moved)
                del self.pending_input[:moved]
        except RingError as exc:  # the guest broke its indexes: stop serving it
            self.disable()
            self.dev.queue(self.dev.fatal, errno.EPROTO, f"console ring: {exc}")
            return
        if output:
            self.log.write(output)
            self.log.flush()
            if self.on_output is not None:
                self.on_output(self.dev.frontend_id, output)
        if output or moved:
            self.dev.notify(self.port)


class ConsoleBackend(BackendDriver):
    """Serves ``backend/console`` devices, logging each guest's output."""

    device_type = "console"

    def __init__(self, platform: Platform, log_dir: Path, *, workqueue: Workqueue | None = None,
                 on_output: Callable[[int, bytes], object] | None = None) -> None:
        super().__init__(platform, workqueue=workqueue)
        self.log_dir, self.on_output = Path(log_dir), on_output

    def connect(self, dev: BackendDevice) -> None:
        ref, port = dev.read_otherend_u32("ring-ref"), dev.read_otherend_u32("port")
        page = dev.map_grant_refs([ref]).buffer
        name = f"console-{dev.frontend_id}" + (f"-{dev.devid}" if dev.devid else "") + ".log"
        console = Console(dev, page, self.log_dir / name, self.on_output)
        dev.driver_data = console
        # Not run until it knows its port: the guest may notify as soon as
        # we bind, and a run then would notify port 0, which goes nowhere.
        console.disable()
        console.port = dev.bind_evtchn(port, lambda _port: self.workqueue.queue_work(console))
        console.enable()
        self.workqueue.queue_work(console)  # output written before we connected

    def disconnect(self, dev: BackendDevice) -> None:
        console: Console | None = dev.driver_data
        if console is not None:
            console.disable_sync()  # not running, never again: now unmap
            console.out.release()
            console.inp.release()
            console.log.close()
            dev.driver_data = None

    def send_input(self, frontend_id: int, data: bytes, devid: int = 0) -> bool:
        """Type ``data`` on a guest's console; False if it has none connected."""
        for dev in self.devices():
            console = dev.driver_data
            if (dev.frontend_id, dev.devid) == (frontend_id, devid) and console is not None:
                with console.lock:
                    console.pending_input += data
                self.workqueue.queue_work(console)
                return True
        return False


def _demo() -> None:
    """A simulated guest prints a line; the backend logs it."""
    from xenback import XenbusState
    from xenback.sim import FrontendDevice, SimHost

    with SimHost() as host, tempfile.TemporaryDirectory() as logs:
        done = threading.Event()
        with ConsoleBackend(host.dom0, Path(logs), on_output=lambda d, b: done.set()):
            guest = host.create_domain("demo")
            # The guest's side: adds the device, closes and removes it at the end.
            with FrontendDevice.add(guest, "console") as fe:
                page, port = fe.share(), fe.bind_port()
                fe.publish({"ring-ref": page.refs[0], "port": port})
                fe.wait_backend(XenbusState.CONNECTED)
                out, _ = console_rings(page.buffer)
                text = b"Hello from a simulated guest's console\n"
                out.writable()[0][:len(text)] = text
                out.produce(len(text))
                fe.evtchn.notify(port)
                if not done.wait(10):
                    raise SystemExit("console_backend: the guest's output did not reach "
                                     "the backend within 10 s")
            print((Path(logs) / f"console-{guest.domid}.log").read_text(), end="")


def _directory(text: str) -> Path:
    # Checked now: a missing directory would fail only when a guest's
    # console connects, as a device error in XenStore.
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return Path(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true",
                      help="run against a simulated guest (the default without --log-dir)")
    mode.add_argument("--log-dir", type=_directory,
                      help="serve the real dom0 (xenback.xen), writing the guests' "
                           "console logs to LOG_DIR, until SIGINT or SIGTERM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.demo or args.log_dir is None:
        _demo()
    else:
        import signal

        import xenback.xen

        # sigwait() needs the signals blocked, here before any thread starts
        # (threads inherit the mask): unblocked, SIGTERM would kill the
        # process before the backend closed its devices, and a worker
        # thread could take SIGINT while sigwait() went on waiting.
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            platform = xenback.xen.open()
        except PlatformUnavailable as exc:
            parser.error(f"cannot open the Xen platform: {exc}")
        backend = ConsoleBackend(platform, args.log_dir)
        try:
            backend.start()
        except HostLockHeld as exc:
            holder = "?" if exc.pid is None else exc.pid
            parser.error(f"another console backend (pid {holder}) serves this host already; "
                         f"it holds {exc.path}")
        try:
            signal.sigwait(stop)
        finally:
            backend.stop()
