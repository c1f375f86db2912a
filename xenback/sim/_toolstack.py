"""The toolstack of the simulated host: what libxl writes into XenStore.

Adding a device writes, in one transaction, the nodes and permissions of
``libxl__device_generic_add``, the frontend's before the backend's:

* backend ``/local/domain/<be>/backend/<type>/<fe>/<devid>``, owned by the
  backend domain and readable by the frontend: ``frontend``, ``frontend-id``,
  ``online`` = 1, ``state`` = 1 (Initialising), plus the caller's nodes;
* frontend ``/local/domain/<fe>/device/<type>/<devid>``, owned by the
  frontend domain and readable by the backend: ``backend``, ``backend-id``,
  ``state`` = 1, plus the caller's nodes;
* libxl's private ``/libxl/<fe>/device/<type>/<devid>`` (dom0 only): its
  ``frontend`` and ``backend`` first, before the two directories above, and
  ``frontend-id``, ``online`` = 1 and ``state`` = 1 after them, the order
  libxl 4.17 was seen to write them in on real Xen.

As ``libxl__device_add_async``, adding refuses a device of a domain that
does not exist and one whose backend directory exists
(``ERROR_DEVICE_EXISTS``), unless asked to replace it.

Removing follows ``libxl__initiate_device_generic_remove``: ``online`` = 0,
and ``state`` = 5 (Closing) unless the backend is Closed (6) already, in one
transaction; a wait of up to 10 s for the backend to reach Closed; then, in
one transaction, the frontend, libxl and backend directories are deleted in
that order, each with its parents that this leaves empty
(``libxl__xs_path_cleanup``): removing the last device of a type deletes
``backend/<type>`` itself, the directory a backend watches.  A backend that
does not close in time is removed anyway, as libxl's forced remove does
after its timeout.

A dying domain's devices (``libxl__devices_destroy``) lose their frontend
directory first, before the backend is asked to close; the rest is as above.

Those 10 s are the backend's.  Each request waits for XenStore's reply with
no bound (pyxs has no timeout): XenStore's loop stuck, a bug of the
simulator, hangs the operation until a Ctrl-C (or pytest-timeout) ends it.
A watchdog per request, closing the connection at a deadline, was tried and
judged not worth its cost, a thread per operation.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pyxs

from workqueue import shown, wait_slice
from xenback._closing import Closing
from xenback._flags import check_domain_id, check_flag, is_int
from xenback.xenstore import _commit, adopt_router, close_client

from ._heldlog import log

logger = logging.getLogger(__name__)

T = TypeVar("T")

XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6

#: libxl's LIBXL_DESTROY_TIMEOUT.
REMOVE_TIMEOUT = 10.0

_EMPTY: Mapping[str, str] = {}

#: The largest devid: libxl's ``libxl_devid`` is a C ``int`` (-1 asks it
#: to pick one), so a device's id is 0 to INT_MAX.  Past it libxl could
#: not even name the device; here its paths would be made of a number
#: whose str() fails past 4300 digits.
DEVID_MAX = 2**31 - 1


@dataclass(frozen=True)
class Device:
    """A backend/frontend pair the toolstack created.

    Checked as it is made, as :meth:`Toolstack.add_device` checks its
    arguments: ``device_type`` a XenStore path element, ``frontend_id``
    and ``backend_id`` domain ids (0 to 0x7FEF), ``devid`` 0 to
    :data:`DEVID_MAX` (libxl's C ``int``); :class:`TypeError` for a wrong
    type, :class:`ValueError` for a wrong value.  The numbers are kept as
    plain ints (an IntEnum's str() may be its name, in a path).
    """

    device_type: str
    frontend_id: int
    backend_id: int
    devid: int

    def __post_init__(self) -> None:
        _check_name("device_type", self.device_type)
        # Frozen: set through object's own __setattr__.
        object.__setattr__(self, "frontend_id", check_domain_id(self.frontend_id, "frontend_id"))
        object.__setattr__(self, "backend_id", check_domain_id(self.backend_id, "backend_id"))
        object.__setattr__(self, "devid", check_devid(self.devid))

    @property
    def backend_path(self) -> str:
        """``/local/domain/<backend_id>/backend/<type>/<frontend_id>/<devid>``."""
        return (
            f"/local/domain/{self.backend_id}/backend/"
            f"{self.device_type}/{self.frontend_id}/{self.devid}"
        )

    @property
    def frontend_path(self) -> str:
        """``/local/domain/<frontend_id>/device/<type>/<devid>``."""
        return f"/local/domain/{self.frontend_id}/device/{self.device_type}/{self.devid}"

    @property
    def libxl_path(self) -> str:
        """``/libxl/<frontend_id>/device/<type>/<devid>``, libxl's own record."""
        return f"/libxl/{self.frontend_id}/device/{self.device_type}/{self.devid}"


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__} {shown(value)}")
    if not value or not all(c.isascii() and (c.isalnum() or c in "-_") for c in value):
        raise ValueError(f"{what} must be a non-empty XenStore path element, not {shown(value)}")


def check_devid(devid: int) -> int:
    """``devid`` as a plain int, if it is one libxl could give a device:
    by the rule of ports (:func:`xenback._flags.is_int`, else TypeError)
    and 0 to :data:`DEVID_MAX` (else ValueError)."""
    if not is_int(devid):
        raise TypeError(f"devid must be an int, not {type(devid).__name__} {shown(devid)}")
    if not 0 <= devid <= DEVID_MAX:
        raise ValueError(f"devid must be 0 to {DEVID_MAX} (a libxl_devid, a C int), "
                         f"not {shown(devid)}")
    return int(devid)


def check_timeout(timeout: float) -> None:
    """TypeError unless ``timeout`` is a number (an int or a float, not a
    bool), ValueError unless it is 0 or more (NaN, never past, would make
    a wait for a backend endless)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, "
                        f"not {type(timeout).__name__} {shown(timeout)}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, "
                         f"not {shown(timeout)}")


def _check_device(device: Device) -> None:
    if not isinstance(device, Device):
        raise TypeError(f"device must be a xenback.sim.Device, "
                        f"not {type(device).__name__} {shown(device)}")


class Toolstack(Closing):
    """Creates and removes devices the way libxl does; acts as dom0.

    Holds no connection between calls (each operation opens its own
    XenStore client), so it needs no closing and is safe to share between
    threads.
    """

    def __init__(self, xenstore_path: str | os.PathLike[str]) -> None:
        self._xenstore_path = os.fspath(xenstore_path)

    @contextmanager
    def _client(
        self, on_lost: Callable[[Exception], None] | None = None
    ) -> Iterator[pyxs.Client]:
        client = pyxs.Client(unix_socket_path=self._xenstore_path)
        try:
            # Should XenStore go away (the host closing under us), requests
            # waiting for replies fail with ENOTCONN instead of waiting
            # forever.  In the try: a Ctrl-C as it returns must not leave
            # the router's terminator pair open (close_client closes it).
            adopt_router(client.router, on_lost or _lost, name="toolstack-xenstore")
            # In the try: a Ctrl-C as connect() returns (its router thread
            # started) must not leave that thread running.
            client.connect()
            yield client
        finally:
            try:
                close_client(client)  # quiet if XenStore hangs up meanwhile
            except BaseException:
                # A Ctrl-C in the close (as it starts, or in its wait for
                # the router): nobody else has this client to close, and
                # its router thread would run for ever.  Closing again
                # finishes what the first got to.
                close_client(client)
                raise

    def close(self) -> None:
        """Nothing to release; kept so that a Toolstack works in ``with``."""

    def transaction(self, body: Callable[[pyxs.Client], T]) -> T:
        """Run ``body(client)`` in a transaction, retrying on EAGAIN."""
        return self._transaction(body, _nothing)

    def _transaction(self, body: Callable[[pyxs.Client], T], committed: Callable[[], None]) -> T:
        """:meth:`transaction`, calling ``committed()`` as the commit's
        reply says it went, where no Ctrl-C lands (see _commit)."""
        with self._client() as client:
            while True:
                client.transaction()
                try:
                    result = body(client)
                except BaseException:
                    # The body's error says more than one of the rollback's
                    # (the connection lost meanwhile, which drops the
                    # transaction anyway; so does the close after this).
                    try:
                        client.rollback()
                    except pyxs.PyXSError as e:
                        log(logger).debug("toolstack: rollback after a failed transaction "
                                     "failed too: %s", e)
                    raise
                if _commit(client, committed):
                    return result

    # -- devices -------------------------------------------------------------

    def add_device(
        self,
        device_type: str,
        frontend_id: int,
        backend_id: int = 0,
        devid: int = 0,
        *,
        backend_nodes: Mapping[str, str] = _EMPTY,
        frontend_nodes: Mapping[str, str] = _EMPTY,
        replace: bool = False,
        into: list[Device] | None = None,
    ) -> Device:
        """Create a device pair, both sides in state Initialising.

        Raises :class:`TypeError` for an argument of the wrong type
        (``replace`` must be True or False), :class:`ValueError` for a
        wrong value (a domain id is 0 to 0x7FEF, a ``devid`` 0 to
        :data:`DEVID_MAX`, libxl's C ``int``; see :class:`Device`),
        :class:`LookupError`
        if either domain does not exist and :class:`FileExistsError` if the
        device does (its backend directory), as libxl refuses them.  With
        ``replace`` a device that exists is written afresh in the same
        transaction, as libxl never does: for testing a backend against a
        toolstack that re-creates a device under it.

        With ``into``, the device is appended to it as XenStore's reply
        says the transaction that adds it committed, before this call
        hears of it: for a caller that must remove it whatever interrupts
        the call (a Ctrl-C as the commit's reply comes, or as this
        returns, would otherwise leave a device nobody knows of, and every
        later add of it refused).  A Ctrl-C once the commit went waits
        for its reply.  Nothing else is appended: the device may be
        another caller's, added while this call's commit failed, which
        that caller removes.
        """
        check_flag("replace", replace)
        dev = Device(device_type, frontend_id, backend_id, devid)  # checks them
        frontend_id, backend_id, devid = dev.frontend_id, dev.backend_id, dev.devid
        for key in (*backend_nodes, *frontend_nodes):
            _check_name("node name", key)
        fe, be = dev.frontend_path.encode(), dev.backend_path.encode()
        frontend_perms = [f"n{frontend_id}".encode(), f"r{backend_id}".encode()]
        backend_perms = [f"n{backend_id}".encode(), f"r{frontend_id}".encode()]

        def write(c: pyxs.Client, base: bytes, nodes: Mapping[str, Any]) -> None:
            for key, value in nodes.items():
                c.write(base + b"/" + key.encode(), str(value).encode())

        def body(c: pyxs.Client) -> None:
            # libxl refuses a device of a domain that does not exist, and
            # one whose backend directory exists (ERROR_DEVICE_EXISTS):
            # writing it again would wipe what a backend serves.
            for domid in dict.fromkeys((frontend_id, backend_id)):
                if not c.exists(f"/local/domain/{domid}".encode()):
                    raise LookupError(f"no domain {domid}")
            # libxl's order: its own directory, the frontend's, the
            # backend's, then the rest of its own.
            lx = dev.libxl_path.encode()
            _rm(c, lx)
            c.mkdir(lx)
            c.set_perms(lx, [b"n0"])
            write(c, lx, {"frontend": dev.frontend_path, "backend": dev.backend_path})
            _rm(c, fe)
            c.mkdir(fe)
            c.set_perms(fe, frontend_perms)
            write(c, fe, {"backend": dev.backend_path})
            write(c, fe, {"backend-id": backend_id, "state": XENBUS_STATE_INITIALISING})
            write(c, fe, frontend_nodes)
            # Checked here, not first: XenStore fires a transaction's
            # watches in the order its nodes were first touched.
            if not replace and c.exists(be):
                raise FileExistsError(errno.EEXIST, f"device {dev.backend_path} exists already")
            _rm(c, be)
            c.mkdir(be)
            c.set_perms(be, backend_perms)
            write(c, be, {"frontend": dev.frontend_path})
            write(c, be, {"frontend-id": frontend_id, "online": 1})
            write(c, be, {"state": XENBUS_STATE_INITIALISING})
            write(c, be, backend_nodes)
            write(c, lx, {"frontend-id": frontend_id, "online": 1})
            write(c, lx, {"state": XENBUS_STATE_INITIALISING})

        # Listed on the router thread as the commit's reply comes (see
        # _commit): no Ctrl-C lands between the two.
        self._transaction(body, _nothing if into is None else functools.partial(into.append, dev))
        log(logger).info("toolstack: added %s device %d: %s <- %s", device_type, devid, be, fe)
        return dev

    def remove_device(self, device: Device, timeout: float = REMOVE_TIMEOUT) -> bool:
        """Remove ``device`` as libxl does; returns False if the backend did
        not reach Closed within ``timeout`` seconds (it is removed anyway)."""
        _check_device(device)
        check_timeout(timeout)
        return not self._remove([device], timeout)

    def destroy_devices(self, domid: int, timeout: float = REMOVE_TIMEOUT) -> list[Device]:
        """Remove the devices of dying frontend domain ``domid`` as
        ``libxl__devices_destroy`` does: every frontend directory first,
        then each backend asked to close, waited for up to ``timeout``
        seconds in all, and removed.  Returns the devices whose backend did
        not close in time (removed anyway)."""
        domid = check_domain_id(domid)
        check_timeout(timeout)
        devices = [d for d in self.devices(domid) if d.backend_id != domid]
        for dev in devices:
            self.transaction(functools.partial(_prune, path=dev.frontend_path))
        return self._remove(devices, timeout)

    def destroy_device(self, device: Device) -> None:
        """Delete a device's directories at once, without asking its backend
        (libxl__device_destroy: the end of a removal, or a forced one)."""
        _check_device(device)

        def body(c: pyxs.Client) -> None:
            for path in (device.frontend_path, device.libxl_path, device.backend_path):
                _prune(c, path)

        self.transaction(body)
        log(logger).info("toolstack: removed %s", device.backend_path)

    def _remove(self, devices: list[Device], timeout: float) -> list[Device]:
        """Ask each backend to close, wait for all of them until a shared
        deadline, then delete every device; returns those that timed out."""
        if not devices:
            return []
        deadline = time.monotonic() + timeout
        states = [dev.backend_path.encode() + b"/state" for dev in devices]
        late = []
        # The watches are set before the first write so that no state
        # change can slip between the write and the wait.
        with self._watch(states) as events:
            waiting = [
                (dev, state)
                for dev, state in zip(devices, states, strict=True)
                if self.transaction(functools.partial(_initiate, state_path=state))
            ]
            for dev, state in waiting:
                if not self._wait_closed(state, events, deadline):
                    log(logger).warning(
                        "toolstack: backend %s did not close within %.1f s; forcing removal",
                        dev.backend_path,
                        timeout,
                    )
                    late.append(dev)
        for dev in devices:
            self.destroy_device(dev)
        return late

    def devices(self, domid: int | None = None) -> list[Device]:
        """Devices libxl knows of, for frontend ``domid`` or all."""
        if domid is not None:
            domid = check_domain_id(domid)
        out = []
        with self._client() as c:
            fes = [domid] if domid is not None else [int(d) for d in _list(c, b"/libxl")]
            for fe in fes:
                base = f"/libxl/{fe}/device".encode()
                for kind in _list(c, base):
                    for devid in _list(c, base + b"/" + kind):
                        backend = _read(c, base + b"/" + kind + b"/" + devid + b"/backend")
                        if backend is None:
                            continue
                        be = int(backend.decode().split("/")[3])
                        out.append(Device(kind.decode(), fe, be, int(devid)))
        return out

    # -- waiting -------------------------------------------------------------

    @contextmanager
    def _watch(self, paths: list[bytes]) -> Iterator[queue.Queue[Any]]:
        events: queue.Queue[Any] | None = None

        def lost(exc: Exception) -> None:
            # No event will come any more: wake the wait to say so.
            _lost(exc)
            if events is not None:
                events.put(_LOST)

        with self._client(lost) as client:
            monitor = client.monitor()
            events = monitor.events
            for path in paths:
                monitor.watch(path, b"toolstack")
            yield monitor.events

    def _wait_closed(self, path: bytes, events: queue.Queue[Any], deadline: float) -> bool:
        """Wait until ``path`` reads Closed or is gone; False at ``deadline``.
        Any event wakes the wait: each one is followed by a fresh read."""
        with self._client() as client:
            while True:
                try:
                    state = _read(client, path)
                except pyxs.ConnectionError as exc:
                    # An event that woke us as XenStore went (one on its
                    # way then) leads here, not to the _LOST behind it:
                    # the same loss, said the same way.
                    raise _went_away(path) from exc
                if state is None or _int(state) == XENBUS_STATE_CLOSED:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    # In slices, for a signal's handler (see wait_slice);
                    # an empty slice only costs one more read.
                    event = events.get(timeout=wait_slice(remaining))
                except queue.Empty:
                    continue
                if event is _LOST:
                    events.put(_LOST)  # for the waits on the other devices
                    raise _went_away(path)


def _nothing() -> None:
    pass


#: Put in a watch's event queue when its connection is lost.
_LOST = object()


def _went_away(path: bytes) -> pyxs.ConnectionError:
    return pyxs.ConnectionError(
        f"XenStore went away while waiting for {path.decode()} to read Closed"
    )


def _lost(exc: Exception) -> None:
    log(logger).debug("toolstack: XenStore connection lost: %s", exc)


def _initiate(c: pyxs.Client, state_path: bytes) -> bool:
    """libxl__initiate_device_generic_remove's transaction: ``online`` = 0,
    and Closing unless the backend is Closed.  True if there is a backend
    to wait for."""
    state = _read(c, state_path)
    if state is None:
        return False  # already gone
    c.write(state_path.rsplit(b"/", 1)[0] + b"/online", b"0")
    if _int(state) == XENBUS_STATE_CLOSED:
        return False
    c.write(state_path, str(XENBUS_STATE_CLOSING).encode())
    return True


def _int(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        return -1


def _read(c: pyxs.Client, path: bytes) -> bytes | None:
    """The value at ``path``, None if it does not exist."""
    try:
        value: bytes = c.read(path)
    except pyxs.PyXSError as e:
        if e.args and e.args[0] == errno.ENOENT:
            return None
        raise
    return value


def _list(c: pyxs.Client, path: bytes) -> list[bytes]:
    try:
        return list(c.list(path))
    except pyxs.PyXSError as e:
        if e.args and e.args[0] == errno.ENOENT:
            return []
        raise


def _prune(c: pyxs.Client, path: str) -> None:
    """libxl__xs_path_cleanup: delete ``path``, then each parent that this
    leaves empty (no value, no children), up to the first that is not."""
    node = path.encode()
    _rm(c, node)
    while True:
        node = node.rsplit(b"/", 1)[0]
        if not node or _read(c, node) != b"" or _list(c, node):
            return
        _rm(c, node)


def _rm(c: pyxs.Client, path: bytes) -> None:
    """Delete ``path`` if it exists (libxl ignores xs_rm's errors too)."""
    try:
        c.delete(path)
    except pyxs.PyXSError as e:
        if not e.args or e.args[0] != errno.ENOENT:
            raise
