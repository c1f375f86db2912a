"""A stateful fuzzer of the xenbus backend state machine, from hostile
guests and a busy toolstack.

One seeded random driver interleaves, over two backends (one in dom0, one
in a driver domain), several hostile guest domains with several devices
each, and a well-behaved bystander guest:

* frontends writing every xenbus state (valid, out of order, repeated,
  flooded, impossible numbers, garbage, huge, empty), publishing rings
  good and bad (grant refs never granted or granted to another domain,
  ports never bound or bound to another backend, numbers out of range,
  non-numeric), deleting and garbling their nodes and their whole
  directory, re-creating it, unbinding and unsharing under a connection,
  writing into the backend's directory and into another guest's (which
  XenStore's permissions must refuse), and setting watches anywhere;
* the toolstack adding devices (and re-adding at the same path), removing
  them (while connecting, twice, racing a re-add) and destroying them,
  and destroying whole guest domains, in background threads as libxl's
  own waits run; and changing the permissions of a backend device's own
  nodes (its ``state``, ``online`` or directory made unreadable to the
  backend, read-only, or given back);
* the driver's hooks raising or being slow, on the fuzzer's say.

Checked as it goes and at quiescent points:

* the backend ``state`` node only ever holds a state a backend or the
  toolstack may write, and once the toolstack asked for removal
  (``online`` = 0, Closing) nothing but Closed replaces Closing;
* at a quiescent point each device's backend state is the answer the
  xenbus table gives to its frontend's state, a device is served exactly
  when its directory exists and its frontend domain lives, nothing waits
  in Initialising unprobed, and only a connected device holds a grant
  mapping and a port;
* per device path, the driver's hooks come in a legal order (probe, then
  connect and disconnect in pairs, then remove; nothing after remove but
  the next device's probe), each on its device's queue;
* a driver domain's device whose ``state`` (or directory) the toolstack
  made unreadable to it (no permission, or write-only) is not served; one
  whose nodes were taken and is not served may be left in any state; one
  whose ``state`` was left read-only answers its frontend as the table
  says or has its error node (its switches fail, fatal() writes that
  alone); each device dropped so is said once, and only where the fuzzer
  took a node;
* error nodes hold ``"<errno> <printable message>"``; no error, and no
  traceback at any level, is logged but those the fuzzer asked for, no
  thread dies of an exception, and every wait is bounded (a hang is a
  failure, not a stuck run);
* the bystander connects, has its events delivered and closes cleanly
  each time round, and its removal never waits out libxl's timeout;
* once every device and guest is gone: no device object, grant, port,
  XenStore watch, thread or file descriptor left beyond the start.

Used by the suite with fixed seeds and few steps (test_xenbus_fuzz), and
run long by hand::

    python tests/xenback/xenbus_fuzz.py --seeds 0-300 --steps 300
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":  # run by hand: the paths pytest sets (pyproject.toml)
    import sys
    _tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # tools/ last, for its toolargs: nothing there hides a package.
    sys.path[:0] = [os.path.dirname(_tests), _tests]
    sys.path.append(os.path.join(os.path.dirname(_tests), "tools"))

from tests.xenback.xbhelpers import TIMEOUT, RecordingDriver, handed_over
from xenback import BackendDevice, XenbusState, XenStore
from xenback.sim._xenstored import RawClient, XsError

S = XenbusState
logger = logging.getLogger("xenbus_fuzz")

#: How long the toolstack waits for a backend to close in a removal the
#: fuzzer starts (libxl's 10 s would make a run crawl: a hostile frontend
#: that never closes makes every removal of its device time out).
REMOVE_TIMEOUT = 0.5
#: The same for a domain's destruction: its frontend directories go first,
#: so every backend must close at once, hostile frontend or not.
DESTROY_TIMEOUT = 5.0
#: Longest a slow hook dawdles.
SLOW = 0.05

_STATE_VALUES = [str(int(s)) for s in S]
_GARBAGE = ["", "x", "-1", "9", "10", "4x", " 4\n", "0x4", "+4", "4.0", "\u00e9", "\t",
            "99999999999999999999999999", "1" * 1500, "3 ", "007"]
_ERROR_NODE = re.compile(r"\A[1-9][0-9]* [ -~]*\Z")


class FuzzFailure(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzFailure(what)


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise FuzzFailure(f"timed out waiting for {what or predicate}")
        threading.Event().wait(0.005)


class FuzzDriver(RecordingDriver):
    """A RecordingDriver whose hooks fail or dawdle for the devices and
    hooks the fuzzer picks (each fault fires once)."""

    def __init__(self, platform: Any, rng_seed: int) -> None:
        super().__init__(platform)
        self.faults: dict[tuple[int, int], dict[str, str]] = {}
        self.injected: collections.Counter[str] = collections.Counter()
        self._slow = random.Random(rng_seed)  # its own: hooks run on other threads
        self.probe_hook = lambda dev: self._fault("probe", dev)
        self.connect_hook = lambda dev: self._fault("connect", dev)
        self.disconnect_hook = lambda dev: self._fault("disconnect", dev)
        # A port's callback that raises fails its device, on its queue.
        self.event_hook = lambda dev, _port: self._fault("event", dev)

    def remove(self, dev: BackendDevice) -> None:
        super().remove(dev)
        self._fault("remove", dev)

    def _fault(self, hook: str, dev: BackendDevice) -> None:
        with self.changed:
            what = self.faults.get((dev.frontend_id, dev.devid), {}).pop(hook, None)
            if what is not None:
                self.injected[f"{hook} {what}"] += 1
            # Mostly brief; now and then long enough for the toolstack and
            # the guest to act while the hook runs.
            delay = self._slow.uniform(0, SLOW if self._slow.random() < 0.8 else 10 * SLOW)
        if what is None:
            return
        if what == "slow":
            threading.Event().wait(delay)
        elif what == "oserror":
            raise OSError(errno.EIO, "injected failure", dev.nodename)
        elif what == "valueerror":
            raise ValueError("injected failure")
        else:
            raise LookupError("injected failure")


@dataclass
class FrontDev:
    """One device as its guest sees it."""

    device: Any                      # the toolstack's Device
    pages: Any = None                # shared ring page(s)
    port: int | None = None          # the guest's unbound port for the backend


@dataclass
class Guest:
    domain: Any
    xs: XenStore
    gntshr: Any
    evtchn: Any
    devs: dict[tuple[int, int], FrontDev] = field(default_factory=dict)  # (backend, devid)
    watches: list[Any] = field(default_factory=list)
    dead: bool = False

    @property
    def domid(self) -> int:
        return int(self.domain.domid)

    def write(self, path: str, value: str | int) -> None:
        """Write any value: what pyxs refuses to send (not printable
        ASCII) goes over a raw connection of the guest's, as a guest's
        own XenStore client may send any bytes."""
        text = str(value)
        if text.isascii() and (text.isprintable() or not text):
            self.xs.write(path, text)
            return
        with RawClient(self.domain.xenstore_path) as raw:
            raw.write(path, text.encode("utf-8"))

    def close(self) -> None:
        for dev in self.devs.values():
            if dev.pages is not None:
                with contextlib.suppress(OSError):
                    dev.pages.unshare()
                dev.pages = None
        for closer in (self.gntshr.close, self.evtchn.close, self.xs.close):
            with contextlib.suppress(OSError):
                closer()


class Observer:
    """dom0's view of every backend ``state`` node, as it changes.

    Each event reads ``state`` and ``online`` together (a transaction), so
    the snapshots are a subsequence of the true history: a rule broken
    between two of them was broken in XenStore."""

    def __init__(self, xs: XenStore, roots: list[str]) -> None:
        self.xs = xs
        self.roots = roots
        self.failures: list[str] = []
        self.last: dict[str, tuple[str | None, str | None]] = {}
        self.seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.watches = [xs.watch(root, self._event) for root in roots]

    def _event(self, path: str) -> None:
        for root in self.roots:
            if path.startswith(root + "/"):
                parts = path[len(root) + 1:].split("/")
                if len(parts) >= 2:
                    self._look(f"{root}/{parts[0]}/{parts[1]}")
                return

    def _look(self, base: str) -> None:
        try:
            state, online = self.xs.transaction(
                lambda t: (t.read(f"{base}/state"), t.read(f"{base}/online")))
        except OSError:
            return
        with self._lock:
            self.seen[f"state {state}"] += 1
            if state not in (None, "1", "2", "4", "5", "6"):
                self.failures.append(f"{base}/state = {state!r}")
            was = self.last.get(base)
            if was == ("5", "0") and state not in ("5", "6", None) and online != "1":
                # Removal asked for: only Closed may follow (or the device
                # is deleted, or the toolstack made a new one: only it
                # writes online, and 1 only into a new device).
                self.failures.append(f"{base}: Closing with online=0, then {state!r} ({online})")
            self.last[base] = (state, online)

    def close(self) -> None:
        for w in self.watches:
            w.unwatch()


class Fuzzer:
    """One run over a host, its two backends, and the guests it makes."""

    OPS = {
        "state": 14, "publish": 12, "publish_bad": 6, "rm_node": 3, "rm_dir": 2,
        "recreate_dir": 1, "garble": 2, "intrude": 3, "watch": 2, "notify": 3, "unshare": 2,
        "flood": 1, "add": 6, "remove": 4, "destroy_device": 2, "destroy_domain": 1,
        "new_guest": 1, "fault": 5, "quiesce": 3, "bystander": 8, "restart": 1, "storm": 1,
        "perms": 2, "take": 2,
    }

    def __init__(self, seed: int, host: Any, drivers: list[FuzzDriver],
                 drvdom: Any, *, guests: int = 3, devids: int = 3) -> None:
        self.rng = random.Random(seed)
        # Draws added to an op since its seeds were first run come from
        # this one, so that each seed still makes the same ops as before.
        self.rng2 = random.Random(seed + 1_000_003)
        self.seed = seed
        self.host = host
        self.drivers = {d.platform.domid: d for d in drivers}
        self.drvdom = drvdom
        self.devids = devids
        self.seen: collections.Counter[str] = collections.Counter()
        self.dom0 = XenStore(host.dom0.xenstore())
        self.dom0.open()
        self.observer = Observer(self.dom0, [d.backend_root for d in drivers])
        self.threads: list[threading.Thread] = []
        self.added: collections.Counter[str] = collections.Counter()  # adds per backend path
        # (guest, (backend, devid)) -> what a removal's verdict needs.
        self.removing: dict[tuple[int, tuple[int, int]], dict[str, Any]] = {}
        # Backend path -> the nodes of its own (relative, "" the directory
        # itself) whose permissions the toolstack changed (op_take), and
        # how ("n" not readable by the backend, "w" write-only, "r"
        # read-only), since the toolstack last made the device; and every
        # such change since.
        self.taken: dict[str, dict[str, str]] = {}
        self.ever_taken: dict[str, set[str]] = {}
        self.taken_paths: set[str] = set()  # every path op_take changed, ever
        self.thread_errors: list[str] = []
        self.guests: list[Guest] = []
        self._names = 0
        for _ in range(guests):
            self.new_guest()
        # The bystander: one device on each backend, never faulted.
        self.bystander = self.make_guest(f"bystander{seed}")
        self.by_phase: dict[int, str] = {}
        for backend in self.drivers:
            dev = host.toolstack.add_device("xbtest", self.bystander.domid, backend_id=backend,
                                            devid=backend)
            self.bystander.devs[(backend, backend)] = FrontDev(dev)
            self.by_phase[backend] = "initwait"
        #: finish() kills the driver domain under its backend first.
        self.kill_driver_domain = self.rng.random() < 0.25
        self.killing = False
        self._ops = list(self.OPS)
        self._weights = [self.OPS[n] for n in self._ops]

    # -- guests ----------------------------------------------------------------

    def make_guest(self, name: str) -> Guest:
        domain = self.host.create_domain(name)
        xs = XenStore(domain.xenstore())
        xs.open()
        return Guest(domain, xs, domain.gntshr(), domain.evtchn())

    def new_guest(self) -> None:
        self._names += 1
        self.guests.append(self.make_guest(f"fuzz{self.seed}-{self._names}"))

    def live(self) -> list[Guest]:
        return [g for g in self.guests if not g.dead]

    def pick(self) -> tuple[Guest, tuple[int, int], FrontDev] | None:
        """A live hostile guest and one of its devices."""
        guests = [g for g in self.live() if g.devs]
        if not guests:
            return None
        g = self.rng.choice(guests)
        key = self.rng.choice(sorted(g.devs))
        return g, key, g.devs[key]

    def background(self, name: str, fn: Callable[[], object]) -> None:
        """Run a toolstack operation that waits (as libxl's do) on its own
        thread; quiesce() joins it, with a bound."""

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                self.thread_errors.append(f"{name}: {exc!r}")

        t = threading.Thread(target=run, name=f"fuzz-{name}")
        self.threads.append(t)
        t.start()

    def guest_op(self, fn: Callable[[], object]) -> None:
        """A guest's own XenStore request: it may fail (its directory is
        gone, a quota is reached) and that is the guest's problem."""
        try:
            fn()
        except (PermissionError, FileNotFoundError) as exc:
            self.seen[f"guest {type(exc).__name__}"] += 1
        except XsError as exc:  # the raw client's
            self.seen[f"guest {exc}"] += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.E2BIG, errno.EINVAL):
                raise
            self.seen[f"guest errno {exc.errno}"] += 1

    # -- frontend operations ----------------------------------------------------

    def op_state(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        r = self.rng.random()
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            if r < 0.75:
                value = self.rng.choice(_STATE_VALUES[1:7])
            elif r < 0.85:
                value = self.rng.choice(_STATE_VALUES)
            else:
                value = self.rng.choice(_GARBAGE)
            self.seen[f"fe state {value[:8]!r}"] += 1
            path = f"{fd.device.frontend_path}/state"
            self.guest_op(lambda path=path, value=value: g.write(path, value))

    def op_flood(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        path = f"{fd.device.frontend_path}/state"
        for _ in range(self.rng.randrange(10, 60)):
            self.guest_op(lambda: g.xs.write(path, self.rng.choice(_STATE_VALUES[1:7])))

    def op_storm(self) -> None:
        """A guest fails its device, restarts it and fails it again, as
        fast as the backend answers: every failure is an error line, and
        the rate limit must hold them to its burst."""
        # From a quiescent point: the backend has acted on everything the
        # guest did to the device so far (deleted its directory, say).
        self.quiesce()
        picked = self.pick()
        if picked is None:
            return
        g, (backend, devid), fd = picked
        drv = self.drivers[backend]
        known = {(d.frontend_id, d.devid): d for d in drv.devices()}
        dev = known.get((g.domid, devid))
        be_state = f"{fd.device.backend_path}/state"
        fe_state = f"{fd.device.frontend_path}/state"
        if (dev is None or dev.gone or dev._otherend_watch is None
                or drv.faults.get((g.domid, devid))
                or self.dom0.read(f"{fd.device.backend_path}/online") != "1"):
            return
        if self.taken.get(fd.device.backend_path):
            # A node of its own taken (op_take): a Closing of ours may end
            # in a drop (see BackendDriver._backend_changed), not InitWait.
            return
        try:
            for node in (fd.device.frontend_path, fe_state):  # readable again (see op_perms)
                g.xs.set_perms(node, [f"n{g.domid}", f"r{backend}"])
        except FileNotFoundError:
            return  # the guest deleted its directory (or its state)
        self.seen["storm"] += 1
        # dom0 waits for the backend's answers: the guest may be out of
        # watches (op_watch runs it into its quota, ENOSPC).
        g.xs.write(fe_state, "1")
        self.dom0.wait_for(be_state, "2", timeout=TIMEOUT)
        for _ in range(self.rng.randrange(12, 30)):
            g.xs.write(fe_state, self.rng.choice(["9", "x", "2", "7"]))
            self.dom0.wait_for(be_state, "5", timeout=TIMEOUT)
            g.xs.write(fe_state, "1")
            self.dom0.wait_for(be_state, "2", timeout=TIMEOUT)

    def share(self, g: Guest, fd: FrontDev) -> None:
        backend = fd.device.backend_id
        if fd.pages is None:
            fd.pages = g.gntshr.share_pages(backend, 1)
        if fd.port is None:
            fd.port = g.evtchn.bind_unbound_port(backend)

    def publish(self, g: Guest, fd: FrontDev, nodes: dict[str, str | int], state: int) -> None:
        base = fd.device.frontend_path

        def tx(t: Any) -> None:
            for key, value in nodes.items():
                t.write(f"{base}/{key}", value)
            t.write(f"{base}/state", state)

        if all(str(v).isascii() and str(v).isprintable() for v in nodes.values()):
            self.guest_op(lambda: g.xs.transaction(tx))
            return
        # Not sendable through pyxs: one node at a time, the state last.
        for key, value in nodes.items():
            self.guest_op(lambda key=key, value=value: g.write(f"{base}/{key}", value))
        self.guest_op(lambda: g.xs.write(f"{base}/state", state))

    def op_publish(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        self.share(g, fd)
        state = self.rng.choice([3, 3, 4])
        if self.rng.random() < 0.2:
            # Initialising first, as a restarting frontend does.
            self.guest_op(lambda: g.xs.write(f"{fd.device.frontend_path}/state", 1))
        self.publish(g, fd, {"ring-ref": fd.pages.refs[0], "port": fd.port}, state)

    def op_publish_bad(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        self.share(g, fd)
        ref: str | int = fd.pages.refs[0]
        port: str | int = fd.port if fd.port is not None else 0
        what = self.rng.randrange(10)
        if what == 0:
            ref = ref + self.rng.randrange(1, 1000)          # never granted
        elif what == 1:
            ref = self.rng.choice(["", "abc", "-1", "4294967296", "1e3", " ", "0x10",
                                   "9" * 30])
        elif what == 2:
            port = self.rng.choice(["", "x", "-1", "4294967296", "99999"])
        elif what == 3:
            port = self.rng.randrange(1, 4096)               # likely not bound
        elif what == 4:
            # A port and a grant for the other backend's domain.
            others = [b for b in self.drivers if b != fd.device.backend_id]
            other = others[0]
            port = g.evtchn.bind_unbound_port(other)
            ref = g.gntshr.share_pages(other, 1).refs[0]     # kept until the guest goes
        elif what == 5:
            # Another device's ring and port (its own guest's).
            mates = [d for d in g.devs.values() if d is not fd and d.pages is not None]
            if mates:
                mate = self.rng.choice(mates)
                ref, port = mate.pages.refs[0], mate.port if mate.port is not None else 0
        elif what == 6:
            nodes: dict[str, str | int] = {"ring-ref": ref}  # no port
            self.publish(g, fd, nodes, 3)
            return
        elif what == 7:
            self.publish(g, fd, {"port": port}, 4)           # no ring-ref
            return
        elif what == 8:
            ref, port = 0, 0
        else:
            ref = "\u00e9\u00e9"
        self.seen[f"publish_bad {what}"] += 1
        self.publish(g, fd, {"ring-ref": ref, "port": port}, self.rng.choice([3, 4]))

    def op_rm_node(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        key = self.rng.choice(["ring-ref", "port", "state", "state", "backend", "backend-id"])
        self.guest_op(lambda: g.xs.rm(f"{fd.device.frontend_path}/{key}"))

    def op_rm_dir(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        self.guest_op(lambda: g.xs.rm(fd.device.frontend_path))

    def op_recreate_dir(self) -> None:
        """The guest writes its frontend directory back after deleting it."""
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        base = fd.device.frontend_path
        self.guest_op(lambda: g.xs.transaction(lambda t: (
            t.write(f"{base}/backend", fd.device.backend_path),
            t.write(f"{base}/backend-id", fd.device.backend_id),
            t.write(f"{base}/state", self.rng.choice([1, 1, 3, 4, 6])))))

    def op_garble(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        key = self.rng.choice(["backend", "backend-id", "feature-x", "ring-ref/sub",
                               "state/sub", "x" * 60])
        value = self.rng.choice(_GARBAGE + [fd.device.backend_path + "/.."])
        self.guest_op(lambda: g.write(f"{fd.device.frontend_path}/{key}", value))

    def op_intrude(self) -> None:
        """The guest writes where only the toolstack and the backend may:
        XenStore must refuse it."""
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        others = [o for o in self.live() + [self.bystander] if o is not g and o.devs]
        targets = [fd.device.backend_path,
                   f"/local/domain/{fd.device.backend_id}/backend/xbtest/{g.domid}/77",
                   f"/local/domain/{fd.device.backend_id}/error/backend/xbtest/{g.domid}"]
        if others:
            o = self.rng.choice(others)
            od = o.devs[self.rng.choice(sorted(o.devs))]
            targets += [od.device.frontend_path, od.device.backend_path]
        target = self.rng.choice(targets)
        how = self.rng.randrange(4)
        key = self.rng.choice(["state", "online", "frontend", "frontend-id", "new"])
        value = self.rng.choice(["1", "0", "4", "6", f"/local/domain/{g.domid}"])
        try:
            if how == 0:
                g.xs.write(f"{target}/{key}", value)
            elif how == 1:
                g.xs.rm(target)
            elif how == 2:
                g.xs.set_perms(target, [f"n{g.domid}"])
            else:
                g.xs.mkdir(f"{target}/{key}")
        except (PermissionError, FileNotFoundError):
            self.seen["intrusion refused"] += 1
            return
        # rm of a missing node is no error: only a node that exists counts.
        if how == 1 and not self.dom0.exists(target):
            return
        raise FuzzFailure(f"dom{g.domid} could {['write', 'rm', 'set_perms', 'mkdir'][how]} "
                          f"{target}/{key}")

    def op_perms(self) -> None:
        """The guest takes the backend's right to read its nodes away (or
        gives it back): to the backend, an unreadable state is a frontend
        gone (Unknown, as xenbus_read_driver_state() takes any failure),
        an unreadable ring-ref a failed connect."""
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        node = self.rng.choice(["", "/state", "/state", "/ring-ref", "/port"])
        perms = [f"n{g.domid}"]
        if self.rng.random() < 0.4:
            perms.append(f"r{fd.device.backend_id}")
        self.seen[f"perms {node or '/'} {len(perms)}"] += 1
        self.guest_op(lambda: g.xs.set_perms(f"{fd.device.frontend_path}{node}", perms))

    def op_take(self) -> None:
        """The toolstack changes the permissions of a backend device's own
        nodes (as dom0 may): its ``state`` mostly, its ``online`` or its
        directory itself, made unreadable to the backend (``n0``, or
        write-only, ``n0 w<backend>``: as unreadable to it, since every
        write of its reads the state first), read-only (``n0 r<backend>``),
        or given back as libxl made them.
        Only a driver domain's backend is refused anything (dom0's reads
        and writes whatever the permissions say): the module docstring of
        xenback.xenbus says what it does then, and check_device what is
        expected at rest."""
        guests = [g for g in self.live() if g.devs]
        if not guests:
            return
        g = self.rng.choice(guests)
        keys = sorted(g.devs)
        if self.rng.random() < 0.8:
            keys = [k for k in keys if k[0] != 0] or keys
        backend, devid = key = self.rng.choice(keys)
        fd = g.devs[key]
        node = self.rng.choice(["state", "state", "state", "online", ""])
        how = self.rng.choice(["n", "n", "r", "back", "back"])
        if how == "n" and self.rng2.random() < 0.5:
            how = "w"
        perms = {"n": ["n0"], "w": ["n0", f"w{backend}"], "r": ["n0", f"r{backend}"],
                 "back": [f"n{backend}", f"r{g.domid}"]}[how]
        base = fd.device.backend_path
        try:
            self.dom0.set_perms(f"{base}/{node}" if node else base, perms)
        except FileNotFoundError:
            self.seen["take: gone"] += 1  # a removal deleted it
            return
        self.seen[f"take {node or '/'} {how}{' dom0' if backend == 0 else ''}"] += 1
        if backend == 0:
            return  # nothing changes: the checks hold as ever
        self.taken_paths.add(base)
        taken = self.taken.setdefault(base, {})
        if how == "back":
            taken.pop(node, None)
        else:
            taken[node] = how
            self.ever_taken.setdefault(base, set()).add(f"{node} {how}")

    def op_watch(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        path = self.rng.choice([fd.device.backend_path, f"{fd.device.backend_path}/state",
                                fd.device.frontend_path, "/", "/local/domain/0",
                                "@releaseDomain", "@introduceDomain", "/nonexistent"])
        for _ in range(self.rng.choice([1, 1, 5, 40])):
            try:
                g.watches.append(g.xs.watch(path, lambda _p: None))
            except OSError as exc:
                self.seen[f"guest watch errno {exc.errno}"] += 1
                break

    def op_notify(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        if fd.port is None:
            return
        for _ in range(self.rng.randrange(1, 50)):
            with contextlib.suppress(OSError):
                g.evtchn.notify(fd.port)

    def op_unshare(self) -> None:
        """The guest takes its ring page or port back under the backend."""
        picked = self.pick()
        if picked is None:
            return
        g, _, fd = picked
        if self.rng.random() < 0.5 and fd.pages is not None:
            with contextlib.suppress(OSError):
                fd.pages.unshare()
            fd.pages = None
        elif fd.port is not None:
            with contextlib.suppress(OSError):
                g.evtchn.unbind(fd.port)
            fd.port = None

    # -- toolstack operations ------------------------------------------------------

    def op_add(self) -> None:
        guests = self.live()
        if not guests:
            return
        g = self.rng.choice(guests)
        devid = self.rng.randrange(self.devids)
        # A devid names one device of the guest whatever its backend (the
        # frontend directory and libxl's record are per devid): each devid
        # keeps one backend, alternately dom0's and the driver domain's.
        backends = sorted(self.drivers)
        backend = backends[devid % len(backends)]
        key = (backend, devid)
        self.seen["re-add" if key in g.devs else "add"] += 1
        removing = self.removing.get((g.domid, key))
        if removing is not None:
            removing["re-added"] = True  # a removal under way waits for it
        old = g.devs.get(key)
        if old is not None and old.pages is not None:
            with contextlib.suppress(OSError):
                old.pages.unshare()
        dev = self.host.toolstack.add_device(
            "xbtest", g.domid, backend_id=backend, devid=devid, replace=True
        )
        self.added[dev.backend_path] += 1
        # Made afresh, with libxl's permissions.
        self.taken.pop(dev.backend_path, None)
        self.ever_taken.pop(dev.backend_path, None)
        g.devs[key] = FrontDev(dev)

    def op_remove(self) -> None:
        """libxl removes a device (maybe twice at once), and the guest
        follows the backend to Closed, or not.  Once the guest stopped
        touching it, the frontend's state says whether the backend may
        keep the toolstack waiting: only for a frontend still to close."""
        picked = self.pick()
        if picked is None:
            return
        g, key, fd = picked
        timeout = self.rng.choice([0.05, REMOVE_TIMEOUT, 2.0, 2.0])
        where = (g.domid, key)
        verdict: dict[str, Any] = {}
        for _ in range(2 if self.rng.random() < 0.2 else 1):
            self.background("remove", lambda: self.removed(fd, timeout, verdict))
        if self.rng.random() < 0.5:
            # The guest hears of it and follows the backend to Closed, or not.
            self.guest_op(lambda: g.xs.write(f"{fd.device.frontend_path}/state",
                                             self.rng.choice([5, 6, 6, 1])))
        # The toolstack forgets the device: the guest's view goes with it,
        # and nothing of the guest's touches the frontend directory again.
        del g.devs[key]
        if fd.pages is not None:
            with contextlib.suppress(OSError):
                fd.pages.unshare()
        f_raw = self.dom0.read(f"{fd.device.frontend_path}/state")
        try:
            fstate = S.parse(f_raw)
        except ValueError:
            fstate = S.UNKNOWN
        drv = self.drivers[fd.device.backend_id]
        with drv.changed:
            faulted = bool(drv.faults.get((g.domid, key[1])))
        # A device whose nodes the toolstack took may have been dropped
        # for it: nobody answers its removal.
        taken = fd.device.backend_path in self.ever_taken
        if (fstate in (S.UNKNOWN, S.INITIALISING, S.CLOSED) and timeout == 2.0 and not faulted
                and not taken):
            # Nothing to wait for: the backend must close (a slow hook
            # that already runs takes SLOW * 10 at most).
            verdict["frontend"] = f_raw
            self.seen["remove must not wait"] += 1
        self.removing[where] = verdict

    def removed(self, fd: FrontDev, timeout: float, verdict: dict[str, Any]) -> None:
        """The toolstack's removal, on its own thread: late only where
        the frontend still has to close, or the toolstack itself made a
        new device at the path meanwhile."""
        if self.host.toolstack.remove_device(fd.device, timeout):
            return
        self.seen["remove timed out"] += 1
        if "frontend" in verdict and not verdict.get("re-added"):
            self.thread_errors.append(
                f"removal of {fd.device.backend_path} timed out; frontend state "
                f"{verdict['frontend']!r}")

    def op_destroy_device(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        g, key, fd = picked
        self.host.toolstack.destroy_device(fd.device)
        del g.devs[key]
        if fd.pages is not None:
            with contextlib.suppress(OSError):
                fd.pages.unshare()

    def op_destroy_domain(self) -> None:
        guests = self.live()
        if not guests:
            return
        g = self.rng.choice(guests)
        g.dead = True
        self.seen["destroy domain"] += 1
        if self.rng.random() < 0.5:
            g.close()  # the guest's handles go first, or with the domain
            self.background("destroy", lambda: self.destroy(g))
        else:
            self.background("destroy", lambda: (self.destroy(g), g.close()))

    def destroy(self, g: Guest) -> None:
        self.host.destroy_domain(g.domain, timeout=DESTROY_TIMEOUT)

    def op_new_guest(self) -> None:
        if len(self.live()) < 4:
            self.new_guest()

    def op_fault(self) -> None:
        picked = self.pick()
        if picked is None:
            return
        _, (backend, devid), fd = picked
        drv = self.drivers[backend]
        hook = self.rng.choice(["probe", "connect", "connect", "disconnect", "remove", "event"])
        what = self.rng.choice(["slow", "slow", "oserror", "valueerror", "lookuperror"])
        if hook == "event" and what == "slow":
            # A port's callback runs on the dispatcher thread of every
            # device, and must only queue work: a slow one is a bug of
            # another kind, which holds up every device.
            what = "lookuperror"
        with drv.changed:
            drv.faults.setdefault((fd.device.frontend_id, devid), {})[hook] = what

    def op_restart(self) -> None:
        """The backend is restarted (stop, start) with its devices in any
        state: the new one takes them over.  A connection the old one
        made is told to close (the bystander's ring holds the old one's
        indexes): the bystander goes on from Closing."""
        backend = self.rng.choice(sorted(self.drivers))
        drv = self.drivers[backend]
        drv.stop()
        drv.start()
        drv.events  # noqa: B018 (see Run)
        drv.gnttab  # noqa: B018
        if self.by_phase.get(backend) == "connected":
            fd = self.bystander.devs[(backend, backend)]
            try:
                self.bystander.xs.wait_for(f"{fd.device.backend_path}/state",
                                           str(int(S.CLOSING)), timeout=TIMEOUT)
            except TimeoutError as exc:
                raise FuzzFailure(f"bystander {fd.device.backend_path}: {exc}") from None
            self.by_phase[backend] = "closing"

    # -- the bystander -----------------------------------------------------------------

    def op_bystander(self) -> None:
        """One step round the bystander's lifecycle, on one of its devices;
        each step waits (bounded) for the backend's answer."""
        backend = self.rng.choice(sorted(self.by_phase))
        g = self.bystander
        fd = g.devs[(backend, backend)]
        drv = self.drivers[backend]
        phase = self.by_phase[backend]
        be_state = f"{fd.device.backend_path}/state"
        fe_state = f"{fd.device.frontend_path}/state"

        def wait(state: S) -> None:
            try:
                g.xs.wait_for(be_state, str(int(state)), timeout=TIMEOUT)
            except TimeoutError as exc:
                raise FuzzFailure(f"bystander {fd.device.backend_path}: {exc}") from None

        if phase == "initwait":
            wait(S.INIT_WAIT)
            self.share(g, fd)
            self.publish(g, fd, {"ring-ref": fd.pages.refs[0], "port": fd.port}, 3)
            wait(S.CONNECTED)
            self.by_phase[backend] = "connected"
        elif phase == "connected":
            wait(S.CONNECTED)
            with drv.changed:
                before = len(drv.events_seen)
            g.evtchn.notify(fd.port)
            drv.wait(lambda: len(drv.events_seen) > before)
            self.guest_op(lambda: g.xs.write(fe_state, 5))
            wait(S.CLOSING)
            self.by_phase[backend] = "closing"
        elif phase == "closing":
            g.xs.write(fe_state, 6)
            wait(S.CLOSED)
            fd.pages.unshare()
            g.evtchn.unbind(fd.port)
            fd.pages, fd.port = None, None
            self.by_phase[backend] = "closed"
        else:
            g.xs.write(fe_state, 1)
            self.by_phase[backend] = "initwait"
        self.check_bystander()

    def check_bystander(self) -> None:
        for (backend, devid), fd in self.bystander.devs.items():
            err = self.dom0.read(self.error_node(fd.device))
            check(err is None, f"bystander {fd.device.backend_path}: error {err!r}")
            check_hooks(self.drivers[backend].calls_of(self.bystander.domid, devid),
                        f"bystander {fd.device.backend_path}")

    @staticmethod
    def error_node(device: Any) -> str:
        relative = device.backend_path[len(f"/local/domain/{device.backend_id}/"):]
        return f"/local/domain/{device.backend_id}/error/{relative}/error"

    # -- quiescence and the checks --------------------------------------------------------

    def op_quiesce(self) -> None:
        self.quiesce()
        self.check_quiet()

    def quiesce(self) -> None:
        """Wait (bounded) until the toolstack's operations have ended and
        both backends have handled every event they were sent."""
        deadline = time.monotonic() + 2 * DESTROY_TIMEOUT + TIMEOUT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            check(not t.is_alive(), f"{t.name} hangs")
        self.threads.clear()
        self.removing.clear()
        check(not self.thread_errors, f"toolstack operations failed: {self.thread_errors}")
        for _ in range(3):  # a drop queues a look on the bus, which queues on devices
            for domid, drv in self.drivers.items():
                base = "/ord-sync" if domid == 0 else f"/local/domain/{domid}/data"
                handed_over(drv.xenstore, f"q{self.seed}", base=base)
                assert drv._bus is not None
                flush(drv._bus.flush, f"dom{domid}'s bus queue")
                for dev in drv.devices():
                    flush(dev.events.flush, f"{dev.nodename}'s queue")
        # The observer has looked at everything up to now, too.
        handed_over(self.dom0, f"o{self.seed}")

    def check_quiet(self) -> None:
        check(self.observer.failures == [], f"backend states: {self.observer.failures}")
        alive = {d.domid for d in self.host.domains()}
        for domid, drv in self.drivers.items():
            check(drv.unordered == [], f"hooks outside their queue: {drv.unordered}")
            known = {(d.frontend_id, d.devid): d for d in drv.devices()}
            for fe, devid in self.listed(drv):
                base = f"{drv.backend_root}/{fe}/{devid}"
                self.check_device(drv, base, known.get((int(fe), int(devid))), alive)
            for (fe, _devid), dev in known.items():
                check(not dev.gone, f"{dev.nodename}: dropped but still listed")
                check(self.dom0.exists(dev.nodename),
                      f"{dev.nodename}: served, but its directory was deleted")
                check(fe in alive, f"{dev.nodename}: served, but dom{fe} is dead")
            for fe in {f for f, _ in known} | {g.domid for g in self.guests}:
                for devid in range(max(self.devids, 3)):
                    check_hooks(drv.calls_of(fe, devid), f"dom{domid} {fe}/{devid}")
        for g in self.guests + [self.bystander]:
            for fd in g.devs.values():
                err = self.dom0.read(self.error_node(fd.device))
                if err is not None:
                    check(bool(_ERROR_NODE.match(err)) and len(err) <= 1024,
                          f"error node of {fd.device.backend_path}: {err[:80]!r}")

    def listed(self, drv: FuzzDriver) -> list[tuple[str, str]]:
        return [(fe, devid) for fe in self.dom0.ls(drv.backend_root)
                for devid in self.dom0.ls(f"{drv.backend_root}/{fe}")]

    def check_device(self, drv: FuzzDriver, base: str, dev: BackendDevice | None,
                     alive: set[int]) -> None:
        """The xenbus table at rest: the backend's state answers the
        frontend's."""
        b_raw = self.dom0.read(f"{base}/state")
        online = self.dom0.read(f"{base}/online")
        where = f"{base}: backend {b_raw!r} online {online!r}"
        # Only the toolstack makes a device directory: one without its
        # frontend-id was re-created by a late write of the backend's.
        check(self.dom0.exists(f"{base}/frontend-id"), f"{where}: re-created by the backend")
        # dom0's backend reads and writes whatever the permissions say.
        taken = self.taken.get(base, {}) if drv.platform.domid != 0 else {}
        if {taken.get("state"), taken.get("")} & {"n", "w"}:
            # Whose the directory is, only the state tells: dropped,
            # and a new device is served only once the toolstack makes one.
            check(dev is None, f"{where}: {taken} taken from the backend, yet served")
        if dev is None and drv.platform.domid != 0 and base in self.ever_taken:
            # Dropped for a node it could not read (writing nothing), or
            # taken before it was probed: left as it was, for the toolstack.
            self.seen["rest taken, not served"] += 1
            return
        error = self.dom0.read(f"{drv.home}/error/{base[len(drv.home) + 1:]}/error")
        # A state left to the backend to read but not to write: its
        # switches since failed (InitWait after its probe too), each
        # fatal() writing the error node alone (no Closing): the state the
        # table asks for may not be there, but the failure must be.
        stuck = drv.platform.domid != 0 and "state r" in self.ever_taken.get(base, ()) \
            and error is not None
        check(b_raw != "1" or (stuck and dev is not None), f"{where}: left unprobed")
        if dev is None:
            check(b_raw in ("6", None), f"{where}: not served, yet not Closed")
            return
        check(str(int(dev.state)) == b_raw, f"{where}: the device thinks {dev.state.name}")
        mapped, bound = dev.resources
        if b_raw == "4" and not (stuck and not dev._connected):
            check(dev._connected and (mapped, bound) == (1, 1),
                  f"{where}: Connected holding {dev.resources}")
        if not dev._connected:
            check((mapped, bound) == (0, 0), f"{where}: disconnected holding {dev.resources}")
        if b_raw in ("2", "4"):
            # The frontend reads the features once it sees InitWait: they
            # must be in the directory the state was written to.
            check(self.dom0.read(f"{base}/feature-test") == "1", f"{where}: no features")
        if dev._otherend_watch is None:
            # The probe failed (the frontend was missing, probe() raised):
            # the device was failed, and hears nothing from the frontend.
            check(b_raw == "5" or stuck, f"{where}: probe failed, yet not Closing")
            return
        f_raw = self.dom0.read(f"{dev.otherend}/state")
        where += f", frontend {f_raw!r}"
        self.seen[f"rest fe {f_raw!r:.6} be {b_raw}"] += 1
        try:
            fstate = S.parse(f_raw)
        except ValueError:
            fstate = S.UNKNOWN
        impossible = (S.UNKNOWN, S.INIT_WAIT, S.RECONFIGURING, S.RECONFIGURED)
        if fstate in impossible and f_raw is not None:
            # A state no frontend may write is a fatal error, reported.
            check(b_raw == "5" or stuck, f"{where}: impossible frontend state not fatal")
            check(error is not None, f"{where}: impossible frontend state, no error node")
            return
        expected = {
            S.INITIALISING: ("2",),
            S.INITIALISED: ("4", "5"),
            S.CONNECTED: ("4", "5"),
            S.CLOSING: ("5",),
            S.CLOSED: ("6",),
        }.get(fstate, ("5",))
        check(f_raw is not None, f"{where}: frontend gone, device still served")
        check(b_raw in expected or stuck, f"{where}: expected {expected}")
        if b_raw not in expected:
            self.seen["rest state refused"] += 1

    def step(self) -> str:
        name = self.rng.choices(self._ops, self._weights)[0]
        self.seen[name] += 1
        logger.debug("fuzz: op %s", name)
        getattr(self, f"op_{name}")()
        return name

    def run(self, steps: int) -> None:
        for i in range(steps):
            self.step()
            if i % 50 == 49:
                self.op_quiesce()
        self.op_quiesce()

    def finish(self) -> None:
        """The bystander closes and is removed (in time), every hostile
        guest is destroyed, and what the toolstack still lists is deleted:
        nothing may be served any more."""
        g = self.bystander
        for (backend, devid), fd in g.devs.items():
            while self.by_phase[backend] != "initwait":
                self._bystander_on(backend)  # round to a clean start
            g.xs.wait_for(f"{fd.device.backend_path}/state", str(int(S.INIT_WAIT)),
                          timeout=TIMEOUT)
            self.guest_op(lambda fd=fd: g.xs.write(f"{fd.device.frontend_path}/state", 6))
            g.xs.wait_for(f"{fd.device.backend_path}/state", str(int(S.CLOSED)),
                          timeout=TIMEOUT)
            check(self.host.toolstack.remove_device(fd.device, TIMEOUT),
                  f"bystander {fd.device.backend_path}: removal timed out")
            drv = self.drivers[backend]
            drv.wait(lambda drv=drv, devid=devid: drv.calls_of(g.domid, devid)[-1:] == ["remove"])
        self.check_bystander()
        if self.kill_driver_domain:
            self.kill_drvdom()
        for guest in self.live():
            guest.dead = True
            self.background("destroy", lambda guest=guest: (self.destroy(guest), guest.close()))
        self.quiesce()
        for dev in self.host.toolstack.devices():
            self.host.toolstack.destroy_device(dev)
        self.quiesce()
        self.check_quiet()
        for domid, drv in self.drivers.items():
            check(drv.devices() == [], f"dom{domid} still serves {drv.devices()}")
            check(self.listed(drv) == [], f"dom{domid} has devices left: {self.listed(drv)}")
            errors = f"{drv.home}/error/backend/{drv.device_type}"
            wait_until(lambda errors=errors: self.dom0.ls(errors) == [],
                       what=f"the error nodes under {errors} to go: {self.dom0.ls(errors)}")
            fes = {f for _, f, _ in drv.calls}
            for fe in fes:
                for devid in range(max(self.devids, 3)):
                    check_hooks(drv.calls_of(fe, devid), f"dom{domid} {fe}/{devid}", ended=True)
        self.host.destroy_domain(self.bystander.domain)
        self.bystander.close()
        for guest in self.guests:
            guest.close()

    def kill_drvdom(self) -> None:
        """The driver domain dies under its backend, devices and all: the
        backend loses XenStore, its grant mappings and its ports at once.
        Its stop() must still return, drop every device and release every
        thread and handle, without an error that is not XenStore's loss."""
        domid = self.drvdom.domid
        self.killing = True
        drv = self.drivers.pop(domid)
        self.observer.roots.remove(drv.backend_root)
        self.host.destroy_domain(self.drvdom, timeout=DESTROY_TIMEOUT)
        wait_until(drv.xenstore.connection_lost.is_set, what="the driver domain's XenStore loss")
        flush(drv.stop, "stop() of the dead driver domain's backend")
        self.killing = False
        check(drv.devices() == [], f"dom{domid}'s dead backend still serves {drv.devices()}")
        for fe in {f for _, f, _ in drv.calls}:
            for devid in range(max(self.devids, 3)):
                check_hooks(drv.calls_of(fe, devid), f"dead dom{domid} {fe}/{devid}", ended=True)
        # The guests' devices on it went with it.
        for g in self.guests:
            for key in [k for k in g.devs if k[0] == domid]:
                del g.devs[key]

    def _bystander_on(self, backend: int) -> None:
        # op_bystander picks its device at random: pin it.
        keep = self.by_phase
        self.by_phase = {backend: keep[backend]}
        try:
            self.op_bystander()
        finally:
            keep[backend] = self.by_phase[backend]
            self.by_phase = keep

    def close(self) -> None:
        self.observer.close()
        self.dom0.close()


def flush(fn: Callable[[], object], what: str) -> None:
    """``fn()`` (a queue's flush), bounded: a queue that does not drain in
    time is a hang."""
    t = threading.Thread(target=fn, name="fuzz-flush", daemon=True)
    t.start()
    t.join(TIMEOUT)
    check(not t.is_alive(), f"{what} does not drain")


def check_hooks(calls: list[str], where: str, *, ended: bool = False) -> None:
    """The hooks of one device path, in order, across the devices made at
    that path one after the other: probe, then (connect, disconnect)
    pairs, then remove; after remove only the next device's probe.
    With ``ended`` the last device must have been removed."""
    state = "none"
    legal = {
        ("none", "probe"): "probed", ("probed", "connect"): "connected",
        ("connected", "disconnect"): "probed", ("probed", "remove"): "none",
    }
    for i, name in enumerate(calls):
        nxt = legal.get((state, name))
        check(nxt is not None, f"{where}: {name} after {calls[:i]}")
        assert nxt is not None
        state = nxt
    if ended:
        check(state == "none", f"{where}: hooks {calls} end without remove")


# -- what a run holds, for the leak checks -------------------------------------------------

def held(host: Any) -> dict[str, Any]:
    """Grant entries, ports, domains, XenStore watches and connections, and
    this process's descriptors and threads."""
    gc.collect()
    hv = host.hypervisor.stats()
    xsd = host._xenstored
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
    hyp = host.hypervisor
    with hyp._lock:
        ports = {domid: len(d.ports) for domid, d in hyp._domains.items() if d.ports}

    def watches() -> dict[int, int]:
        by_domain: collections.Counter[int] = collections.Counter()
        for ws in xsd._dispatcher.watches._by_node.values():
            by_domain.update(w.conn.domid for w in ws)
        return dict(by_domain)

    return {
        "grants": hv["grants"], "ports": ports, "domains": hv["domains"],
        "watches": xsd._call(watches),
        "fds": frozenset(fds),
        "threads": collections.Counter(
            t.name for t in threading.enumerate() if not t.name.startswith(("kworker/", "wq-"))),
    }


def wait_released(host: Any, before: dict[str, Any], *, fds: bool = True,
                  expected: dict[str, Any] | None = None) -> None:
    """Wait (bounded) until what ``before`` counted is all that is held;
    without ``fds``, descriptors are not compared (a restarted backend
    holds as many, but not the same, and not always as many while its
    predecessor's handles are being closed).  ``expected`` overrides
    counts of ``before`` that the run changed on purpose."""
    expected = expected or {}
    def same() -> bool:
        now = held(host)
        return all(now[k] == expected.get(k, before[k])
                   for k in ("grants", "ports", "domains", "watches")) \
            and (not fds or not (now["fds"] - before["fds"])) \
            and not (now["threads"] - before["threads"])

    try:
        wait_until(same, what="release")
    except FuzzFailure:
        now = held(host)
        raise FuzzFailure(
            "still held: " + ", ".join(f"{k} {now[k]} (expected {expected.get(k, before[k])})"
                                       for k in ("grants", "ports", "domains", "watches")
                                       if now[k] != expected.get(k, before[k]))
            + f"; new descriptors {sorted(now['fds'] - before['fds'])}"
            + f"; new threads {sorted((now['threads'] - before['threads']).elements())}"
        ) from None


def expected_error(record: logging.LogRecord, drivers: list[FuzzDriver] | None = None) -> bool:
    """Errors the fuzzer asks for: a device failed (``dev.error``, rate
    limited), and the disconnect and remove hooks and port callbacks it
    made raise.  The
    rate limit's count of the lines it held back goes out at the level of
    the line it lets through next (an error line itself, checked apart)."""
    if record.name != "xenback.xenbus":
        return False
    if record.msg == "%s: %s failed%s":
        # A port's callback that raised (the device failed for it): ours only.
        return record.exc_info is not None and "injected failure" in str(record.exc_info[1])
    return record.msg in ("%s: error %d: %s", "%s: disconnect failed", "%s: remove failed",
                          "%s: %d message%s suppressed")


class Run:
    """A host, a driver domain, a backend in each, and a Fuzzer: what the
    suite and main() share.  ``with Run(seed) as run: run.fuzz(steps)``."""

    def __init__(self, seed: int, **kwargs: Any) -> None:
        self.seed = seed
        self.kwargs = kwargs
        self.errors: list[logging.LogRecord] = []
        self.crashed: list[str] = []
        #: Error lines logged per device path (rate limited).
        self.device_errors: collections.Counter[str] = collections.Counter()
        #: Devices dropped for a node of their own they could not read, per path.
        self.refused: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> Run:
        from xenback.sim import SimHost

        run = self

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.msg == "%s: error %d: %s":
                    run.device_errors[str(record.args[0])] += 1  # type: ignore[index]
                if record.levelno >= logging.ERROR and not expected_error(record):
                    run.errors.append(record)
                elif run.dying(record):
                    run.errors.append(record)
                elif record.threadName == "fuzz-destroy" and "did not close" in record.msg \
                        and str(record.args[0]) not in run.taken():  # type: ignore[index]
                    # A dying domain's frontend directories go first: every
                    # backend can close at once, whatever its guest did
                    # (but one dropped as its nodes were taken: op_take).
                    run.errors.append(record)
                elif record.levelno >= logging.WARNING and record.exc_info \
                        and record.name.startswith("xenback") and not expected_error(record):
                    # A traceback is a bug's: whatever XenStore refuses is
                    # said in a line.
                    run.errors.append(record)
                if record.msg.startswith("%s: its own node may not be read any more"):
                    run.refused[str(record.args[0])] += 1  # type: ignore[index]

        self._catch = Catch()
        logging.getLogger().addHandler(self._catch)
        self._excepthook = threading.excepthook
        threading.excepthook = lambda a: self.crashed.append(f"{a.thread}: {a.exc_value!r}")
        self.before_all = held_threads()
        self.host = SimHost()
        self.host.start()
        self.drvdom = self.host.create_domain("driver-domain")
        with XenStore(self.host.dom0.xenstore()) as xs:
            # As libxl lets a driver domain hear of its frontends' deaths.
            xs.set_perms("@releaseDomain", ["n0", f"r{self.drvdom.domid}"])
        self.before_drivers = held(self.host)
        connections = self.host.hypervisor.stats()["connections"]
        self.drivers = [FuzzDriver(self.host.dom0, self.seed),
                        FuzzDriver(self.drvdom, self.seed + 1)]
        for drv in self.drivers:
            drv.start()
            # The dispatcher (a thread) and the grant table handle (a
            # descriptor) live from first use until stop(): open them now,
            # so that the leak checks count only what devices hold.
            drv.events  # noqa: B018
            drv.gnttab  # noqa: B018
        # The hypervisor accepts those connections on its own thread: count
        # its descriptors once it has.
        wait_until(lambda: self.host.hypervisor.stats()["connections"]
                   == connections + 2 * len(self.drivers), what="the backends' handles")
        self.before = held(self.host)
        return self

    def taken(self) -> dict[str, set[str]]:
        """What the fuzzer took of each device's own nodes (see op_take)."""
        fz = getattr(self, "fz", None)
        return fz.ever_taken if fz is not None else {}

    def dying(self, record: logging.LogRecord) -> bool:
        """A traceback logged while the driver domain is destroyed under
        its backend (see Fuzzer.kill_drvdom), other than the faults the
        fuzzer injects.  Its home goes before its XenStore connection
        does, and the backend's requests fail with EACCES meanwhile: that
        is the domain's end, to be said once, not a warning or an error
        with a traceback for each request, device or watch."""
        fz = getattr(self, "fz", None)
        return bool(fz is not None and fz.killing and record.exc_info
                    and record.levelno >= logging.WARNING and not expected_error(record))

    def without_drvdom(self, before: dict[str, Any]) -> dict[str, Any]:
        """``before``'s counts once the driver domain is gone (a run that
        killed it): its ports and watches, and itself, are no more."""
        domid = self.drvdom.domid
        return {"domains": before["domains"] - 1,
                "ports": {k: v for k, v in before["ports"].items() if k != domid},
                "watches": {k: v for k, v in before["watches"].items() if k != domid}}

    def fuzz(self, steps: int) -> Fuzzer:
        fz = Fuzzer(self.seed, self.host, self.drivers, self.drvdom, **self.kwargs)
        self.fz = fz
        started = time.monotonic()
        try:
            fz.run(steps)
            fz.finish()
        finally:
            fz.close()
        # What a guest makes the backend log is rate limited per device
        # (10 lines per 5 s): per path, as many budgets as devices were
        # made there (adds, and restarts, which make new objects).
        windows = 1 + int((time.monotonic() - started) // 5)
        for path, count in self.device_errors.items():
            made = fz.added[path] + fz.seen["restart"] + 1
            check(count <= 10 * made * windows,
                  f"{path}: {count} error lines, rate limit of {made} devices in {windows} "
                  f"windows exceeded")
        for path, count in self.refused.items():
            # Said once per device, and only where the toolstack took a node.
            made = fz.added[path] + fz.seen["restart"] + 1
            check(path in fz.taken_paths, f"{path}: dropped for a node nobody took")
            check(count <= made, f"{path}: said {count} times that a node was taken, "
                  f"for {made} devices")
        self.expected = self.without_drvdom(self.before) if fz.kill_driver_domain else {}
        wait_released(self.host, self.before, fds=fz.seen["restart"] == 0 and
                      not fz.kill_driver_domain, expected=self.expected)
        check(not self.crashed, f"thread exceptions: {self.crashed}")
        check(not self.errors, "error logs: " + "; ".join(
            f"{r.name}: {r.getMessage()}" for r in self.errors))
        return fz

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            for drv in self.drivers:
                drv.stop()
            if exc_type is None:
                # Stopped, the backends hold nothing: every descriptor is
                # back, restarts or not.
                expected = self.without_drvdom(self.before_drivers) \
                    if getattr(self, "expected", None) else {}
                wait_released(self.host, self.before_drivers, expected=expected)
            self.host.close()
        finally:
            logging.getLogger().removeHandler(self._catch)
            threading.excepthook = self._excepthook


def held_threads() -> collections.Counter[str]:
    return collections.Counter(
        t.name for t in threading.enumerate() if not t.name.startswith(("kworker/", "wq-")))


def main() -> None:
    import argparse
    import sys
    import traceback

    from toolargs import seed_range, whole

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=seed_range, default=range(10),
                        help="N or N-M (default 0-9)")
    parser.add_argument("--steps", type=whole(1), default=300)
    parser.add_argument("--guests", type=whole(1), default=3)
    parser.add_argument("--devids", type=whole(1), default=3)
    parser.add_argument("-v", action="store_true", help="print what each seed did")
    parser.add_argument("--log", help="log everything (DEBUG) to this file")
    args = parser.parse_args()
    seeds = args.seeds
    logging.getLogger().setLevel(logging.WARNING)
    if args.log:
        handler = logging.FileHandler(args.log, "w")
        handler.setFormatter(logging.Formatter(
            "%(relativeCreated)8.1f %(threadName)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.DEBUG)
    logging.lastResort = None  # the warnings a hostile run causes are expected

    failures = 0
    seen: collections.Counter[str] = collections.Counter()
    started_all = time.monotonic()
    for seed in seeds:
        started = time.monotonic()
        run = Run(seed, guests=args.guests, devids=args.devids)
        try:
            with run:
                try:
                    fz = run.fuzz(args.steps)
                finally:
                    if hasattr(run, "fz"):
                        seen.update(run.fz.seen)
                        seen.update(f"injected {k}" for d in run.drivers
                                    for k in d.injected.elements())
            after = held_threads()
            check(not (after - run.before_all),
                  f"threads left after stop: {sorted((after - run.before_all).elements())}")
            print(f"seed {seed}: ok ({time.monotonic() - started:.1f} s)", flush=True)
            if args.v:
                print(sorted(fz.seen.items()))
        except Exception:
            failures += 1
            print(f"seed {seed}: FAILED ({time.monotonic() - started:.1f} s)", flush=True)
            traceback.print_exc()
            for r in run.errors:
                print("  log:", r.name, r.getMessage())
                if r.exc_info:
                    print(logging.Formatter().formatException(r.exc_info))
    print(sorted(seen.items()))
    print(f"{failures} of {len(seeds)} seeds failed, {args.steps} steps each, "
          f"{time.monotonic() - started_all:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
