"""A device's frontend on a simulated guest: the xenbus side a test writes.

Testing a backend needs a guest that plays the device's frontend, and the
xenbus half of every frontend driver is the same few steps, those of
Linux's ``xenbus_grant_ring()``, ``xenbus_alloc_evtchn()`` and
``xenbus_switch_state()``: share pages with the backend's domain, allocate
an unbound port for it, write the ring references, the port and the state
in one transaction, wait for the backend to connect; and on the way out go
Closing, wait for the backend to close, go Closed and let go of it all.
:class:`FrontendDevice` does them, leaving to the caller what is the
device's own: which nodes it publishes and what goes on in its pages::

    from xenback import XenbusState
    from xenback.sim import FrontendDevice

    with FrontendDevice.add(guest, "console") as fe:
        fe.wait_backend(XenbusState.INIT_WAIT)     # the backend's features are there now
        page = fe.share()                          # xenbus_grant_ring()
        port = fe.bind_port()                      # xenbus_alloc_evtchn()
        fe.publish({"ring-ref": page.refs[0], "port": port})   # and Initialised, at once
        fe.wait_backend(XenbusState.CONNECTED)
        ...                                        # page.buffer; fe.evtchn.notify(port)
    # Closing, the backend's Closing, Closed; the device removed, pages and port freed

The guest may be in this process (``host.create_domain()``) or in another
(:func:`xenback.sim.attach`).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Mapping
from typing import Self

from xenback._closing import Closing
from xenback.platform import EventChannelError, GrantError
from xenback.xenbus import XenbusState
from xenback.xenstore import Transaction, XenStore, _predicate_name

from ._domain import Domain
from ._evtchn import EventChannel
from ._grant import GrantShare, SharedPages
from ._toolstack import Device, check_timeout

logger = logging.getLogger(__name__)

#: How long a frontend waits for its backend unless told otherwise (as
#: long as libxl waits for a backend to close a device it removes).
TIMEOUT = 10.0

# Linux's xenbus_strstate(): the names a reader of xenbus logs knows.
_NAMES = {
    XenbusState.UNKNOWN: "Unknown",
    XenbusState.INITIALISING: "Initialising",
    XenbusState.INIT_WAIT: "InitWait",
    XenbusState.INITIALISED: "Initialised",
    XenbusState.CONNECTED: "Connected",
    XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed",
    XenbusState.RECONFIGURING: "Reconfiguring",
    XenbusState.RECONFIGURED: "Reconfigured",
}

_CLOSING_OR_GONE = frozenset({XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.UNKNOWN})
_CLOSED_OR_GONE = frozenset({XenbusState.CLOSED, XenbusState.UNKNOWN})


class FrontendDevice(Closing):
    """The frontend of one device, played by a simulated guest ``domain``.

    Made from the guest's :class:`~xenback.sim.Domain` and a
    :class:`~xenback.sim.Device` the toolstack added (which stays the
    caller's to remove), or by :meth:`add`, which adds the device and
    removes it again at :meth:`close`.  It opens the guest's XenStore
    connection, grant-sharing handle and event channel handle; each
    method says in its errors which device it was working on.

    Attributes: ``domain``, ``device``; ``xenstore``, the guest's
    :class:`~xenback.XenStore` connection (to read what the backend wrote,
    or write nodes of one's own); ``evtchn``, its
    :class:`~xenback.sim.EventChannel` (``notify(port)``, ``wait()``,
    ``unmask(port)``); ``timeout``, the seconds :meth:`wait_backend` and
    :meth:`close` wait for the backend unless given theirs.

    One thread at a time, as a driver's probe and remove are; the event
    channel handle may be used from any thread.

    It acts only when called: nothing answers the backend's Closing by
    itself, as a Linux frontend's ``otherend_changed`` would.  A
    toolstack removal of a connected device (``remove_device()``) so
    waits its whole timeout and forces the removal, unless the test calls
    :meth:`close` (``host.destroy_domain()`` does not wait: it deletes
    the frontend's directory first).
    """

    def __init__(self, domain: Domain, device: Device, *, timeout: float = TIMEOUT) -> None:
        if not isinstance(domain, Domain):
            raise TypeError(f"domain must be a xenback.sim Domain, not {type(domain).__name__}")
        if not isinstance(device, Device):
            raise TypeError(f"device must be a xenback.sim Device (what toolstack.add_device "
                            f"returns), not {type(device).__name__}")
        if device.frontend_id != domain.domid:
            raise ValueError(f"device {device.frontend_path} is domain {device.frontend_id}'s, "
                             f"not domain {domain.domid}'s")
        check_timeout(timeout)
        self.domain, self.device, self.timeout = domain, device, timeout
        # Set before anything can fail: close() looks at them.
        self._closed = False
        self._owned = False
        self._unserved = False  # no backend had taken the device up at close()
        # The connection is recorded before it connects, so that a Ctrl-C
        # as it does (its router thread started) finds it to close.  (A
        # handle lost as its maker returns holds only a socket, which the
        # garbage collector closes.)
        self.xenstore = XenStore(domain.xenstore())
        try:
            self.xenstore.open()
            self._gntshr: GrantShare = domain.gntshr()
            self.evtchn: EventChannel = domain.evtchn()
        except BaseException:
            self._close_handles()
            raise

    def _close_handles(self) -> None:
        """Close the handles __init__ got to open, if it got that far."""
        for name in ("evtchn", "_gntshr", "xenstore"):
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()

    @classmethod
    def add(cls, domain: Domain, device_type: str, devid: int = 0, *, backend_id: int = 0,
            timeout: float = TIMEOUT) -> Self:
        """Add a ``device_type`` device of ``domain``, served by
        ``backend_id``, through the host's toolstack, and play its frontend;
        :meth:`close` removes the device again, as libxl does (a leftover
        would make the next add refused with :class:`FileExistsError`).
        Whole or nothing: failing or interrupted (Ctrl-C) halfway, it
        removes the device and closes the handles it had made."""
        toolstack = domain.toolstack
        # A Ctrl-C can land as any call returns, the device added or the
        # handles opened but neither handed back yet: so the toolstack
        # lists the device as its commit goes (and only a device it
        # added: a rival's may be there), and the frontend exists before
        # it opens anything, for the way out to find both.
        devices: list[Device] = []
        frontend = cls.__new__(cls)
        try:
            toolstack.add_device(device_type, domain.domid, backend_id, devid, into=devices)
            cls.__init__(frontend, domain, devices[0], timeout=timeout)
            frontend._owned = True
        except BaseException:
            frontend._close_handles()
            for device in devices:
                toolstack.destroy_device(device)
            raise
        return frontend

    # -- the frontend's resources ----------------------------------------------

    def share(self, npages: int = 1, *, writable: bool = True) -> SharedPages:
        """Share ``npages`` zeroed pages with the backend's domain, as
        ``xenbus_grant_ring()``: their grant refs are ``.refs``, their
        memory ``.buffer``.  They stay shared until :meth:`close`."""
        self._check_open()
        backend_id = self.device.backend_id
        try:
            return self._gntshr.share_pages(backend_id, npages, writable=writable)
        except GrantError as exc:
            raise GrantError(exc.errno, f"{self.device.frontend_path}: sharing {npages!r} pages "
                                        f"with domain {backend_id}: {exc.strerror}") from exc

    def bind_port(self) -> int:
        """A local port the backend's domain may bind to, as
        ``xenbus_alloc_evtchn()``; bound until :meth:`close`."""
        self._check_open()
        backend_id = self.device.backend_id
        try:
            return self.evtchn.bind_unbound_port(backend_id)
        except EventChannelError as exc:
            raise EventChannelError(exc.errno, f"{self.device.frontend_path}: allocating a port "
                                               f"for domain {backend_id}: {exc.strerror}") from exc

    # -- xenbus ----------------------------------------------------------------

    def publish(self, nodes: Mapping[str, str | int] | None = None, /, *,
                state: XenbusState = XenbusState.INITIALISED, **more: str | int) -> None:
        """Write ``nodes`` (and ``more``, for names that are identifiers)
        into the frontend's directory and switch to ``state``, in one
        transaction: the backend never sees the state without the nodes
        it announces."""
        self._check_open()
        writes = {**(nodes or {}), **more}
        if "state" in writes:
            raise ValueError("'state' is publish()'s state argument, not one of its nodes")
        new_state = XenbusState(state)
        base = self.device.frontend_path

        def write(t: Transaction) -> None:
            for key, value in writes.items():
                t.write(f"{base}/{key}", value)
            t.write(f"{base}/state", int(new_state))

        self.xenstore.transaction(write)

    def backend_state(self) -> XenbusState:
        """The backend's state now; Unknown once its node is gone."""
        self._check_open()
        return self._backend_state()

    def _backend_state(self) -> XenbusState:
        path = f"{self.device.backend_path}/state"
        value = self.xenstore.read(path)
        try:
            return XenbusState.parse(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def wait_backend(self, state: XenbusState | Callable[[XenbusState], bool],
                     timeout: float | None = None) -> XenbusState:
        """Wait until the backend is in ``state`` (or in a state that
        ``state``, a function, accepts) and return the state.

        Raises :class:`TimeoutError` after ``timeout`` seconds (default:
        the frontend's), naming the backend, what was awaited and the
        state it is in; :class:`ConnectionError` if XenStore goes away.
        Awaiting a state other than Closing, Closed or Unknown,
        :class:`ConnectionRefusedError` as soon as the backend, seen in
        such a state during the wait, goes Closing or Closed (or its
        directory goes): it failed the device (its error node says why) or
        was told to let go of it, and will not get there until the
        frontend starts over.  A Closing or Closed seen first is not taken
        for that: it may be the end of the frontend's previous connection,
        which a backend leaves once the frontend is Initialising again.
        """
        self._check_open()
        return self._wait_backend(state, timeout)

    def _wait_backend(self, state: XenbusState | Callable[[XenbusState], bool],
                      timeout: float | None) -> XenbusState:
        wait = self.timeout if timeout is None else timeout
        check_timeout(wait)
        done: Callable[[XenbusState], bool]
        # The closing state that ended the wait early, if one did.
        refused: XenbusState | None = None
        if isinstance(state, int) and not isinstance(state, bool):  # a XenbusState is an int
            awaited = XenbusState(state)
            what = f"reach {_NAMES[awaited]}"
            # Whether the backend was seen below Closing: from then on its
            # closing is its answer, not what it left of an earlier one.
            up = False

            def done(s: XenbusState) -> bool:
                nonlocal up, refused
                if s is awaited:
                    return True
                if s in _CLOSING_OR_GONE:
                    if up and awaited not in _CLOSING_OR_GONE:
                        refused = s
                        return True
                else:
                    up = True
                return False
        elif callable(state):
            done = state
            what = "satisfy " + _predicate_name(state)
        else:
            raise TypeError(f"state must be a XenbusState or a function of one, "
                            f"not {type(state).__name__}")

        def check(value: str | None) -> bool:
            try:
                parsed = XenbusState.parse(value)
            except ValueError:
                return False  # garbage satisfies nothing; the timeout names it
            return done(parsed)

        try:
            value = self.xenstore.wait_for(f"{self.device.backend_path}/state", check,
                                           timeout=wait)
        except TimeoutError:
            raise TimeoutError(f"backend {self.device.backend_path} did not {what} within "
                               f"{wait:g} s (it is {self._describe_backend()})") from None
        if refused is not None:
            gone = "went away" if refused is XenbusState.UNKNOWN else f"went {_NAMES[refused]}"
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"backend {self.device.backend_path} {gone} instead of reaching "
                f"{_NAMES[awaited]}")
        return XenbusState.parse(value)

    # -- closing ---------------------------------------------------------------

    def close(self, timeout: float | None = None, *, handshake: bool = True) -> None:
        """Close the frontend as a Linux guest's driver does, then release
        everything: switch to Closing, wait for the backend to close (its
        Closing, or Closed), switch to Closed and wait for its Closed.  The
        pages shared and the ports bound are released, the device removed
        if :meth:`add` added it, and the guest's handles closed.

        ``timeout`` (default: the frontend's) bounds the handshake as a
        whole: a backend that does not answer within it gets Closed all
        the same, everything is released, and then :class:`TimeoutError`
        says so.  With no backend that ever took the device up (still
        Initialising), there is nobody to wait for; nor with one that
        failed the device (Closing) before this frontend published
        anything (still Initialising itself): it may watch the frontend no
        more (a failed probe), so only Closed is written.  With ``handshake``
        False nothing is said to the backend, as by a guest whose driver
        died: its pages and ports go, the device stays (for the toolstack
        to remove, or ``host.destroy_domain()``).  Once the domain was
        destroyed (its XenStore connection gone with it) there is nobody
        to tell either: what is left is released, and no error raised.
        Idempotent; interrupted
        (Ctrl-C in a wait), it still releases everything before it raises.
        """
        if self._closed:
            return
        wait = self.timeout if timeout is None else timeout
        check_timeout(wait)
        self._closed = True
        deadline = time.monotonic() + wait
        try:
            late = self._close_handshake(wait, deadline) if handshake else None
        except ConnectionError:
            # The guest's connection goes with its domain: a destroyed
            # domain's frontend has nobody to close with, as a dying one's
            # whose device is gone (see _close_handshake).
            self._release(remove=handshake, deadline=time.monotonic())
            try:
                gone = not self._domain_exists()
            except Exception:  # XenStore itself gone: the first error says it
                gone = False
            if not gone:
                raise
            return
        except BaseException:
            # Interrupted, or another failure (XenStore's error, a backend
            # state that is garbage; a lost connection is the clause above):
            # what we hold goes all the same, and the device without a
            # further wait.
            self._release(remove=handshake, deadline=time.monotonic())
            raise
        failure = self._release(remove=handshake, deadline=deadline)
        if late is not None:
            raise TimeoutError(late)
        if failure is not None:
            raise failure

    def _close_handshake(self, wait: float, deadline: float) -> str | None:
        """The closing states; what went wrong if the backend was late."""
        ours = self.xenstore.read(f"{self.device.frontend_path}/state")
        if ours is None:
            return None  # the device is gone (a dying domain's): nobody to tell
        if self._backend_state() in (XenbusState.UNKNOWN, XenbusState.INITIALISING):
            # No backend took the device up (none runs, say): closing
            # needs no answer, nor does removing the device.
            self._unserved = True
            self._switch_state(XenbusState.CLOSED)
            return None
        if (ours == str(int(XenbusState.INITIALISING))
                and self._backend_state() is XenbusState.CLOSING):
            # The backend failed the device before we published anything
            # (its probe, say: it then watches us no more, as Linux binds
            # no driver to it, and our Closed would get no answer).  We
            # hand nothing back: Closed, and the removal (which such a
            # backend answers at once) ends the device.
            self._switch_state(XenbusState.CLOSED)
            return None
        if ours == str(int(XenbusState.CLOSED)):
            # Closed already (published so): going back to Closing would
            # ask a closed backend to close again.
            if self._await_backend(_CLOSED_OR_GONE, deadline):
                return None
            return self._late(wait)
        self._switch_state(XenbusState.CLOSING)
        on_time = self._await_backend(_CLOSING_OR_GONE, deadline)
        # Closed even when late: the pages and ports are about to go.
        self._switch_state(XenbusState.CLOSED)
        if on_time and self._await_backend(_CLOSED_OR_GONE, deadline):
            return None
        return self._late(wait)

    def _domain_exists(self) -> bool:
        """Whether our domain still has its XenStore home, as dom0 sees it
        (our own connection may be what failed)."""
        path = self.domain.path
        return self.domain.toolstack.transaction(lambda c: c.exists(path.encode()))

    def _late(self, wait: float) -> str:
        return (f"backend {self.device.backend_path} did not close within {wait:g} s "
                f"(it is {self._describe_backend()}); the frontend's pages and ports "
                f"are released anyway")

    def _switch_state(self, state: XenbusState) -> None:
        self.xenstore.write(f"{self.device.frontend_path}/state", int(state))

    def _await_backend(self, states: frozenset[XenbusState], deadline: float) -> bool:
        try:
            self._wait_backend(lambda s: s in states, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    def _release(self, *, remove: bool, deadline: float) -> Exception | None:
        """Close the handles (their pages and ports with them) and remove
        an owned device; every step is tried.  The first failure, each
        one logged."""
        failure: Exception | None = None
        steps: list[tuple[str, Callable[[], object]]] = [
            ("unsharing its pages", self._gntshr.close),
            ("unbinding its ports", self.evtchn.close),
        ]
        if remove and self._owned:
            toolstack = self.domain.toolstack
            if self._unserved:
                steps.append(("removing the device",
                              lambda: toolstack.destroy_device(self.device)))
            else:
                steps.append(("removing the device", lambda: toolstack.remove_device(
                    self.device, timeout=max(0.0, deadline - time.monotonic()))))
        steps.append(("closing its XenStore connection", self.xenstore.close))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                logger.warning("frontend of %s: %s: %s", self.device.frontend_path, what, exc)
                failure = failure or exc
        return failure

    def _describe_backend(self) -> str:
        """The backend's state for an error message, whatever it is."""
        try:
            value = self.xenstore.read(f"{self.device.backend_path}/state")
        except OSError as exc:
            return f"unreadable: {exc}"
        if value is None:
            return "gone"
        try:
            return _NAMES[XenbusState.parse(value)]
        except ValueError:
            return f"in no state: {value[:32]!r}"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the frontend of {self.device.frontend_path} is closed")

    def __repr__(self) -> str:
        how = "closed" if self._closed else "open"
        return f"<FrontendDevice {self.device.frontend_path} {how}>"
