"""The xenbus backend state machine: what ``drivers/xen/xenbus`` does for a
kernel backend, for a backend written in Python.

A driver subclasses :class:`BackendDriver`, names its ``device_type`` and
overrides up to four methods (and :meth:`BackendDriver.frontend_changed`,
only to extend it); the base class does the rest of the xenbus protocol
(section 2 of the protocol reference), item by item:

* one driver of a type per domain on a host: start() takes the domain's
  ``xenback-<type>`` :class:`~xenback.hostlock.HostLock` before anything
  else, and stop() lets go of it once every device is gone; a second
  driver, in this process or another, is refused with
  :class:`~xenback.hostlock.HostLockHeld` (it would watch the same
  directory and fight over every device);
* discovery: a watch on ``/local/domain/<self>/backend/<type>``; a device
  ``backend/<type>/<frontend-id>/<devid>`` is probed only when its backend
  ``state`` is Initialising (1), except at start: a device found then in
  another state is an earlier backend's (stopped, or killed), and is taken
  over (see ``_take_over``), but for one Closed with ``online`` = 0: a
  removal it answered, left for the toolstack to delete.  libxl deletes
  that directory itself with its last device (it prunes the parents a
  removal leaves empty) and re-creates it for the next one: the watch
  outlives the node and fires again, as XenStore's watches do, so
  nothing is re-armed;
* probe: ``frontend`` and ``frontend-id`` are read and the frontend path
  must exist, then :meth:`BackendDriver.probe` writes the feature nodes and
  the base switches to InitWait and watches the frontend's ``state`` (if
  the toolstack deleted the directory and made it again while probe()
  ran, the features went with the old one: the device is dropped, and the
  new one probed; so is it if probe() then failed, the failure only
  logged: its error node and Closing would greet the new device.  A
  probe() that writes no node leaves nothing to tell the two apart, and
  one of its nodes changed by another writer looks like a re-creation:
  see ``BackendDevice._ours`` for both);
* frontend Initialising -> InitWait again if we were not in InitWait
  (reconnect after Closed, or a frontend that restarted without closing:
  disconnect first), or dropped if a removal is under way;
  Initialised or Connected -> :meth:`BackendDriver.connect`, then Connected;
  Closing -> :meth:`BackendDriver.disconnect`, Closing; Closed -> disconnect,
  Closed, and the device is dropped if ``online`` is 0; Unknown (the
  frontend's directory vanished) -> Closed and dropped; any other state is a
  fatal error;
* removal by the toolstack (``online`` = 0, backend ``state`` = Closing): the
  device is dropped once the frontend is closed or was never connected;
  one removed before we probed it is switched to Closed at once, and so
  is one whose probe failed (it watches no frontend, whose Closed it
  would wait for in vain), whether the removal came before or after;
  a deleted backend directory drops the device without writing anything;
* ``@releaseDomain``: the devices of a frontend domain that no longer exists
  are disconnected and dropped at once, releasing its grants and ports;
* the error node of a device the toolstack deleted is deleted too, and
  so is one found where a new device is about to be probed: the deletion
  was seen only once the toolstack had made the new one (see
  ``_forget_error``);
* state, and every other node of ours, the error node too, is written in
  a transaction that checks the device directory is still this device's
  (there, and not made again by the toolstack for a new device at the
  same path: see ``BackendDevice._ours``), retried on EAGAIN; a state
  is skipped when the node already holds it.  A device that was dropped
  writes nothing more (a driver's thread may still hold it while a new
  device is served at its path);
* failures (:meth:`BackendDevice.fatal`, or an exception from a driver
  method): ``error/<backend-path>/error`` = ``"<errno> <message>"`` under
  our domain's home, and the device goes Closing (``xenbus_dev_fatal``),
  both in one transaction: the error path is shared with a new device
  the toolstack makes at the same path, which must not inherit the error
  node of a failure whose Closing its re-creation kept out.  Should that
  transaction fail, what can be written still is, alone: the error node
  when the write of our ``state`` is refused (checked as ever: never into a new
  device's directory), Closing when anything else is (the error node);
  each refusal said as a warning (see :meth:`BackendDevice.fatal`).
  An exception's errno is its own for an :class:`OSError` that has one
  (the message then ends with its ``filename``: the node that was missing,
  say), EINVAL for a :class:`ValueError` or :class:`TypeError`, EIO for
  anything else, an OSError without an errno included.
  One met once the device directory is no longer the device's (deleted,
  or deleted and made again for a new device) is the old device's: only
  logged, as information, and the device dropped (see ``_fatal_or_drop``;
  a driver's own :meth:`BackendDevice.fatal` then writes nothing and logs
  it as information too, and returns False; so it does, the device
  dropped next, for one met on a node of ours taken, as below);
* so does a bug in what a driver sets going for a device, to run later:
  an exception escaping a call queued with :meth:`BackendDevice.queue`,
  the callback of a port bound with :meth:`BackendDevice.bind_evtchn` or
  a :class:`DeviceWork` fails the device as one escaping connect() does,
  rather than leave it Connected to a frontend that would wait for ever:
  disconnect(), the device's grants and ports released, the error node
  naming what failed, and Closing.  Its traceback is logged, through
  the device's rate limit (the guest may set it off again and again).
  Failing runs on the device's queue: a failure on another thread is
  handed over to it, and until the first has failed the device, those
  after it are only logged, as is one met once the device is no longer
  connected (the frontend closed it or started over: a Closing then
  would outlive its Closed, or fail its next connection).  The frontend
  may then start again (Initialising) and connect, as after any fatal
  error;
* a node of our own directory that we may no longer read (the
  toolstack took it, set_perms on our ``state`` say, while our domain and
  home live): the device is dropped (disconnect, remove, grants and ports
  released), nothing written there, the error node included, and said
  once as a warning, however it is met (a failure met so, a driver's
  :meth:`BackendDevice.fatal` or :meth:`BackendDevice.error` included, is
  only logged, as information, naming the node); whose the directory
  is, only the state could tell (see ``BackendDriver._refused``).  A
  state we may write but not read is one we may not read: every switch,
  report and write of ours into our directory reads it first (but the
  nodes written before our first switch, probe()'s: its switch to
  InitWait reads it next), as Linux's switches do (theirs then give up
  without a word), and the toolstack's Initialising
  there is no device for us, as for Linux's probe.  A device whose
  ``online`` we may no longer read is dropped so too, once we read it at
  the frontend's Closed (or at our Closing, with no frontend left to
  close): Linux reads that failure as offline, and unregisters the
  device.  At the path, only a new device (Initialising, readable, in a
  directory we may read) is served again; the removal of one we do not
  serve is none we can tell if we may not read its ``online``, and one
  whose Closed we may not write is said once as a warning (the
  toolstack then waits its timeout, as it made it).  A state we may
  read but not write fails the device at its next switch, as in Linux:
  error node, no Closing; a Connected refused so undoes the connection
  first, as a failed connect() is (Linux's backends keep it, until a
  frontend that was never told Connected nor Closing moves on);
* our own domain going away (a driver domain destroyed under its
  backend): libxl deletes its home before the domain, and with it goes
  our right to read anything we had there (EACCES where a node was).  A
  request that fails so is not a failure of the device: the backend says
  once that the domain is going, drops every device without writing
  anything (disconnect, release, remove) and serves nothing more; stop()
  still works.  As for the loss of the XenStore connection (which comes
  next), said once too, and only one of the two is said: the first (a
  callback held until the domain is gone learns of its going late); the
  callbacks that fail on either add nothing.

Ordering: every callback for one device runs on that device's
:class:`~xenback._eventqueue.EventQueue`, one at a time, in the order the
events arrived, on a shared workqueue; different devices proceed in
parallel.  Driver methods may block (map grants, talk to XenStore).

Resources: grant mappings and event channels obtained through
:meth:`BackendDevice.map_grant_refs` and :meth:`BackendDevice.bind_evtchn`
are tracked per device (like the kernel's devres) and released after
:meth:`BackendDriver.disconnect` returns, whether or not the driver freed
them, so a backend cannot leak them on a path it did not think of.
"""

from __future__ import annotations

import enum
import errno
import functools
import itertools
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from workqueue import (
    WQ_MEM_RECLAIM,
    WQ_UNBOUND,
    Work,
    Workqueue,
    alloc_workqueue,
    current_work,
    current_workqueue,
    wait_slice,
)
from xenback._eventqueue import EventQueue, check_callback
from xenback._flags import XENSTORE_DOMID_MAX, check_flag, is_int
from xenback.events import EventDispatcher, PortCallback
from xenback.hostlock import HostLock
from xenback.platform import check_grant_refs, check_platform
from xenback.ratelimit import RateLimit
from xenback.xenstore import Transaction, Watch, XenStore

if TYPE_CHECKING:
    from xenback.platform import GrantMapping, GrantTable, Platform

logger = logging.getLogger(__name__)

__all__ = ["BackendDevice", "BackendDriver", "DeviceWork", "XenbusState"]


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` of ``xen/io/xenbus.h``."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @classmethod
    def parse(cls, value: str | None) -> XenbusState:
        """A ``state`` node's value; a missing node reads as UNKNOWN (as
        ``xenbus_read_driver_state`` does).  Raises :class:`ValueError` for
        anything that is not one of the states."""
        if value is None:
            return cls.UNKNOWN
        text = value.strip()
        if text.isascii() and text.isdigit() and int(text) in cls._value2member_map_:
            return cls(int(text))
        raise ValueError(f"invalid xenbus state {ascii(value[:32])}")


#: What a device type may be made of: one XenStore path component.
_DEVICE_TYPE = re.compile("[A-Za-z0-9_-]+")

_INITIALISING = str(int(XenbusState.INITIALISING))
_CLOSING = str(int(XenbusState.CLOSING))
_CLOSED = str(int(XenbusState.CLOSED))

# Why a device directory is no longer its device's (BackendDevice._stale),
# as the line logging a failure not reported there says it.
_DELETED = "the device directory was deleted"
_REMOVED = "the device was removed"
_MADE_AGAIN = "the device directory was made again for a new device"
_PROBE_NODES_CHANGED = ("a node probe() wrote holds another value (the device directory "
                        "made again for a new device, or the node rewritten by another writer)")
_FRONTEND_APPEARED = ("the look at the frontend no longer fails (the frontend appeared since, "
                      "or the device directory was made again for a new device)")
_FRONTEND_CHANGED = ("the look at the frontend fails otherwise now (its nodes changed since, "
                     "or the device directory was made again for a new device)")

#: How many junk directories (not ``<domid>/<devid>``) a driver remembers
#: having reported.  dom0 has no XenStore quota, so a broken toolstack can
#: make any number: past this many, they are reported at a bounded rate.
_MAX_JUNK = 256


def _number(text: str) -> int:
    """A domid or devid path component; -1 (no device) if it is not one.

    Only the canonical spelling is one: ``01`` read as 1 would make the
    device at ``01/0`` be served at ``1/0``, a directory that does not exist.
    """
    if text.isascii() and text.isdigit() and str(int(text)) == text:
        return int(text)
    return -1


def _printable(c: str) -> str:
    """The character ``c``, backslash-escaped unless it is printable ASCII.

    An error message may quote what a frontend wrote, and that may be
    anything; but the error node can only hold printable ASCII (see
    xenback.xenstore), and a reported error must not itself fail.
    """
    return c if c.isascii() and c.isprintable() else ascii(c)[1:-1]


#: The longest error line of a device, ``"<errno> <message>"``: what its
#: error node holds (XenStore takes 4096 bytes a value at most), and what
#: its log lines quote of the message.
_ERROR_LINE_MAX = 1024


def _error_message(err: int, message: str) -> str:
    """``message`` escaped (see _printable) and cut to what the error line
    of ``err`` (positive) leaves room for: both the error node and the log
    quote it so, and a driver's message may quote whatever the frontend
    wrote, megabytes of it.  Cut before escaping too: an escape is never
    shorter than its character, and the work stays bounded.  Cut after
    escaping before the first escape that does not fit whole: half of
    one (a backslash, ``\\u20``) would read as text the message never
    held."""
    room = _ERROR_LINE_MAX - len(f"{err} ")
    message = message[:room]
    if message.isascii() and message.isprintable():
        return message
    escaped: list[str] = []
    for piece in map(_printable, message):
        room -= len(piece)
        if room < 0:
            break
        escaped.append(piece)
    return "".join(escaped)


def _check_error(err: int, message: str) -> None:
    """Name a wrong argument of error()/fatal(), a driver's error path."""
    if isinstance(err, bool) or not isinstance(err, int):
        raise TypeError(f"error number must be an int, not {type(err).__name__}")
    if not isinstance(message, str):
        raise TypeError(f"error message must be a str, not {type(message).__name__}")


_U32_MAX = 0xFFFF_FFFF

_T = TypeVar("_T")


class _MissingNode(FileNotFoundError, ValueError):
    """A frontend node that read_otherend_u32() needs is not there: ENOENT
    for the error node (an OSError comes first in _errno_of), and a
    ValueError still, as it was before it said ENOENT, so that a driver
    that catches ValueError around the read still catches it (as
    io.UnsupportedOperation is both an OSError and a ValueError)."""


class _Stopped(RuntimeError):
    """The driver's dispatcher or grant handle, asked for once stop()
    closed them, or when there was none to close (see
    BackendDriver._handles_closed): a device's map or bind then raises
    ENODEV, as for the drop that stop() made."""


def _name(fn: Callable[..., object]) -> str:
    """What the error node calls a driver's function that failed.  Never
    its repr(): that would show the guest an address of ours."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _find_otherend(store: Transaction | XenStore, dev: BackendDevice) -> str:
    """The frontend's directory, as our ``frontend`` and ``frontend-id``
    name it: what must hold before probe().  Raises what the probe
    reports if it does not."""
    otherend = store.read(f"{dev.nodename}/frontend")
    otherend_id = store.read_int(f"{dev.nodename}/frontend-id")
    if otherend is None or otherend_id is None:
        raise FileNotFoundError(errno.ENOENT, "reading other end details", dev.nodename)
    if not otherend.startswith("/") or otherend_id != dev.frontend_id:
        raise ValueError(f"frontend {otherend!r} (id {otherend_id}) does not match {dev.nodename}")
    if not store.exists(otherend):
        raise FileNotFoundError(errno.ENOENT, "frontend does not exist", otherend)
    return otherend


def _how_lookup_fails(store: Transaction | XenStore, dev: BackendDevice) -> tuple[int, str] | None:
    """How :func:`_find_otherend` fails now, as (errno, message); None if
    it does not.  XenStore's errors that are no answer of the look's are
    raised: EAGAIN (a request inside a transaction may meet it, and the
    transaction is then run anew), those of a lost connection, and those
    of our domain going (the EACCES where our ``frontend`` was, our home
    deleted between the look's reads: see BackendDriver._lost_domain),
    as every other read that decides whose our directory is raises them,
    for the callback's handler, which says the cause once.  Taken for a
    look failing otherwise, any of them would drop a device that was
    never made again, said as made again (a lost domain's device so
    dropped by the look rather than with the others); an EAGAIN or a
    lost connection would also have the drop's own look, failing alike
    once more, write Closed over a failure never reported."""
    try:
        _find_otherend(store, dev)
    except Exception as exc:
        if isinstance(exc, OSError) and (
                exc.errno == errno.EAGAIN or dev.driver._connection_gone(exc)
                or dev.driver._lost_domain(exc)):
            raise
        return _errno_of(exc)
    return None


def _errno_of(exc: BaseException) -> tuple[int, str]:
    """Map a driver's exception to ``xenbus_dev_fatal``'s (errno, message)."""
    if isinstance(exc, OSError) and exc.errno:
        text = exc.strerror or str(exc)
        if exc.filename:
            text = f"{text}: {exc.filename}"
        return exc.errno, text
    if isinstance(exc, ValueError | TypeError):
        return errno.EINVAL, str(exc) or type(exc).__name__
    return errno.EIO, f"{type(exc).__name__}: {exc}"


class _PortState(enum.Enum):
    """Where a device's port stands (see BackendDevice._unbind)."""

    BOUND = enum.auto()  # the device's: notify() sends on it
    UNBINDING = enum.auto()  # a call is unbinding it
    LEFT = enum.auto()  # that call was cut short: the next finishes it


class _Port:
    """A port a device bound: the dispatcher that bound it, the callback
    it was bound with, which tells it from the number bound since by
    another (see EventDispatcher.unbind), and where its unbind stands."""

    __slots__ = ("events", "callback", "state")

    def __init__(self, events: EventDispatcher, callback: PortCallback) -> None:
        self.events = events
        self.callback = callback
        # Set under the device's _lock, but to LEFT without it, by the
        # call cut short (a plain attribute: a caller that reads it
        # UNBINDING a moment late takes the port for another's, and leaves
        # it to the next release; once the device is gone, a release
        # takes it all the same).
        self.state = _PortState.BOUND


class BackendDevice:
    """One backend device (``struct xenbus_device``).

    Created by the driver on discovery; a driver reads the frontend's nodes
    with :meth:`read_otherend`, writes its own with :meth:`write` /
    :meth:`write_nodes`, and keeps its per-device state in
    :attr:`driver_data`.

    Attributes (read-only but for ``driver_data``): ``frontend_id`` and
    ``devid``; ``nodename``, our directory
    (``/local/domain/<self>/backend/<type>/<frontend_id>/<devid>``);
    ``otherend``, the frontend's directory (set before :meth:`BackendDriver.probe`);
    ``state`` and ``frontend_state``, the two ``XenbusState`` values as
    last written or seen; ``driver_data``, free for the driver (None until
    it sets it); ``driver`` and ``device_type``; ``ratelimit``, the
    :class:`~xenback.ratelimit.RateLimit` for lines the guest can cause.

    Once the driver is stopped, what needs its XenStore connection
    (:meth:`read`, :meth:`write`, :meth:`switch_state`, :meth:`error`,
    :meth:`fatal`) raises :class:`RuntimeError` saying the driver is not
    started, rather than the ENODEV or False a removed device gives while
    the driver runs; :meth:`map_grant_refs` and :meth:`bind_evtchn` still
    raise ENODEV, :meth:`unbind_evtchn` raises KeyError (the device holds
    no port any more), :meth:`notify` sends nothing and :meth:`queue`
    returns False.
    """

    def __init__(self, driver: BackendDriver, frontend_id: int, devid: int) -> None:
        self.driver = driver
        self.device_type = driver.device_type
        self.frontend_id = frontend_id
        self.devid = devid
        #: Absolute backend path, ``/local/domain/<self>/backend/<type>/<fe>/<devid>``.
        self.nodename = f"{driver.backend_root}/{frontend_id}/{devid}"
        #: Absolute frontend path (set by probe from the ``frontend`` node).
        self.otherend = ""
        #: Our state as last written or read back from our ``state`` node.
        self.state = XenbusState.INITIALISING
        #: The frontend's state as last seen.
        self.frontend_state = XenbusState.UNKNOWN
        #: Free for the driver.
        self.driver_data: Any = None
        #: What the frontend can make the device log (:meth:`error`, and
        #: the driver's lines about what the guest did): a guest that fails
        #: the device, restarts it (Initialising) and fails it again, as
        #: fast as XenStore lets it, would otherwise put a line in the
        #: host's log each time.  One per device, not per connection, so
        #: that restarting does not renew the budget.  Named after the
        #: guest, as the lines that count what it suppressed say.
        self.ratelimit = RateLimit(
            f"dom{frontend_id}" if devid == 0 else f"dom{frontend_id} device {devid}")
        #: The device's ordered queue: every xenbus callback of this device
        #: runs on it, one at a time (see :meth:`queue`).
        self.events = EventQueue(driver.workqueue, f"{self.device_type}-{frontend_id}-{devid}",
                                 handled=driver._callback_failed)
        # Everything below is only touched from this device's event queue,
        # except _gone and the resources, guarded by _lock (drivers may map
        # and bind from their own work items too); _otherend_pending and
        # _failing, also set by other threads (the watch thread, the
        # driver's) under _lock; and what a driver's own thread reaches
        # through write_nodes(), switch_state(), error() and fatal():
        # _closing_ours under _switch_lock (see there), and _switched,
        # _probe_nodes, _lookup_failure, _fatal_calls and _refusal with no
        # lock (see write_nodes() and _stale() for _probe_nodes).
        # Invariant: once _gone is set, nothing more can be tracked, and
        # what was is released next (see BackendDriver._drop).
        self._otherend_watch: Watch | None = None
        # probe() was called (remove() undoes it), as _connected for connect().
        self._probed = False
        self._connected = False
        self._gone = False
        # Set once we have switched state in our directory.  From then on a
        # state of Initialising there means the toolstack deleted it and
        # made a new device at the same path (only the toolstack writes
        # Initialising, and only into a new directory): not ours any more.
        self._switched = False
        # The Closing in our directory, if any, is ours: the last state we
        # wrote was Closing (or an earlier backend left it, see
        # _take_over).  Not self.state, which _backend_changed sets to a
        # Closing it reads back, the toolstack's removal as well (see
        # _switch).  Set before the commit: one cut short by a Ctrl-C may
        # have gone all the same (as it returned), and its Closing is
        # taken as ours; one that raised an error did not go, and leaves
        # it as it was.  Cleared by a later switch to another state, after
        # its transaction wrote it or found it there, and by a read-back
        # of another state (after one cut short as it committed that).
        self._closing_ours = False
        # Rule: held by each switch of this device (_switch) from the start
        # of its transaction to its setting of ``state`` and _closing_ours,
        # and by each read-back of our state (_backend_changed) from its
        # read to its setting of ``state``, so that the state set last is
        # the last commit's: fatal() on a driver's thread races the queue's
        # switches, two transactions commit in either order when one only
        # reads (a switch to the state XenStore holds), and the toolstack's
        # Closing may come between a switch's commit and its setting of
        # the state, read back before it (a read-back after a switch reads
        # what it wrote or later).  Held across XenStore's requests (the
        # router thread answers them, and takes no device's lock) and
        # around nothing that waits for a device's queue or another thread:
        # what a switch meets (see BackendDriver._taken) at most queues a
        # drop.  Held across the transaction's start too, which waits up
        # to TRANSACTION_QUOTA_WAIT while a driver domain's quota of them
        # is full: a read-back waits as long then, on the device's queue,
        # whose next work (a removal's Closed, a switch, connect()'s
        # writes) needs a transaction too, and would wait as long for it.
        # Taken after the start, it would keep its rule all the same, at
        # the price of conflicts: a switch begun before another's commit
        # may read the state that commit replaced (oxenstored's reads are
        # of the store as the transaction began; cxenstored's, as first
        # read), but cannot commit on it: oxenstored fails a transaction,
        # one that only read too, whose lowest path read changed since
        # its start, cxenstored one with a node read changed since, and
        # the attempt again, under the lock, reads the new state.
        self._switch_lock = threading.Lock()
        # What probe() wrote through write_nodes(), from its start until
        # our first switch (None otherwise): until then the state cannot
        # tell our directory from a new device's, and these nodes can
        # (see _ours).
        self._probe_nodes: dict[str, str] | None = None
        # How the look at the frontend before probe() failed, from then
        # until our first switch (None otherwise): what tells our
        # directory from a new device's then (see _ours).
        self._lookup_failure: tuple[int, str] | None = None
        # A frontend state event waits in the queue (see _otherend_event).
        self._otherend_pending = False
        # A failure of the driver's code is about to fail the device, or
        # doing so (see _claim_failure).
        self._failing = False
        # How many times fatal() was called: _connect tells by it that the
        # driver's connect() reported its own failure, whatever became of
        # its Closing (refused, or never tried).  No lock: only compared
        # with an earlier count, and two increments that race and lose one
        # still change it.
        self._fatal_calls = 0
        # The refusal error()/fatal() met reading a node of our own
        # directory (the toolstack took it, see BackendDriver._refused),
        # which then queued the device's drop: set by whichever thread
        # reported, never cleared, read by _fatal_or_drop on the queue,
        # before its look (a failure met after such a report is its
        # sequel, not said again) and after its own fatal().  No lock: a
        # plain attribute, and the value read may be another thread's
        # report's, set since the look; the device is dropped then all
        # the same (that report queued it), so _fatal_or_drop drops it as
        # a taking either way.
        self._refusal: PermissionError | None = None
        self._lock = threading.Lock()
        # Listed until their unmap has succeeded: one cut short, or
        # refused (ENOMEM, which Linux says may be tried again), is tried
        # again by the next unmap() or release.
        self._mappings: list[GrantMapping] = []
        # Those of _mappings whose refused unmap a release has said: said
        # once, however many releases it fails (under _lock).
        self._unmap_said: list[GrantMapping] = []
        # The ports bound, by number, until the dispatcher's unbind of one
        # has returned or raised: one whose unbind a Ctrl-C cut short,
        # before or inside it, is finished by the next unbind_evtchn() of
        # the port or release_resources() (see _unbind).
        self._ports: dict[int, _Port] = {}
        # BackendDriver._forget is releasing what the device holds and
        # saying it removed, from its look at devices() until it has taken
        # it off: set under the driver's _lock, and cleared without it by
        # the call that set it.
        self._forgetting = False

    def __repr__(self) -> str:
        return f"<BackendDevice {self.nodename} {self.state.name}>"

    @property
    def platform(self) -> Platform:
        """The driver's platform."""
        return self.driver.platform

    @property
    def xenstore(self) -> XenStore:
        """The driver's XenStore connection."""
        return self.driver.xenstore

    @property
    def gone(self) -> bool:
        """True once the device was dropped (removed or its frontend died)."""
        return self._gone

    # XenStore.

    def read(self, key: str, default: str | None = None) -> str | None:
        """Our own node ``<nodename>/<key>``."""
        return self.xenstore.read(f"{self.nodename}/{key}", default)

    def read_otherend(self, key: str, default: str | None = None) -> str | None:
        """The frontend's node ``<otherend>/<key>`` (hostile: validate it)."""
        return self.xenstore.read(f"{self.otherend}/{key}", default)

    def read_otherend_int(self, key: str, default: int | None = None) -> int | None:
        """``<otherend>/<key>`` as an integer; :class:`ValueError` naming
        the node if the frontend wrote something else."""
        return self.xenstore.read_int(f"{self.otherend}/{key}", default)

    def read_otherend_u32(self, key: str, default: int | None = None) -> int:
        """``<otherend>/<key>`` as a 32-bit unsigned number: a grant
        reference, a port, a page order, as Linux's ``xenbus_scanf(...,
        "%u")`` reads them (leading zeros included).  Stricter than it,
        and than :meth:`read_otherend_int`: ASCII decimal digits and nothing
        else, for ``int()`` alone would also take a sign, white space,
        underscores and other scripts' digits, and so turn a guest's garbage
        into a grant or a port; a frontend writing them is broken, and is
        better told so than half understood.

        A value that is not such a number is a :class:`ValueError` naming
        the node's path and quoting the value; a missing node is
        ``default``, or else :class:`FileNotFoundError` (ENOENT) naming the
        path, which is a :class:`ValueError` too.  Raised from
        :meth:`BackendDriver.connect`, they fail the device with that
        errno, and the error node says
        ``22 connecting: frontend node <path> is not a decimal number:
        '<value>'`` or ``2 connecting: frontend node is missing: <path>``.
        A ``default`` that is no such number (the driver's bug) is a
        :class:`TypeError` or :class:`ValueError`, before anything is read."""
        if default is not None:
            if isinstance(default, bool) or not isinstance(default, int):
                raise TypeError(f"default must be an int, not {type(default).__name__}")
            if not 0 <= default <= _U32_MAX:
                raise ValueError(f"default must be a 32-bit unsigned integer, not {default}")
        path = f"{self.otherend}/{key}"
        text = self.xenstore.read(path)
        if text is None:
            if default is None:
                # Not EINVAL: nothing is wrong with a value that is not
                # there, and the frontend may only not have written it yet.
                raise _MissingNode(errno.ENOENT, "frontend node is missing", path)
            return default
        if not (text.isascii() and text.isdigit()):
            # ascii(), and a prefix: the value is the guest's, and may be
            # anything up to XenStore's 4096 bytes.
            raise ValueError(f"frontend node {path} is not a decimal number: "
                             f"{ascii(text[:32])}")
        # Length first: int() refuses more digits than sys.get_int_max_str_digits().
        digits = text.lstrip("0") or "0"
        if len(digits) > 10 or int(digits) > _U32_MAX:
            raise ValueError(f"frontend node {path} is out of range: {text[:32]}")
        return int(digits)

    def write(self, key: str, value: str | int) -> None:
        """Write ``<nodename>/<key>``; see :meth:`write_nodes`."""
        self.write_nodes({key: value})

    def write_nodes(self, nodes: Mapping[str, str | int]) -> None:
        """Write several of our nodes in one transaction.  Raises
        :class:`FileNotFoundError` if the device directory was deleted
        (nothing is written then: a write would re-create it), and
        otherwise :class:`OSError` ENODEV once the device was removed (a
        new device may be served at its path by then)."""

        def tx(t: Transaction) -> None:
            if not self._ours(t):
                if self._gone and t.read(self.nodename) is not None:
                    raise self._removed()
                raise FileNotFoundError(errno.ENOENT, "device directory was deleted", self.nodename)
            for key, value in nodes.items():
                t.write(f"{self.nodename}/{key}", value)

        self.xenstore.transaction(tx)
        # Read once: a driver's own work item may write while probe() ends.
        probing = self._probe_nodes
        if probing is not None:
            probing.update((key, str(value)) for key, value in nodes.items())

    def switch_state(self, state: XenbusState) -> bool:
        """``xenbus_switch_state``: write our ``state`` unless it already
        holds ``state``, the device directory is gone (or is a new
        device's, made again at our path) or the device was removed.
        True if written.  XenStore's errors are raised: :class:`PermissionError`
        where the toolstack took our ``state`` from us or left it to us to
        read only (see the module docstring).

        Once the toolstack asked for removal (``online`` = 0 and Closing in
        our directory), nothing but Closed replaces Closing: a probe or a
        connect under way when libxl wrote it would overwrite it, and libxl
        would wait its 10 s for a Closed that never comes.  Our state is
        then Closing, and False is returned."""
        return bool(self._switch(state))

    def _switch_after_probe(self) -> bool:
        """Switch to InitWait after probe(), in the directory probe() wrote
        its features into.  False if that directory is gone: deleted, or
        deleted and made again by the toolstack (a new device, to be
        probed anew) while probe() ran (see _ours)."""
        return self._switch(XenbusState.INIT_WAIT) is not None

    def _switch(self, state: XenbusState, *, error: str | None = None,
                why: list[str] | None = None) -> bool | None:
        """:meth:`switch_state`; None if the device directory is gone or
        is a new device's (see _ours): nothing is written then, and
        ``why`` (if given) is told why (see _stale).  With ``error``, the
        line of :meth:`fatal`, the error node is written in the same
        transaction, before the state and whether or not the state is
        written: both are the device's or neither is, and a gone
        directory leaves ``state`` as it was too."""
        state = XenbusState(state)
        value = str(int(state))
        removing = False
        stale: str | None = None

        def tx(t: Transaction) -> bool | None:
            nonlocal removing, stale
            removing, stale = False, None
            # As before the first attempt (``ours``, read under the lock
            # below): one that conflicted did not commit its Closing, and
            # a Closing found there now is another's.
            self._closing_ours = ours
            reason = self._stale(t)
            if reason is not None:
                # A directory deleted for good keeps no state to set.
                if error is not None or reason != _DELETED:
                    stale = reason
                return None
            if error is not None:
                t.write(self.error_path, error)
            current = t.read(f"{self.nodename}/state")
            if current == value:
                return False
            if current == _CLOSING and state != XenbusState.CLOSED:
                try:
                    removing = t.read(f"{self.nodename}/online") == "0"
                except PermissionError as exc:
                    if not self.driver._taken(exc):
                        raise
                    # Taken by the toolstack (see BackendDriver._refused):
                    # whether our Closing was a removal's, nobody can tell,
                    # and that is no removal yet, as at our own Closing
                    # (see _backend_changed); Linux's switches never look.
                    # The frontend's Closed reads it again, and drops us.
                    # But a Closing we did not write (probe() or connect()
                    # ran as it came, or it was read back, see _closing_ours)
                    # is the toolstack's, and it writes one only to remove
                    # (with online=0).
                    removing = not self._closing_ours
                if removing:
                    return False
            if state == XenbusState.CLOSING:
                self._closing_ours = True
            t.write(f"{self.nodename}/state", value)
            return True

        with self._switch_lock:
            # The mark as it was before the first attempt (see tx).
            ours = self._closing_ours
            try:
                written = self.xenstore.transaction(tx)
            except Exception:
                # Nothing committed: the transaction was aborted (EAGAIN to
                # the last attempt, a write or commit refused, ENOSPC).  The
                # Closing tx set ours is not there, and a Closing read back
                # later, the toolstack's, must not be taken for it.  (A
                # connection lost as the commit went leaves nothing to tell.)
                self._closing_ours = ours
                raise
            if stale is not None:
                if why is not None:
                    why.append(stale)
                return None
            self.state = XenbusState.CLOSING if removing else state
            # Not only once written: one that finds its state there (done
            # again after a Ctrl-C as its commit returned, say) found our
            # Closing gone as well.
            if written is not None and state != XenbusState.CLOSING and not removing:
                self._closing_ours = False
        if written is not None:
            # From now on the state tells a new device's directory.
            self._switched = True
            self._probe_nodes = None
            self._lookup_failure = None
        if written:
            logger.debug("%s: state -> %s", self.nodename, state.name)
        return written

    def _ours(self, t: Transaction | XenStore) -> bool:
        """Whether our directory, as ``t`` reads it, is still this device's:
        there, and not deleted and made again by the toolstack for a new
        device at the same path (a removal and an add of the same device),
        which is to be probed afresh, with nothing of ours in it.  XenStore
        shows no node's incarnation, so the nodes tell: once we switched,
        a state of Initialising (see _switched); before, Initialising is
        all either one holds, but the new directory lacks what probe()
        wrote (or holds other values there).

        So a node that probe() wrote and that another writer (the
        toolstack, a hotplug script) changes before our first switch looks
        like a re-creation too: the device is dropped, writing nothing,
        and probed again, which writes the node again.  Accepted: the nodes
        a backend writes in its directory are its own, one writer to a
        node (as docs/misc/xenstore-paths in Xen lists them); a second
        writer racing probe() loses to it in one order or the other
        anyway, and the re-probe costs a remove() and a probe(), with no
        stall and nothing for the frontend to see.

        A probe() that writes nothing (the default) leaves nothing to
        tell by: until its switch, a directory made again at the path is
        taken as ours, and the device serves the new one, with whatever
        probe() read of the old.  Left open, as Linux leaves it (its
        xenbus_switch_state() checks only that the state node is there),
        for it is narrow and closing it has a price.  Both the removal and
        the add (same frontend domain, same devid) must happen while
        probe() runs, and libxl refuses to add a device whose directory
        is there and deletes one only once its backend said Closed, which
        we write after that switch, or when it forces the removal (its
        destroy, or its remove after 10 s without Closed): a probe() that
        blocks longer than that, or a forced detach and an attach within
        one probe().  Closing it would cost every device a marker node
        written before probe(), one more transaction and a node the
        toolstack sees.  Node generations cannot stand in for it:
        DIRECTORY_PART's generation (cxenstored, and the simulated
        XenStore) changes with any child added, so a hotplug script's
        nodes would have every device probed twice, and the oxenstored
        of Xen's tree does not implement DIRECTORY_PART.  A driver that
        reads the toolstack's nodes in probe() closes the window for
        itself by writing a node there, as real backends write their
        features.

        Before probe() runs, the look at the frontend (our ``frontend``
        and ``frontend-id``, the frontend's directory) may fail, and
        nothing of ours is written yet either.  The failure itself tells
        then: the directory is taken as ours while that look, made again
        in the transaction that would write the failure, fails the same
        way.  A forced removal and an add between the look and the write
        (libxl makes both directories in one transaction each) make a
        directory whose look succeeds, or fails otherwise: the failure is
        the old device's, logged only, and the new device is probed.
        One that fails the same way is taken as ours, and gets the
        failure its own probe would have written.  Only failing devices
        pay for it (the look again, in the transactions that write the
        failure); the same holds of a directory that was never made
        again but whose frontend appeared in those microseconds (a
        toolstack that writes the backend first): it is probed anew, and
        served.  A guest that makes and deletes its frontend directory
        over and over can have its device probed a few times more (each
        a race it must win again), or left Closed: its own device, nobody
        else's.

        Once we switched, neither can the state tell a new directory
        whose Initialising the toolstack replaced before we looked: its
        removal of the new device (online=0, Closing), asked while our
        queue was busy.  We take the removal for ours and answer it with
        Closed, which is what libxl waits for and what the new device,
        never probed, would get anyway (see BackendDriver._close_unprobed);
        a failure of ours met meanwhile is reported there, and its error
        node goes with the directory.  Harmless, so left.

        Nor can the nodes tell once a new device there switched in turn:
        but we were dropped (gone) before it was made, and so before the
        reads that see it."""
        return self._stale(t) is None

    def _stale(self, t: Transaction | XenStore) -> str | None:
        """Why our directory, as ``t`` reads it, is no longer this
        device's (see :meth:`_ours`), as the line that logs a failure not
        reported there says it; None while it is.  Each says only what
        the nodes show: a look at the frontend that no longer fails as it
        did may as well mean that the frontend appeared meanwhile, in the
        directory we failed in."""
        if t.read(self.nodename) is None:
            return _DELETED
        why: str | None = None
        if self._switched:
            if t.read(f"{self.nodename}/state") == _INITIALISING:
                why = _MADE_AGAIN
        else:
            # A copy: a driver's own work item may write (and add) meanwhile.
            written = dict(self._probe_nodes or {})
            failed = self._lookup_failure
            if not all(t.read(f"{self.nodename}/{key}") == value
                       for key, value in written.items()):
                why = _PROBE_NODES_CHANGED
            elif failed is not None:
                now = _how_lookup_fails(t, self)
                if now is None:
                    why = _FRONTEND_APPEARED
                elif now != failed:
                    why = _FRONTEND_CHANGED
        # After the reads: a new device that switched in turn, which the
        # reads cannot tell from ours, was made after our drop set _gone,
        # so reads that see it are followed by a _gone that is set (see
        # the end of _ours's docstring).
        if self._gone:
            return why or _REMOVED
        return why

    @property
    def error_path(self) -> str:
        """Where :meth:`fatal` writes: ``<home>/error/backend/<type>/<fe>/<devid>/error``."""
        return f"{self.driver.error_root}/{self.frontend_id}/{self.devid}/error"

    def error(self, err: int, message: str) -> bool:
        """``xenbus_dev_error``: log and write the error node.  Whether the
        failure was reported there: False when the device directory is no
        longer this device's, or a node of it is taken (see :meth:`fatal`)."""
        return self._error(err, message)

    def _error(self, err: int, message: str, *, closing: bool = False) -> bool:
        """:meth:`error`, and with ``closing`` :meth:`fatal`: the switch to
        Closing in the same transaction.  Whether the failure was reported
        (see :meth:`fatal` for what is written when that transaction fails)."""
        _check_error(err, message)
        err = abs(err)
        message = _error_message(err, message)
        line = f"{err} {message}"
        why: list[str] = []

        state_path = f"{self.nodename}/state"

        def tx(t: Transaction) -> bool:
            # The error path is a new device's as much as ours: it must not
            # start its life with our failure.  (Nor is an error node of a
            # device deleted for good left behind: nobody would read it.)
            stale = self._stale(t)
            if stale is not None:
                why.append(stale)
                return False
            if not self._switched:
                # A state we may not read is a node taken before our first
                # switch too, though that look reads none: nothing is
                # written then (see _taken_from_us).
                t.read(state_path)
            t.write(self.error_path, line)
            return True

        refused: Exception | None = None  # fatal()'s Closing, our state refused
        try:
            if closing:
                ours = self._switch(XenbusState.CLOSING, error=line, why=why) is not None
            else:
                ours = self.xenstore.transaction(tx)
        except (OSError, ValueError) as exc:
            taken = self._taken_from_us(exc)
            if taken is not None:
                return self._refused_report(err, message, taken)
            # Reporting an error must not raise one: fatal() still has to go
            # Closing.  No traceback: XenStore's error says it all.
            if not (closing and getattr(exc, "filename", None) == state_path):
                # Whose the directory is, nobody can tell: the failure is
                # said as ours.
                self._log_error(err, message)
                self._unwritten(exc)
                if closing:
                    try:
                        self.switch_state(XenbusState.CLOSING)
                    except OSError as again:
                        self._unwritten(again, closing=True)
                return True
            # The write of our state refused (the toolstack left it to us
            # to read only, most likely): the error node alone, in a
            # transaction that checks whose the directory is, as the one
            # that failed would have.
            # The refusal is said once that is known, after the failure.
            refused = exc
            try:
                ours = self.xenstore.transaction(tx)
            except (OSError, ValueError) as again:
                # Taken since (it was only not ours to write): the refused
                # Closing is then the taking's, said by it.
                taken = self._taken_from_us(again)
                if taken is not None:
                    return self._refused_report(err, message, taken)
                self._log_error(err, message)
                self._unwritten(exc, closing=True)
                self._unwritten(again)
                return True
        if not ours:
            self._not_reported(err, message, why[-1])
            if refused is not None:
                # As the failure: a warning naming the path would be
                # counted against the device there now.
                self._unwritten(refused, closing=True, quiet=True)
            return False
        self._log_error(err, message)
        if refused is not None:
            self._unwritten(refused, closing=True)
        return True

    def _taken_from_us(self, exc: BaseException) -> PermissionError | None:
        """After a report's transaction failed with ``exc``: the refusal
        of a read of our own directory or ``state`` (the toolstack took
        it, see BackendDriver._refused), as those reads get it now; None
        if ``exc`` is no EACCES, or is our domain going or the connection
        lost (said once, by themselves), or if both nodes read as ever
        (what was refused was a write: the error node's, or a state left
        to us to read only).  A refused read in the transaction does not
        say which request it was: the reads again do, and only a failing
        report pays for them.  A state we may write but not read is
        taken as well: every write of ours reads it first (see
        BackendDriver._refused)."""
        if not isinstance(exc, PermissionError) or not self.driver._taken(exc):
            return None
        try:
            self.xenstore.read(self.nodename)
            self.xenstore.read(f"{self.nodename}/state")
        except PermissionError as again:
            return again if self.driver._taken(again) else None
        except OSError:
            return None  # whatever it is, the report's own path says it
        return None

    def _refused_report(self, err: int, message: str, taken: PermissionError) -> bool:
        """error() or fatal() met a node of our own taken (``taken``, see
        _taken_from_us): whose the directory is, nobody can tell, and
        nothing is written.  Said once, as the taking is wherever else it
        is met: the failure as one not reported there, naming the node,
        and the refusal as the device is dropped, on its queue, next
        (whichever thread reported; the taking's own event finds it gone).
        Dropped even if the toolstack gives the node back meanwhile: the
        failure reached nobody, and the driver, told False, gave up on
        the device, which its frontend would otherwise wait on for ever.
        False, as for a directory no longer the device's."""
        self._not_reported(err, message, f"{taken.filename} may not be read")
        self._refusal = taken
        self.events.call(self.driver._refused, self, taken)
        return False

    def _unwritten(self, exc: BaseException, *, closing: bool = False,
                   quiet: bool = False) -> None:
        """Say that the error node (or, ``closing``, fatal()'s Closing)
        could not be written: XenStore's error ``exc`` says why, no
        traceback.  Once our domain is going, that is said once, by
        itself; once the connection is gone, the error node's line (or
        the loss's own) has said why nothing more gets written, and the
        Closing's adds nothing.  ``quiet``: for a failure that turned out
        not to be the directory's (see _not_reported), as a debug line."""
        said = quiet or self.driver._said_already(exc)
        if closing:
            said = said or self.driver._connection_gone(exc)
            what = "could not switch to Closing"
        else:
            what = "could not write the error node"
        logger.log(logging.DEBUG if said else logging.WARNING,
                   "%s: " + what + ": %s", self.nodename, exc)

    def _log_error(self, err: int, message: str) -> None:
        # Rate-limited (see ``ratelimit``); the error node is written every
        # time: the frontend must see each failure.
        self.ratelimit.log(logger, logging.ERROR, "%s: error %d: %s", self.nodename, err, message)

    def _not_reported(self, err: int, message: str, why: str) -> None:
        """Log a failure of this device met once its directory is no
        longer its own, ``why`` saying what showed it (see _stale).  As
        information: an error line names the path, and a log watcher
        would count it against the device there now, which did not fail.
        Rate-limited as the error line it stands for (a driver may meet
        the failure again and again until the device is dropped).
        ``message`` is escaped and cut already (``_error_message``): it
        may quote what the frontend wrote."""
        self.ratelimit.log(logger, logging.INFO, "%s: %s (errno %d), and %s: not reported there",
                           self.nodename, message, err, why)

    def fatal(self, err: int, message: str) -> bool:
        """``xenbus_dev_fatal``: :meth:`error` and the switch to Closing,
        both in one transaction.  Whether the failure was reported: False,
        with nothing written and the failure logged only as information,
        when the device directory is no longer this device's (deleted, or
        deleted and made again by the toolstack for a new device at the
        same path, as the module docstring says).  The failure is then the
        old device's, and the path's error node, state and log lines are
        the new one's.  Linux's xenbus_dev_fatal() logs at error level
        whatever became of the directory and writes the error node outside
        any transaction, which makes it again under a deleted device's
        error path; only its switch to Closing, finding no state node,
        writes nothing.  Here nothing of the old device reaches the new
        one: the error path is shared by the two, and a re-creation
        between a write of the error node and one of Closing would have
        kept out only the Closing.  A frontend sees both at once, so the
        error node no later than Closing, as Linux writes them.  A driver
        told False need not go on with the device: it is dropped next
        (the events of its directory's deletion wait on its queue).

        Should that transaction fail, what can be written still is, each
        in a transaction of its own, as Linux's writes go one by one: the
        frontend must hear of the failure, and the toolstack read it.
        Refused the write of our ``state`` (the toolstack left it to us
        to read only), the error node is written alone, in a transaction that checks whose
        the directory is as the failed one did (so never into a new
        device's), and True returned unless that says the directory is
        no longer ours.  Refused anything else (the error node, most
        likely: our home's ``error`` directory not ours to write, or our
        node quota full), Closing is written alone.  What failed is said
        as a warning, without a traceback, after the failure; the failure,
        whose directory nobody could tell then, is said as this device's.
        (A Closing refused in a directory that the error node's own
        transaction then finds no longer ours is only a debug line, the
        failure itself information: see _not_reported.)

        A state (or directory) we may not even read (the toolstack took
        it, see BackendDriver._refused; one left to us to write only is
        as unreadable) is refused before anything is written: the look at
        the directory reads it, and cannot tell whose it is.  Nothing is
        written, the error node included; the failure is logged as
        information, naming the node, False returned, and the device
        dropped next, on its queue, the taking said once as a warning, as
        wherever else it is met: no error line, nor a warning per write
        refused (one event, one line, as the rest of the module says a
        taking).  It is dropped even if the node is given back before its
        queue gets to it: the failure reached nobody."""
        _check_error(err, message)  # before anything is written
        self._fatal_calls += 1
        return self._error(err, message, closing=True)

    # Grants and event channels, released automatically on disconnect.

    def map_grant_refs(self, refs: Sequence[int], *, writable: bool = True) -> GrantMapping:
        """Map the frontend's grants ``refs`` contiguously (tracked).
        Raises :class:`~xenback.platform.GrantError`, or :class:`OSError`
        ENODEV once the device was removed (nothing stays mapped then);
        :class:`TypeError` for a ``writable`` that is not True or False,
        or ``refs`` that is not a sequence (a str, bytes or a set is not
        one: see :func:`~xenback.platform.check_grant_refs`)."""
        # Checked here too, whatever the platform does: a driver's bug is
        # refused the same way on every platform, its own ones included.
        check_flag("writable", writable)
        refs = check_grant_refs(refs)
        if self._gone:
            raise self._removed()  # before the driver's handle: see _handle
        # Recorded by the call that makes it (list.extend() stores what it
        # returned before control is back in Python code): as ``mapping =
        # map_grant_refs(...)``, a Ctrl-C as the call returned would lose
        # it before the device tracked it, mapped until the handle closed.
        made: list[GrantMapping] = []
        gnttab = self._handle(lambda: self.driver.gnttab)
        try:
            made.extend(map(functools.partial(gnttab.map_grant_refs, writable=writable),
                            (self.frontend_id,), (refs,)))
            with self._lock:
                if not self._gone:
                    # One step, as far as a signal goes (no call in
                    # between): the mapping becomes the device's, no
                    # longer ours to give back.
                    self._mappings += made
                    del made[:]
                    return self._mappings[-1]
        except BaseException as exc:
            for mapping in made:
                self._give_back_mapping(mapping)
            if self._gone and isinstance(exc, Exception):
                # Whatever the map met (the handle closed by stop() since
                # we took it, EBADF), the device is gone.
                raise self._removed() from exc
            raise
        # Dropped meanwhile: ENODEV, whatever the unmap meets.
        self._give_back_mapping(made[0])
        raise self._removed()

    def _give_back_mapping(self, mapping: GrantMapping) -> None:
        """Unmap ``mapping``, which a map made but does not hand over, as
        _give_back() does; but one whose unmap the platform refuses (but
        ENODEV) becomes the device's while it is there, as a release
        leaves one: its next release tries again (forgotten, it stayed
        mapped until the handle closed).  Once the device is gone, it is
        said left to the handle (see _unmap_refused)."""
        try:
            mapping.unmap()
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                # The service is gone, and the mapping with it.
                self._release_failed("%s: unmapping %s failed", mapping, exc)
                return
            with self._lock:
                if not self._gone:  # see map_grant_refs
                    self._mappings.append(mapping)
            self._unmap_refused(mapping, exc)

    def unmap(self, mapping: GrantMapping) -> None:
        """Unmap a mapping made by :meth:`map_grant_refs` before disconnect.
        A mapping the device no longer holds is left alone: a driver's work
        item may get here after disconnect released it (or while it does).
        An unmap the platform refuses raises its error, and the device
        still holds the mapping: the next unmap() or release tries again."""
        with self._lock:
            if mapping not in self._mappings:
                return
        # Listed until the unmap has succeeded, as a release leaves it:
        # taken off first, a Ctrl-C as that was done, or a refusal, lost it
        # to the release, mapped until the handle closed.  A second unmap of
        # it meanwhile, or a release, unmaps it again, which does nothing.
        mapping.unmap()
        self._unmapped(mapping)

    def _unmapped(self, mapping: GrantMapping) -> None:
        """Forget ``mapping``, whose unmap has succeeded."""
        with self._lock:
            if mapping in self._mappings:
                self._mappings.remove(mapping)
            if mapping in self._unmap_said:
                self._unmap_said.remove(mapping)

    def bind_evtchn(self, remote_port: int, callback: PortCallback) -> int:
        """Bind the frontend's ``remote_port`` (tracked); ``callback(port)``
        runs on the dispatcher thread and must only queue work, which must
        take finding nothing to do: after a failure of its own the
        dispatcher runs every callback once more (see
        :mod:`xenback.events`).  Raises
        :class:`~xenback.platform.EventChannelError` (a ``remote_port`` that
        is no unbound port of the frontend's for us, say),
        :class:`OSError` ENODEV once the device was removed, or
        :class:`TypeError` for a ``callback`` that cannot be called.

        An exception escaping ``callback`` fails the device (see the
        module docstring), on its queue, after the callback returned."""
        check_callback(callback)  # now: the dispatcher is given the wrapper below
        if self._gone:
            raise self._removed()  # before the driver's dispatcher: see _handle

        def guarded(port: int) -> None:
            try:
                callback(port)
            except Exception as exc:
                self._hand_over_failure(f"callback of event channel port {port}", exc)

        # Recorded by the call that makes it, taken over in one step: see
        # map_grant_refs.
        bound: list[int] = []
        # Given back to the dispatcher that bound it: stop() may have
        # closed that one since (which unbound the port).
        events = self._handle(lambda: self.driver.events)
        record = _Port(events, guarded)
        try:
            bound.extend(map(events.bind_interdomain, (self.frontend_id,),
                             (remote_port,), (guarded,)))
            with self._lock:
                if not self._gone:
                    port = bound[0]
                    # In place of any record of the number that an
                    # unbind cut short once done left (see _unbind): that
                    # one is over, as the dispatcher gives out no number
                    # it still has bound.
                    self._ports[port] = record
                    del bound[:]
                    return port
        except BaseException as exc:
            for port in bound:
                self._give_back(functools.partial(events.unbind, port),
                                "%s: unbinding port %d failed", port)
            if self._gone and isinstance(exc, Exception):
                raise self._removed() from exc  # the dispatcher closed: see map_grant_refs
            raise
        self._give_back(functools.partial(events.unbind, bound[0]),
                        "%s: unbinding port %d failed", bound[0])  # see map_grant_refs
        raise self._removed()

    def _give_back(self, release: Callable[[], object], msg: str, what: object) -> None:
        """``release()``, giving back what a bind (a map: see
        _give_back_mapping) took but does not hand over (interrupted, or
        the device dropped meanwhile): its failure is logged, not raised
        over the interrupt (a caller's except for that error would
        swallow it) nor in place of ENODEV."""
        try:
            release()
        except KeyError:
            pass  # the dispatcher was closed meanwhile, which unbound the port
        except OSError as exc:
            self._release_failed(msg, what, exc)

    def _removed(self) -> OSError:
        return OSError(errno.ENODEV, "device was removed", self.nodename)

    def _handle(self, get: Callable[[], _T]) -> _T:
        """The driver's dispatcher or grant handle, ``get()``, for a map or
        bind; ENODEV once stop() closed them (see _Stopped): it drops the
        device, and one made for us after would outlive it, a
        dispatcher's thread running for ever."""
        try:
            return get()
        except _Stopped:
            raise self._removed() from None

    def unbind_evtchn(self, port: int) -> None:
        """Unbind a port bound by :meth:`bind_evtchn` before disconnect;
        waits for a running callback of it to return.  :class:`KeyError`
        if this device does not hold ``port`` (any more): the number may
        be another device's port by now, so it is left alone; so it is
        if the dispatcher no longer has it (the driver unbound it there
        itself).  A port taken as stop() closes the dispatcher, which
        unbinds every port, is unbound so: nothing is raised, nor unbound
        on the dispatcher of a start() since.  Called again for a port
        whose unbind a Ctrl-C cut short, it finishes it.  A port it is
        unbinding as the device is dropped, the drop's release unbinds
        too: should the release get to the dispatcher first, this raises
        its KeyError, as for a port released already."""
        if not is_int(port):
            # Before the lookup: 1.0 would find and drop port 1 there, and
            # the dispatcher then refuse it (see EventDispatcher.unbind).
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        self._unbind(int(port))  # on record as a plain int, whatever the subclass

    def _unbind(self, port: int, *, held: bool = True) -> None:
        """Unbind ``port`` on the dispatcher that bound it, with the
        callback it was bound with: should the number be bound again
        since (the unbind finished as a Ctrl-C cut it short, a stop()
        closed the dispatcher), it is left alone.  On record in _ports
        until the dispatcher's unbind has returned or raised: taken off
        before, a Ctrl-C as it started, or inside it, left the port bound
        for good.  UNBINDING while a call is at it, so that a second call
        for the port does not take it for its own: it raises KeyError, as
        for a port the device does not hold (``held``: it returns); one
        cut short leaves it LEFT, and the next call finishes it.  But once
        the device is gone, a release (not ``held``) takes an UNBINDING
        port too: it may be the device's last, and the call at it, cut
        short after, would leave the port bound, known to nobody (handing
        it on to a release then is a step that a second Ctrl-C can cut
        short too).  The dispatcher unbinds it for one of the two; the
        other meets its KeyError.

        Raises the dispatcher's OSError, and its KeyError for a port it
        does not have, but not for one whose unbind was cut short (done
        as it returned), nor once it is closed (which unbinds every
        port: see EventDispatcher.closed)."""
        record: _Port | None = None
        try:
            with self._lock:
                # No call from taking the record to marking it UNBINDING:
                # a Ctrl-C there would have the except below mark a port
                # still BOUND as LEFT, which notify() no longer sends on.
                if port not in self._ports or (
                        self._ports[port].state is _PortState.UNBINDING
                        and (held or not self._gone)):
                    if not held:
                        return
                    raise KeyError(f"event channel port {port} is not bound by {self.nodename}")
                record = self._ports[port]
                again = record.state is not _PortState.BOUND
                record.state = _PortState.UNBINDING
            # Not under _lock: the unbind waits for a running callback of
            # the port.  So stop() may drop the device and close the
            # dispatcher meanwhile (a driver's own thread does not hold it
            # up), as _give_back() knows.
            failure: Exception | None = None
            try:
                record.events.unbind(port, record.callback)
            except Exception as exc:
                failure = exc
            with self._lock:
                if port in self._ports and self._ports[port] is record:
                    del self._ports[port]
        except BaseException:
            if record is not None:
                record.state = _PortState.LEFT  # cut short: left to the next call
            raise
        if failure is None or isinstance(failure, KeyError) and (again or record.events.closed):
            return
        raise failure

    def notify(self, port: int) -> None:
        """Send an event to the frontend on our local ``port``.

        Nothing is sent on a port this device does not hold (any more): a
        driver's work item may get here after disconnect released it, and
        by then the number may be bound to another device's frontend.
        :class:`TypeError` for a ``port`` that is not an int (is_int).
        """
        if type(port) is not int and not is_int(port):  # a plain int spared the call
            # Before the lookup: True and 1.0 find port 1 there, which the
            # handle then refuses; "1" was quietly not sent.
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        # Under _lock: release_resources() and unbind_evtchn() take the
        # port (UNBINDING) under it before unbinding, so it cannot go
        # mid-notify.  (A notify does not block: an ioctl, or a write to a
        # pipe.)
        with self._lock:
            if port in self._ports and self._ports[port].state is _PortState.BOUND:
                self.driver.events.notify(port)
                return
        logger.debug("%s: not notifying port %d, which it does not hold", self.nodename, port)

    @property
    def resources(self) -> tuple[int, int]:
        """(grant mappings, event channel ports) currently held."""
        with self._lock:
            # A port being unbound is still held, until that is over.
            return len(self._mappings), len(self._ports)

    def release_resources(self) -> None:
        """Unbind every tracked port and unmap every tracked mapping.  A
        port's unbind that a Ctrl-C cut short, here or in
        :meth:`unbind_evtchn`, is finished; one under way on another
        thread is left to it while the device is there, and taken over
        once it is gone (see _unbind).  A mapping whose unmap the
        platform refuses (but ENODEV: its service went, and the mapping
        with it) stays held, said once, and is tried again by the next
        release; once the device is gone, said left to the grant handle's
        close.  Cut short itself, it leaves what it did not release to
        the next release."""
        with self._lock:
            ports = list(self._ports)
            mappings = list(self._mappings)
        # Each port and mapping leaves as it goes: all taken off at once, a
        # Ctrl-C lost the rest, held until the handles closed.
        for port in ports:
            try:
                self._unbind(port, held=False)
            except (KeyError, OSError) as exc:
                self._release_failed("%s: unbinding port %d failed", port, exc)
        for mapping in mappings:
            # Listed until the unmap has succeeded: unmap() may be done
            # again, by the next release or a driver's unmap meanwhile.
            try:
                mapping.unmap()
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    self._unmap_refused(mapping, exc)
                    continue
                # The service is gone, and the mapping with it.
                self._release_failed("%s: unmapping %s failed", mapping, exc)
            self._unmapped(mapping)

    def _unmap_refused(self, mapping: GrantMapping, exc: OSError) -> None:
        """Say that an unmap of ``mapping`` by a release (or a give-back)
        was refused (not ENODEV), which stays held for the next: once, not
        at each release it fails again.  Once the device is gone, nothing
        releases it again: said then to be left to the grant handle's
        close, which ends what it still has mapped."""
        # Marked said as it is found unsaid, in one step: marked after
        # saying, two releases at it both said it, and so did the next
        # release after a Ctrl-C in between.  Marked and cut short before
        # the line went out, it is unmarked, for the next to say.
        mark = False  # set before the mark is made: nothing of ours to unmark till then
        said: list[object] = []
        try:
            with self._lock:
                gone = self._gone
                again = not gone and mapping in self._unmap_said
                mark = not gone and not again and mapping in self._mappings
                if mark:
                    self._unmap_said.append(mapping)
            if again:
                logger.debug("%s: unmapping %s failed again: %s", self.nodename, mapping, exc)
                return
            msg = "%s: unmapping %s failed"
            if gone:
                msg += "; it is left to the grant handle's close"
            self._release_failed(msg, mapping, exc, said)
        except BaseException:
            if mark and not said:
                with self._lock:
                    if mapping in self._unmap_said:
                        self._unmap_said.remove(mapping)
            raise

    def _release_failed(self, msg: str, what: object, exc: BaseException,
                        said: list[object] | None = None) -> None:
        """Log a failed release (``msg`` % (nodename, ``what``)); ``said``,
        if given, gets an item by the call that logs it (list.extend() over
        starmap()), for a caller cut short by a Ctrl-C to know whether it was."""
        level, exc_info = logging.WARNING, None
        args: tuple[object, ...] = (what, exc)
        if self.driver._lost_domain(exc):
            # Our domain took it with it: said once already.
            level, msg = logging.DEBUG, msg + ": %s"
        elif isinstance(exc, OSError) and exc.errno == errno.ENODEV:
            # The handle's hypervisor service is gone (the host stopped, or
            # our domain was destroyed), and with it what we held: the
            # error says it all, a traceback would add nothing.
            msg += ": %s"
        else:
            exc_info, args = exc, (what,)
        # Through starmap(), so that extend() stores the call's return as it
        # is made.
        say = functools.partial(logger.log, exc_info=exc_info)
        (said if said is not None else []).extend(
            itertools.starmap(say, ((level, msg, self.nodename, *args),)))

    def queue(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on this device's event queue, ordered with its
        xenbus callbacks.  False once the device is gone;
        :class:`TypeError` for an ``fn`` that cannot be called.

        An exception escaping ``fn`` fails the device there and then (see
        the module docstring)."""
        check_callback(fn)
        return self.events.call(self._call, fn, args)

    def _call(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            what = f"call {_name(fn)}"
            if self._claim_failure(what, exc):
                self._fail(what, exc)

    def _hand_over_failure(self, what: str, exc: Exception) -> None:
        """``exc`` escaped ``what``, the driver's code for this device, on a
        thread other than the device's queue (the dispatcher's, a worker's):
        logged here, and the device failed on its queue, where everything
        about its state is done."""
        if self._claim_failure(what, exc):
            # Refused once the device is gone: there is nothing to fail.
            self.events.call(self._fail, what, exc)

    def _claim_failure(self, what: str, exc: Exception) -> bool:
        """Log ``exc``, escaped from ``what``; whether it is the one to fail
        the device.  From the moment one is, until the device is failed,
        the next ones (the guest notifies again, a Work is queued again,
        another Work of the device fails as disconnect() waits for it)
        are only logged: the first one is the bug, and a second fatal()
        would write over its error."""
        if self.driver._callback_failed(exc):
            return False
        with self._lock:
            failing, self._failing = self._failing, True
        self._log_failure(what, exc, " (the device is failing already)" if failing else "")
        return not failing

    def _fail(self, what: str, exc: Exception) -> None:
        try:
            self.driver._fail(self, what, exc)
        finally:
            with self._lock:
                self._failing = False

    def _log_failure(self, what: str, exc: Exception, context: str = "") -> None:
        """Log ``exc``, escaped from ``what``, with its traceback (``context``
        ends the line).  A driver's bug, but one the guest may set off as
        often as it likes: through the device's rate limit."""
        if self._gone:
            context = " after the device was removed"
        self.ratelimit.log(logger, logging.ERROR, "%s: %s failed%s", self.nodename, what, context,
                           exc_info=exc)


class DeviceWork(Work):
    """A work item of a device: ``DeviceWork(dev, func)`` runs ``func(work)``
    as a :class:`~workqueue.Work` does, on any workqueue, and an exception
    escaping ``func`` fails ``dev`` as one escaping
    :meth:`BackendDriver.connect` does (see the module docstring) instead
    of going only to the log and the workqueue's ``stats().failed``, the
    device left Connected and its frontend waiting for ever.

    Subclass it to carry a device's state, as a Work (``dev`` is the
    device)::

        class Ring(DeviceWork):
            def __init__(self, dev, page):
                super().__init__(dev, Ring.serve)
                self.ring = BackRing(page, SLOT_SIZE)

            def serve(self):
                ...  # BackRing's loop: what escapes here fails self.dev

    As any Work of a connection, it is stopped by the driver's
    :meth:`~BackendDriver.disconnect` (``disable_sync()``), which its own
    failure calls too: the item hands the failure over to the device's
    queue and returns, so that wait ends.
    """

    __slots__ = ("dev",)

    def __init__(self, dev: BackendDevice, func: Callable[[Any], object]) -> None:
        if not callable(func):
            raise TypeError(f"DeviceWork needs a callable, not {type(func).__name__}")
        what = f"work {_name(func)}"

        # Wrapped here rather than told to the workqueue, which knows
        # nothing of devices: the item is what any Work is to it, and keeps
        # func's name where it shows it (repr, dump()).
        @functools.wraps(func)
        def run(work: Any) -> None:
            try:
                func(work)
            except Exception as exc:
                dev._hand_over_failure(what, exc)

        super().__init__(run)
        self.dev = dev


class BackendDriver:
    """Base class of a xenbus backend driver.

    Subclass it, set ``device_type`` and override :meth:`probe`,
    :meth:`connect`, :meth:`disconnect` and :meth:`remove` as needed::

        class ConsoleBackend(BackendDriver):
            device_type = "console"

            def connect(self, dev):
                ...

        with ConsoleBackend(platform) as backend:
            ...

    ``workqueue`` runs the device callbacks; without one, the driver
    allocates an unbound workqueue of its own and destroys it on stop.

    One driver of a ``device_type`` serves a domain at a time, on the
    whole host: from :meth:`start` to the end of :meth:`stop` it holds the
    domain's ``xenback-<type>.dom<domid>.lock`` in the platform's
    ``run_dir``, and another driver's start() raises
    :class:`~xenback.hostlock.HostLockHeld` (a :class:`RuntimeError`
    naming the process that holds it) before it starts anything.  A
    stopped driver may be started again.
    """

    device_type: ClassVar[str] = ""

    def __init__(self, platform: Platform, *, workqueue: Workqueue | None = None) -> None:
        name = self.device_type
        if not isinstance(name, str) or not _DEVICE_TYPE.fullmatch(name):
            # It names our backend directory: refused now, by its name,
            # not at start() as an invalid XenStore path.
            raise TypeError(
                f"{type(self).__name__} must set device_type to a device type name "
                f"(letters, digits, - and _), not {name!r}"
            )
        check_platform(platform)
        if workqueue is not None and not isinstance(workqueue, Workqueue):
            # Taken as it came, it failed only at start(), as a missing attribute.
            raise TypeError(f"workqueue must be a workqueue.Workqueue or None, "
                            f"not {type(workqueue).__name__}")
        self.platform = platform
        self.home = f"/local/domain/{platform.domid}"
        #: ``/local/domain/<self>/backend/<type>``.
        self.backend_root = f"{self.home}/backend/{self.device_type}"
        #: ``/local/domain/<self>/error/backend/<type>``: the error nodes of
        #: our devices (see :attr:`BackendDevice.error_path`).
        self.error_root = f"{self.home}/error/backend/{self.device_type}"
        self._own_workqueue = workqueue is None
        self._workqueue = workqueue
        self._xs: XenStore | None = None
        # Held from start() to the end of stop(), while _xs is set.
        self._host_lock: HostLock | None = None
        self._events: EventDispatcher | None = None
        self._gnttab: GrantTable | None = None
        # Set as _stop() goes to close the two above, until start(): none
        # is made meanwhile (_Stopped), for nobody would close it.  (Those
        # there stay until closed: see _stop.)
        self._handles_closed = False
        # _lock guards _devices (and each device's _forgetting), _stopping,
        # _domain_gone, _xs_lost, _stop_running, _handles_closed and the
        # lazy creation of the event dispatcher and grant table handle.
        self._lock = threading.Lock()
        self._devices: dict[tuple[int, int], BackendDevice] = {}
        self._stopping = False
        # Our own domain is going away (see _lose_domain): nothing more is
        # served, and nothing written.  Set under _lock; read without it
        # where a stale False only costs a request that fails and is taken
        # for the domain's death like any other.  Until the next start().
        self._domain_gone = False
        # XenStore ended our connection (see _xenstore_lost).  With
        # _domain_gone, under _lock, it decides which of the two says the
        # end: the one that comes first.  Until the next start().
        self._xs_lost = False
        # A stop() is under way: another one waits on _stop_done for it to
        # end, then does what it left, if anything (it ended in an
        # exception: Ctrl-C in one of its waits).
        self._stop_running = False
        self._stop_done = threading.Condition(self._lock)
        self._bus: EventQueue | None = None
        # Until the first listing of our backend directory (the watch's
        # first event, on the bus queue, which alone reads and clears it):
        # devices found there in any state are taken over.
        self._first_scan = True
        # The junk directories of our backend directory, as (domid, devid)
        # text, reported once each: every change anywhere under the
        # directory brings discovery past them again.  One is forgotten
        # when it goes, so that it is reported again should it come back,
        # and so that there are never more than exist (and _MAX_JUNK at
        # most).  Only the bus queue touches it.
        self._junk: set[tuple[str, str]] = set()
        self._junk_ratelimit = RateLimit(f"{self.device_type} backend")
        # The devices not served whose removal we could not answer (see
        # _close_unprobed), said once each while their state stays
        # Closing: the toolstack's removal is an event for each node it
        # writes.  Never more than exist; only the bus queue touches it.
        self._unclosed: set[tuple[int, int]] = set()
        self._watches: list[Watch] = []

    # Hooks for subclasses.

    def probe(self, dev: BackendDevice) -> None:
        """Write the feature nodes the frontend reads before connecting.
        Raising makes the device fail (error node, Closing)."""

    def connect(self, dev: BackendDevice) -> None:
        """The frontend is Initialised or Connected: read its ring
        references and event channel, map and bind them.  Raising makes the
        device fail; :meth:`disconnect` is still called to undo the rest.
        So does an exception in what it sets going for later: a port's
        callback, a call queued with :meth:`BackendDevice.queue`, a
        :class:`DeviceWork` (see the module docstring).  A failure it
        reports itself with :meth:`BackendDevice.fatal` before it
        returns, as Linux's backends do, is as final, whatever fatal()
        told and whether or not its Closing could be written: the device
        is not switched to Connected, and :meth:`disconnect` is called."""

    def disconnect(self, dev: BackendDevice) -> None:
        """Undo :meth:`connect` (also after a partial or failed connect, and
        when the frontend's domain died).  Tracked grants and ports are
        released by the framework afterwards."""

    def remove(self, dev: BackendDevice) -> None:
        """The device is going away: free what :meth:`probe` set up (also
        after a probe that raised).  Not called for a device that failed
        before its probe, as Linux binds no driver to it.  Called once, but
        again after one cut short (Ctrl-C as stop() drops the device on
        its own thread): free each thing once, and take finding it freed."""

    def frontend_changed(self, dev: BackendDevice, state: XenbusState) -> None:
        """React to the frontend's new state (the table in the module
        docstring).  Override only to extend it.  Raising makes the device
        fail (error node, Closing)."""
        if state == XenbusState.INITIALISING:
            # From Closed the frontend reconnects; from Connected or Closing
            # it restarted without closing (it crashed, was kexec'd, its
            # driver was reloaded) and will wait for InitWait: what we hold
            # is the old frontend's (pvcalls-back and netback reset too).
            if dev.state != XenbusState.INIT_WAIT:
                logger.info("%s: frontend reinitialising, prepare for reconnect", dev.nodename)
                self._disconnect(dev)
                dev.switch_state(XenbusState.INIT_WAIT)
                if dev.state == XenbusState.CLOSING:
                    # A removal is under way (see switch_state), and a
                    # frontend in Initialising has nothing left to close.
                    self._drop(dev)
        elif state in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            # Closing means a fatal error or a removal is under way: the
            # frontend must start again (Initialising) first.
            if dev.state in (XenbusState.INIT_WAIT, XenbusState.INITIALISED, XenbusState.CLOSED):
                self._connect(dev)
        elif state == XenbusState.CLOSING:
            self._disconnect(dev)
            dev.switch_state(XenbusState.CLOSING)
        elif state == XenbusState.CLOSED:
            self._disconnect(dev)
            dev.switch_state(XenbusState.CLOSED)
            if not self._online(dev):
                self._drop(dev)
        elif state == XenbusState.UNKNOWN:
            self._drop(dev)
        else:
            # As every failure the base meets: the state may be a new
            # device's frontend's, read by the old device (see _fatal_or_drop).
            self._fatal_or_drop(dev, errno.EINVAL, f"saw state {int(state)} at frontend")

    # Lifetime.

    @property
    def workqueue(self) -> Workqueue:
        """The workqueue running the device callbacks: one passed in, from
        the start; the driver's own, only while started."""
        if self._workqueue is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._workqueue

    @property
    def xenstore(self) -> XenStore:
        """The driver's XenStore connection (while started)."""
        if self._xs is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._xs

    @property
    def events(self) -> EventDispatcher:
        """The driver's event dispatcher (created on first use).
        :class:`RuntimeError` once stop() closed it, until start()."""
        with self._lock:
            if self._events is None:
                if self._handles_closed:
                    raise _Stopped(f"{type(self).__name__} is stopped")
                # Handed back through a list, by the dispatcher's last
                # step: a Ctrl-C as the constructor returns would lose it,
                # its thread running, to us and to _stop().
                made: list[EventDispatcher] = []
                try:
                    EventDispatcher(self.platform, name=f"{self.device_type}-events", into=made)
                finally:
                    if made:
                        self._events = made[0]
                return made[0]
            return self._events

    @property
    def gnttab(self) -> GrantTable:
        """The driver's grant table handle (opened on first use).
        :class:`RuntimeError` once stop() closed it, until start()."""
        with self._lock:
            if self._gnttab is None:
                if self._handles_closed:
                    raise _Stopped(f"{type(self).__name__} is stopped")
                self._gnttab = self.platform.gnttab()
            return self._gnttab

    def devices(self) -> list[BackendDevice]:
        """The devices served now (a snapshot)."""
        with self._lock:
            return list(self._devices.values())

    def start(self) -> None:
        """Connect to XenStore and start serving devices.

        Raises :class:`~xenback.hostlock.HostLockHeld` if another driver
        of our ``device_type`` serves our domain, in this process or
        another on the host (it names that process and the lock file), and
        :class:`OSError` naming the lock file if that cannot be made:
        either before anything is started; :class:`RuntimeError` if this
        driver is started already.  Whole or nothing: failing or
        interrupted (Ctrl-C) halfway, it undoes what it had started before
        it raises.
        """
        if self._xs is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        # Everything is recorded as it is made (the lock before it is
        # taken, the XenStore connection before it connects), so that
        # whatever ends start() early, a Ctrl-C landing as any call
        # returns included, finds all of it to undo: a lock or a router
        # thread made but not yet recorded would outlive the driver.
        locks: list[HostLock] = []
        try:
            # First: a second driver would watch our backend directory too
            # and fight over every device, so it must start nothing at all.
            HostLock.for_domain(self.platform, f"xenback-{self.device_type}", into=locks)
            self._host_lock = locks[0]
            if self._own_workqueue:
                self._workqueue = alloc_workqueue(f"xenback-{self.device_type}", WQ_UNBOUND)
            with self._lock:
                self._stopping = False
                self._domain_gone = False
                self._xs_lost = False
                self._handles_closed = False
            self._first_scan = True
            self._junk.clear()  # a new run says what it ignores
            self._unclosed.clear()
            self._bus = EventQueue(self.workqueue, f"{self.device_type}-bus",
                                   handled=self._callback_failed)
            self._xs = XenStore(self.platform.xenstore(), on_lost=self._xenstore_lost)
            self._xs.open()
            # From the first watch on, devices may be found and probed:
            # undoing that is all of _stop().
            self._watches.append(self._xs.watch(self.backend_root, self._backend_watch))
            try:
                self._watches.append(
                    self._xs.watch("@releaseDomain", self._release_domain, events=self._bus)
                )
            except PermissionError:
                # A driver domain may not be allowed to watch it; frontend
                # directories vanishing still tell us, only later.
                logger.warning("cannot watch @releaseDomain: relying on frontend removal")
        except BaseException:
            try:
                self._stop(started=False)
            finally:
                for lock in locks:  # taken, maybe not yet recorded; last, as in _stop()
                    lock.close()
                self._host_lock = None
            raise
        logger.info("%s backend serving %s", self.device_type, self.backend_root)

    def stop(self) -> None:
        """Disconnect every device (writing Closed where its directory
        still exists), call :meth:`remove` for each that was probed, and release all
        threads, handles and watches.  Not from a driver callback, a
        :class:`DeviceWork` of its devices, the callback of a port on
        its dispatcher, or a work item on the driver's workqueue when
        stop() would wait for items queued behind it: any item of the
        workqueue the driver made itself (none was passed in: stop()
        destroys it, which waits for all its items), and any item of a
        workqueue passed in that runs one item at a time (max_active 1,
        an ordered one included: the devices' drops queued on it wait
        for the caller's slot), and any item of a ``WQ_MEM_RECLAIM``
        workqueue passed in: its rescuer runs its items, one at a time,
        when no worker thread can be made, and the drops would wait for
        a worker that cannot be made or for the rescuer, busy with the
        caller.  Refused whichever thread runs the item, the rescuer or
        a worker (where the rescuer would run the drops): a refusal only
        when threads run out would be a hang, or a failure, that shows
        only then, as lockdep reports a dependency rather than the
        deadlock.  It would wait for itself, and that is
        a :class:`RuntimeError`, raised before anything is stopped.  An
        item on a workqueue passed in that may run more at once, and
        the callback of an fd the driver watches on :attr:`events`, may
        stop it (the caller then makes sure that items it blocks do not
        fill the workqueue's max_active).  Called while another thread's stop()
        is under way, it returns when that one has stopped the driver.
        The domain's lock (see the class) goes last: a stop() refused or
        interrupted keeps it, with the devices it still serves."""
        with self._lock:
            if self._xs is None:
                return
        bus, work, events = self._bus, current_work(), self._events
        # Read once: a concurrent stop() sets one we made to None, which
        # is also what current_workqueue() says outside any work item.
        wq = self._workqueue
        if (bus is not None and bus.in_queue() or any(d.events.in_queue() for d in self.devices())
                # The workqueue we made, we destroy: that waits for every
                # item on it, the caller's included.  One we were given
                # goes on running: we wait only for our own items on it,
                # which the caller holds up if it runs one at a time.
                # stats(): its max_active while frozen too (the kernel's
                # saved_max_active).
                # So does its rescuer, which runs one item at a time too,
                # when no worker can be made: any item of a WQ_MEM_RECLAIM
                # one, whatever thread runs it now (see the docstring).
                or wq is not None and current_workqueue() is wq
                and (self._own_workqueue or wq.stats().max_active == 1
                     or bool(wq.flags & WQ_MEM_RECLAIM))
                # A device's own work and port callbacks are the driver's
                # too: its drop waits for them (disconnect()'s
                # disable_sync(), the port's unbind).  Not an fd's
                # callback on our dispatcher: nothing waits for it, and
                # the dispatcher's close() does not wait for itself.
                or isinstance(work, DeviceWork) and work.dev.driver is self
                or events is not None and events.running_port() is not None):
            # Refused up front: found later (at the workqueue's shutdown),
            # the devices would be dropped and the handles closed already.
            raise RuntimeError(
                f"stop() from a callback of {type(self).__name__} would wait for "
                f"itself: call it from another thread"
            )
        # Ours to clear: set with _stop_running, in one statement (no call
        # between them), and inside the try, whose finally clears it.  Set
        # before it, a Ctrl-C as the lock was let go of left the driver
        # saying a stop() was under way, and every later one waited for it.
        running = False
        try:
            with self._lock:
                # Another thread's stop() under way: when this one returns,
                # the driver must be stopped, so wait for it (in slices,
                # for a signal's handler: see wait_slice), then finish what
                # it left.
                while self._stop_running:
                    self._stop_done.wait(wait_slice(None))
                if self._xs is None:
                    return
                self._stopping = True
                self._stop_running = running = True
            # Interrupted in a wait for a device's queue or the workqueue
            # (Ctrl-C in the main thread), it leaves the driver started: a
            # later stop() must still be able to release the devices,
            # threads and XenStore connection.  Every step can be done again.
            self._stop()
        finally:
            if running:
                with self._lock:
                    self._stop_running = False
                    self._stop_done.notify_all()

    def _stop(self, *, started: bool = True) -> None:
        """Undo what start() did, or (not ``started``) what it got to do
        before it failed or was interrupted: every step is skipped if
        there is nothing for it, and can be done again."""
        for w in self._watches:
            try:
                w.unwatch()
            except OSError:
                pass
        self._watches.clear()
        if self._bus is not None:
            self._bus.close(wait=True)
        for dev in self.devices():
            dev.events.call(self._drop, dev)
        for dev in self.devices():
            dev.events.close(wait=True)
        with self._lock:
            leftovers = list(self._devices.values())
            self._handles_closed = True
        # Their queue was closed before the drop ran, or ran one that ended
        # past Exception; or an earlier stop()'s drop here was cut short.
        # Every device is released here, before the dispatcher is closed:
        # notify() finds no port of theirs to send on then.
        for dev in leftovers:
            self._drop(dev)
        # Forgotten only once closed (close() may be done again): taken
        # off first, a Ctrl-C before their close() lost them to the next
        # stop(), the dispatcher's thread running for ever.  Nobody else
        # sets them now (see _handles_closed), nor runs this meanwhile.
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._gnttab is not None:
            self._gnttab.close()
            self._gnttab = None
        if self._own_workqueue and self._workqueue is not None:
            # Not destroy(): the stop() after an interrupted one may find
            # it destroyed already, and a second destroy() raises then;
            # shutdown() returns, or waits for a destruction under way.
            self._workqueue.shutdown(wait=True)
            self._workqueue = None
        if self._xs is not None:
            self._xs.close()
        # Last, with every device gone, and before _xs (which says we are
        # started): interrupted in between, a later stop() closes it again.
        if self._host_lock is not None:
            self._host_lock.close()
            self._host_lock = None
        self._xs = None
        if started:
            logger.info("%s backend stopped", self.device_type)

    def __enter__(self) -> BackendDriver:
        started = self._xs is not None  # then start() refuses, and it is not ours to stop
        try:
            self.start()
        except BaseException:
            # start() undoes itself; but a Ctrl-C as it returned here comes
            # after that, and ``with`` calls no __exit__ for an __enter__
            # that raised.
            if not started:
                self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Our own domain going away.

    def _home_gone(self) -> bool:
        """Whether our home, ``/local/domain/<self>``, is gone: libxl
        deletes it when it destroys our domain, after the devices and
        before the domain itself (and with it our XenStore connection).
        A driver domain may not read ``/local/domain``, so where its home
        was it gets EACCES, not ENOENT.  False when XenStore can no longer
        tell: the connection's loss is said by itself (_xenstore_lost)."""
        xs = self._xs
        if xs is None:
            return False
        try:
            return not xs.exists(self.home)
        except PermissionError:
            return True
        except ConnectionError:
            return False

    def _lost_domain(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by a request to XenStore (or the host),
        comes of our own domain going away: once it is known to be going,
        any :class:`OSError` does; before, only EACCES with our home gone
        (which makes it known: see :meth:`_lose_domain`).  EACCES with our
        home still there is a real refusal, and is reported as such."""
        if not isinstance(exc, OSError):
            return False
        with self._lock:
            if self._domain_gone:
                return True
        if not isinstance(exc, PermissionError) or not self._home_gone():
            return False
        self._lose_domain()
        return True

    def _said_already(self, exc: BaseException) -> bool:
        """Whether XenStore's error ``exc`` is said already, by what caused
        it: our domain going (see :meth:`_lost_domain`), or the loss of
        our connection to an EACCES that XenStore could not explain before
        it went.  That EACCES is most likely our home gone as our domain
        went the rest of the way; a refusal it may have been, but nobody
        can tell any more, and "Permission denied" would say one."""
        if self._lost_domain(exc):
            return True
        return isinstance(exc, PermissionError) and self._connection_gone(exc)

    def _connection_gone(self, exc: BaseException) -> bool:
        """Whether XenStore's error ``exc`` came as our connection is gone:
        ENOTCONN, or whatever else a request got as XenStore ended it.
        The loss is said once, by _xenstore_lost (or, once our domain is
        going, by _lose_domain)."""
        return isinstance(exc, OSError) and self._xs is not None and not self._xs.connected

    def _lose_domain(self) -> None:
        """Our domain is going away: say so once, and drop every device.
        Nothing is written (our nodes went with our home, and a write
        would only fail); disconnect() and remove() are called and the
        grants and ports released while the domain still has them, so
        that nothing is left for stop() but the threads and handles."""
        with self._lock:
            if self._domain_gone:
                return
            self._domain_gone = True
            # The domain may have gone the rest of the way since the EACCES
            # that told us: then the loss of its connection, said already,
            # was its end.
            level = logging.DEBUG if self._xs_lost else logging.WARNING
            devices = list(self._devices.values())
        logger.log(level, "%s backend: domain %d is going away (its XenStore home %s is gone): "
                   "dropping its %d device%s", self.device_type, self.platform.domid,
                   self.home, len(devices), "" if len(devices) == 1 else "s")
        for dev in devices:
            dev.events.call(self._drop, dev)

    def _callback_failed(self, exc: Exception) -> bool:
        """The ``handled`` of our event queues, and what spares a device
        whose driver's code failed (see BackendDevice._claim_failure): a callback
        that failed as our domain went away, or as XenStore ended our
        connection, is no bug of its own, and every callback of every
        device would say the same: _lose_domain or _xenstore_lost says it
        once."""
        if self._lost_domain(exc):
            why = f"domain {self.platform.domid} goes"
        elif self._connection_gone(exc):
            # ENOTCONN, or an EACCES whose cause XenStore can no longer
            # tell (a home going as the domain goes the rest of the way).
            why = "the XenStore connection is lost"
        else:
            return False
        logger.debug("%s backend: a callback failed as %s", self.device_type, why, exc_info=exc)
        return True

    def _xenstore_lost(self, exc: Exception) -> None:
        # On pyxs's router thread.  Once our domain is going, the loss of
        # its connection is the end of that, said already.
        with self._lock:
            gone = self._domain_gone
            self._xs_lost = True
        if gone:
            logger.debug("%s backend: XenStore connection of domain %d closed: %s",
                         self.device_type, self.platform.domid, exc)
        else:
            logger.warning("XenStore connection lost: %s", exc)

    # Discovery.

    def _backend_watch(self, path: str) -> None:
        # Runs on the XenStore watch thread, which delivers every watch of
        # our connection in arrival order: an event for a known device goes
        # straight to that device's queue, so it stays in order with the
        # frontend's events; anything else is discovery, on the bus queue.
        parts = path[len(self.backend_root) :].strip("/").split("/")
        if path.startswith(self.backend_root + "/") and len(parts) >= 2:
            with self._lock:
                dev = self._devices.get((_number(parts[0]), _number(parts[1])))
            if dev is not None and dev.events.call(self._backend_changed, dev):
                return
        assert self._bus is not None
        self._bus.call(self._backend_event, path)

    # Discovery (runs on the bus queue).

    def _backend_event(self, path: str) -> None:
        if self._domain_gone:
            return
        parts = path[len(self.backend_root) :].strip("/").split("/")
        if path.startswith(self.backend_root + "/") and len(parts) >= 2:
            self._check_device(parts[0], parts[1])
            return
        # The whole tree (first event, a frontend's subtree removed, or the
        # root itself deleted with its last device): every device listed,
        # and every known one that no longer is.
        listed = {
            (fe, devid)
            for fe in self.xenstore.ls(self.backend_root)
            for devid in self.xenstore.ls(f"{self.backend_root}/{fe}")
        }
        adopt, self._first_scan = self._first_scan, False
        self._junk &= listed
        # A device deleted with its parent directory sends no event of its
        # own: _check_device never sees it gone.
        self._unclosed &= {(_number(fe), _number(devid)) for fe, devid in listed}
        for fe, devid in sorted(listed):
            self._check_device(fe, devid, adopt=adopt, listed=True)
        known = {(str(dev.frontend_id), str(dev.devid)): dev for dev in self.devices()}
        for key, dev in known.items():
            if key not in listed and not dev.events.call(self._backend_changed, dev) and dev.gone:
                self._forget(dev)  # its drop was cut short (or is ending): see _check_device
        # The error nodes of devices deleted in one go with their parent
        # directory (whose own events name only that directory).
        errors = self.error_root
        for fe in self.xenstore.ls(errors):
            for devid in self.xenstore.ls(f"{errors}/{fe}"):
                if (fe, devid) not in listed and (fe, devid) not in known:
                    self._forget_error(fe, devid)

    def _check_device(
        self, fe_text: str, devid_text: str, *, adopt: bool = False, listed: bool = False
    ) -> None:
        """Serve, or pass on to its device, what changed at ``fe_text/devid_text``
        (``listed``: it was just found in the backend directory)."""
        key = (_number(fe_text), _number(devid_text))
        if -1 in key:
            self._check_junk(fe_text, devid_text, listed)
            return
        with self._lock:
            dev = self._devices.get(key)
        if dev is not None:
            if dev.events.call(self._backend_changed, dev) or not dev.gone:
                return  # (closed, not yet gone: its drop looks again when done)
            # Its drop ended past Exception once the device was gone
            # (SystemExit from a driver's logging handler, say), and left it
            # listed, its queue closed: finished here, or a new device at
            # the path went unserved, its events refused by that queue.
            # (A drop not cut short, forgetting it on its queue meanwhile,
            # keeps it, and looks at the path again when done: see _forget.)
            self._forget(dev)
        path = f"{self.backend_root}/{key[0]}/{key[1]}"
        try:
            state = self.xenstore.read(f"{path}/state")
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            # The toolstack took it (see _refused, which says so for a
            # device we served): not one for us, as Linux's probe reads
            # an unreadable state as Unknown and leaves the device alone.
            logger.debug("%s: not served: %s", path, exc)
            return
        if state != _CLOSING:
            self._unclosed.discard(key)
        if state is None and not self.xenstore.exists(path):
            self._forget_error(str(key[0]), str(key[1]))
            return
        # Any other state is a device we dropped (Closed, waiting for the
        # toolstack to delete it) or not a device yet; but at start, one
        # an earlier backend left behind: without us its frontend would
        # wait for it forever, and could never connect again.
        taken_over = adopt and state is not None and state != _INITIALISING
        if taken_over and state == _CLOSED and self._removed(path):
            # A removal an earlier backend answered; the toolstack deletes
            # the device next.  Nothing is left to serve, and a probe would
            # only fail (a dying domain's frontend goes first) and put an
            # error node and Closing over the Closed it may read again.
            taken_over = False
        if state != _INITIALISING and not taken_over:
            if state == _CLOSING:
                self._close_unprobed(key, path)
            return
        try:
            # Our directory itself, which every look at whose it is reads
            # first (see _stale): one we may not read (the toolstack took
            # it) would be dropped at once (see _refused), and the drop's
            # look at the path would probe it again, for ever.
            self.xenstore.read(path)
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            logger.debug("%s: not served: %s", path, exc)
            return
        # Nothing of ours was written for a new device yet, and nothing can
        # be before its probe: an error node at its path is an earlier
        # device's.  (Every _check_device runs on the bus queue, one at a
        # time, and only a device registered at the key, none here, can
        # write there: a dropped one's writes are refused, see _ours.)
        if not taken_over:
            self._forget_error(str(key[0]), str(key[1]), made_again=True)
        with self._lock:
            if self._stopping or self._domain_gone or key in self._devices:
                return
            dev = BackendDevice(self, *key)
            self._devices[key] = dev
        if taken_over:
            logger.info("%s: taking over a device left in state %s", dev.nodename, state)
        else:
            logger.info("%s: new device", dev.nodename)
        dev.events.call(self._probe, dev, taken_over)

    def _check_junk(self, fe: str, devid: str, listed: bool) -> None:
        """Report a junk directory once, and forget it once it is gone."""
        path = f"{self.backend_root}/{fe}/{devid}"
        key = (fe, devid)
        if not listed and not self.xenstore.exists(path):
            self._junk.discard(key)
        elif key not in self._junk:
            if len(self._junk) < _MAX_JUNK:
                self._junk.add(key)
                logger.warning("ignoring %s: not <domid>/<devid>", path)
            else:
                self._junk_ratelimit.log(
                    logger, logging.WARNING, "ignoring %s: not <domid>/<devid>", path)

    def _forget_error(self, fe: str, devid: str, *, made_again: bool = False) -> None:
        """Delete the error node of a device the toolstack deleted (and its
        frontend's directory there, if that was its last): nobody reads it
        any more, and it is ours, in our home, counted against our node
        quota, which in a driver domain every failed device of every
        guest that ever ran would fill up, until we could write nothing.
        Not if a device was made at the path again meanwhile; but with
        ``made_again``, the device there is a new one, Initialising and
        not ours yet (about to be probed): the error node is then an
        earlier device's, whose deletion we saw only once the new one was
        made (in the same transaction, or while the old one's queue was
        busy), and the new device must not start with it."""
        errors = self.error_root
        backend = f"{self.backend_root}/{fe}/{devid}"

        def tx(t: Transaction) -> bool:
            if made_again:
                if t.read(f"{backend}/state") != _INITIALISING:
                    return False
            elif t.read(backend) is not None:
                return False
            if t.read(f"{errors}/{fe}/{devid}") is None:
                return False
            t.rm(f"{errors}/{fe}/{devid}")
            if not t.ls(f"{errors}/{fe}"):
                t.rm(f"{errors}/{fe}")
            return True

        try:
            # A read first for a new device: a transaction for every one
            # would count against a driver domain's few.
            if made_again and self.xenstore.read(f"{errors}/{fe}/{devid}") is None:
                return
            if self.xenstore.transaction(tx):
                logger.debug("%s/%s/%s: %s", self.backend_root, fe, devid,
                             "an earlier device's error node deleted" if made_again
                             else "error node deleted with the device")
        except OSError as exc:
            # Tidying up: not worth more than a line, nor worth a new
            # device left unprobed.  (A driver domain that is being
            # destroyed may not even read its home any more; nor may it
            # read an error directory the toolstack took.)
            logger.debug("%s/%s/%s: error node not deleted: %s", self.backend_root, fe, devid, exc)

    def _removed(self, path: str) -> bool:
        """Whether the toolstack removed the device at ``path`` (``online``
        = 0).  An ``online`` we may not read (the toolstack took it: see
        _refused) reads as 0, as Linux's xenbus_dev_is_online() reads any
        failure: nothing to take over there."""
        try:
            return self.xenstore.read(f"{path}/online") == "0"
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            logger.debug("%s: not served: %s", path, exc)
            return True

    def _close_unprobed(self, key: tuple[int, int], path: str) -> None:
        """The toolstack asked to remove (``online`` = 0, Closing) a device
        we never probed: it was made and removed before we saw it
        Initialising, as happens when it was made at the path of a device
        still being dropped.  Nothing was connected, so nothing is left
        to close: Closed, as for a device that never got going, or libxl
        waits its whole timeout for a backend that will never answer.
        (Ours write Closed when dropped, but one dropped as the toolstack
        took a node of its own, see _refused, which writes nothing: it is
        closed so too, should the toolstack give the node back.)  Only
        while the node still says so, in one transaction.  Nodes we may
        not read (the toolstack took them) tell no removal: nothing is
        done.  A state we may read but not write is said as a warning,
        once while it stays Closing, and left so: the toolstack waits its
        timeout, as it made it."""
        asked = False

        def tx(t: Transaction) -> bool:
            nonlocal asked
            asked = False
            if t.read(f"{path}/state") != _CLOSING or t.read(f"{path}/online") != "0":
                return False
            asked = True
            t.write(f"{path}/state", str(int(XenbusState.CLOSED)))
            return True

        try:
            closed = self.xenstore.transaction(tx)
        except PermissionError as exc:
            if not self._taken(exc):
                raise  # for the bus queue's handler, which says it once
            if asked and key not in self._unclosed:
                self._unclosed.add(key)
                logger.warning("%s: removal asked for, but Closed may not be written: %s",
                               path, exc)
            else:
                logger.debug("%s: not closed: %s", path, exc)
            return
        if closed:
            logger.info("%s: removed before it was probed", path)

    def _release_domain(self, _path: str) -> None:
        if self._domain_gone:
            return  # every device is being dropped
        alive: dict[int, bool] = {}
        for dev in self.devices():
            fe = dev.frontend_id
            if fe not in alive:
                alive[fe] = self._domain_alive(fe)
            if not alive[fe]:
                dev.events.call(self._domain_dead, dev)

    def _domain_alive(self, domid: int) -> bool:
        if domid > XENSTORE_DOMID_MAX:
            # A backend directory may name any number (it is the
            # toolstack's): no domain has this one, and XenStore is not
            # even asked (ValueError, where its EINVAL fell through to the
            # look at the home below, which is not there either).
            return False
        try:
            return self.xenstore.is_domain_introduced(domid)
        except OSError:
            pass
        try:
            return self.xenstore.exists(f"/local/domain/{domid}")
        except PermissionError:
            # A driver domain may look at neither: assume it lives, and
            # learn of its death from its frontend directory vanishing.
            return True

    # Per-device handlers (run on the device's queue).

    def _probe(self, dev: BackendDevice, taken_over: bool = False) -> None:
        if dev.gone or self._domain_gone:
            return
        try:
            try:
                otherend = _find_otherend(self.xenstore, dev)
            except Exception as exc:
                # What tells, until our first switch, whether the directory
                # that the failure is written into is still ours (see _ours).
                dev._lookup_failure = _errno_of(exc)
                raise
            dev.otherend = otherend
            dev._probed = True  # set first: remove() also undoes a probe that failed halfway
            dev._probe_nodes = {}
            self.probe(dev)
            if taken_over:
                dev._probe_nodes = None
                self._take_over(dev)
            elif not dev._switch_after_probe():
                # Not our directory any more.  Dropped now, nothing is
                # written there, and the drop looks at the path again: a
                # new device there is probed.
                self._drop(dev)
                return
            dev._otherend_watch = self.xenstore.watch(
                f"{otherend}/state", lambda _p: self._otherend_event(dev)
            )
        except Exception as exc:
            err, message = _errno_of(exc)
            logger.debug("%s: probe failed", dev.nodename, exc_info=True)
            if self._fatal_or_drop(dev, err, f"probing: {message}"):
                # Watching no frontend, the device moves on only for events
                # in its own directory, and a removal asked for before we
                # looked (one found at start, online=0 and Closing) sends none.
                self._backend_changed(dev)

    def _take_over(self, dev: BackendDevice) -> None:
        """Serve a device an earlier backend left in our directory (it was
        stopped, which leaves Closed, or killed, which leaves any state).
        Its state stays ours: the frontend-state watch set next reports the
        frontend's at once, and the frontend_changed table goes on from
        there (Closed: reconnect when the frontend writes Initialising;
        InitWait: connect when it publishes its ring).  A connection the
        earlier backend made cannot be: its state went with it.  Closing
        tells the frontend so, as a fatal error would.  So it does a
        frontend still Initialised or Connected after a stop left Closed
        (it has not seen the Closed yet): the table would connect to its
        ring as a new one, from index 0, and answer again every request
        the earlier backend answered."""
        # The state in our directory is a backend's: from now on
        # Initialising there means a new device (see _switched).
        dev._switched = True
        dev.state = XenbusState.parse(dev.read("state"))
        # An earlier backend's Closing, or a removal asked for before we
        # looked: nobody can tell, and it is taken as ours (see _switch).
        dev._closing_ours = dev.state == XenbusState.CLOSING
        connected = (XenbusState.INITIALISED, XenbusState.CONNECTED)
        if dev.state == XenbusState.CLOSED:
            try:
                stale = XenbusState.parse(dev.read_otherend("state")) in connected
            except ValueError:
                stale = False  # the table fails the device for it
        else:
            stale = dev.state in connected
        if stale:
            logger.info("%s: the connection of an earlier backend: closing it", dev.nodename)
            dev.switch_state(XenbusState.CLOSING)

    def _otherend_event(self, dev: BackendDevice) -> None:
        # Runs on the XenStore watch thread.  The frontend may rewrite its
        # state as fast as XenStore lets it, each write an event: queue one
        # only if none is waiting already, as Linux's frontend_will_handle()
        # (XSA-349).  The one waiting reads the state when it runs, so it
        # sees the newest write, and the queue cannot grow without bound.
        with dev._lock:
            if dev._otherend_pending:
                return
            dev._otherend_pending = True
        dev.events.call(self._otherend_changed, dev)

    def _otherend_changed(self, dev: BackendDevice) -> None:
        with dev._lock:
            # Before reading: a write after the read fires a new event.
            dev._otherend_pending = False
        if dev.gone or self._domain_gone:
            return
        raw = self._otherend_state(dev)
        try:
            state = XenbusState.parse(raw)
        except ValueError as exc:
            self._fatal_or_drop(dev, errno.EINVAL, f"frontend {exc}")
            return
        dev.frontend_state = state
        logger.debug("%s: frontend %s", dev.nodename, state.name)
        try:
            self.frontend_changed(dev, state)
        except Exception as exc:
            # A driver's extension of the table, or XenStore under it (a
            # state that cannot be written: xenbus_switch_fatal), failed:
            # the frontend must hear of it, as from a failed connect.
            err, message = _errno_of(exc)
            logger.debug("%s: handling frontend %s failed", dev.nodename, state.name, exc_info=True)
            if dev.gone:
                # It dropped the device before raising: Closing must not
                # replace the Closed the toolstack may be waiting for.
                logger.error("%s: frontend state %d: %s", dev.nodename, state, message)
            else:
                self._fatal_or_drop(dev, err, f"frontend state {int(state)}: {message}")

    @staticmethod
    def _otherend_state(dev: BackendDevice) -> str | None:
        """The frontend's raw ``state``; None (Unknown) where it is missing
        or may not be read.  Where a dead frontend's directory was, a driver
        domain gets EACCES (it may not read ``/local/domain``), not ENOENT;
        Linux's ``xenbus_read_driver_state`` takes any failure for Unknown."""
        try:
            return dev.read_otherend("state")
        except PermissionError:
            return None

    def _backend_changed(self, dev: BackendDevice) -> None:
        if dev.gone or self._domain_gone:
            return
        removing = False
        # An online we may not read: no removal we can tell, but none to
        # wait for either once nothing is left to close (see _online).
        refused: PermissionError | None = None
        try:
            # Outside a transaction: one on every event in our directory
            # would count against a driver domain's few (10 in
            # cxenstored).  What is written next checks again, in its own.
            why = dev._stale(self.xenstore)
            if why is None:
                try:
                    with dev._switch_lock:  # see there
                        dev.state = XenbusState.parse(dev.read("state"))
                        if dev.state != XenbusState.CLOSING:
                            # Our Closing, if any, is gone: a switch that
                            # replaced it and was cut short (a Ctrl-C as
                            # it committed) did not say so.
                            dev._closing_ours = False
                except ValueError:
                    pass
                # Removal by the toolstack: online=0 and state=Closing
                # written to our directory.  A connected frontend closes
                # in turn and the frontend_changed table finishes the
                # job; one that is absent, closed or never got going
                # would leave the toolstack waiting.
                if dev.state == XenbusState.CLOSING:
                    try:
                        removing = not self._read_online(dev)
                    except PermissionError as exc:
                        if not self._taken(exc):
                            raise
                        removing, refused = True, exc
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            self._refused(dev, exc)
            return
        if why is not None:
            logger.info("%s: %s", dev.nodename, why)
            self._drop(dev)
            return
        if not removing:
            return
        if dev._otherend_watch is not None:
            try:
                fstate = (XenbusState.parse(self._otherend_state(dev)) if dev.otherend
                          else XenbusState.UNKNOWN)
            except ValueError:
                fstate = XenbusState.UNKNOWN
            if fstate not in (XenbusState.UNKNOWN, XenbusState.INITIALISING, XenbusState.CLOSED):
                return  # its frontend closes, and its Closed finishes the job
        # else its probe failed: it connected nothing, and would never hear
        # its frontend close.
        if refused is not None:
            self._refused(dev, refused)
        else:
            self._drop(dev)

    def _domain_dead(self, dev: BackendDevice) -> None:
        if not dev.gone:
            logger.info("%s: frontend domain %d is gone", dev.nodename, dev.frontend_id)
            self._drop(dev)

    def _online(self, dev: BackendDevice) -> bool:
        """Whether the toolstack still wants the device (``online`` = 1),
        read as its frontend is Closed (see _read_online).  A node of our
        own we may not read (see _refused): the device is dropped, writing
        nothing more, and False, as Linux's xenbus_dev_is_online() reads
        any failure as offline and the device is unregistered; but the
        :class:`PermissionError` is raised if our domain is going (or the
        connection went), for the callback's handler."""
        try:
            return self._read_online(dev)
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            self._refused(dev, exc)
            return False

    def _read_online(self, dev: BackendDevice) -> bool:
        """``online`` = 1: missing or garbled, the toolstack no longer
        wants the device, as Linux's xenbus_dev_is_online() reads it."""
        try:
            return bool(self.xenstore.read_int(f"{dev.nodename}/online", 0))
        except ValueError:
            return False

    def _connect(self, dev: BackendDevice) -> None:
        # Enforce the precondition: whatever an earlier connect left behind
        # is released before trying again.
        self._disconnect(dev)
        dev._connected = True
        fatal_calls = dev._fatal_calls
        try:
            self.connect(dev)
        except Exception as exc:
            err, message = _errno_of(exc)
            logger.debug("%s: connect failed", dev.nodename, exc_info=True)
            self._disconnect(dev)
            self._fatal_or_drop(dev, err, f"connecting: {message}")
            return
        if dev._fatal_calls != fatal_calls:
            # connect() said its failure itself (fatal(), as Linux's
            # backends do) and returned: Connected must not replace the
            # Closing the frontend was told, and what it set up is
            # undone, as Linux's backends undo it before they return.
            # Told by the call, not by our state: a Closing refused (our
            # state left to us to read only) leaves the state as it was,
            # and a Connected tried then would be refused in turn, and
            # said as a second failure over the driver's error node.
            self._disconnect(dev)
            return
        try:
            dev.switch_state(XenbusState.CONNECTED)
        except Exception:
            # The frontend was never told Connected (our state left to us
            # to read only, say), and the failure, reported by the caller,
            # may leave it no Closing to answer either: undone now, as for
            # a connect() that failed, or its ring and port stay held for
            # a connection nobody can use or close.
            self._disconnect(dev)
            raise

    def _fail(self, dev: BackendDevice, what: str, exc: Exception) -> None:
        """``exc`` escaped ``what``, the driver's code for ``dev`` run after
        connect(), and was logged: fail the device as for a failed
        connect().  On the device's queue.  Failing may fail in turn (the
        device directory or the connection gone meanwhile): that is logged,
        never raised into the queue, which would log the bug a second time,
        and never tried again."""
        if dev.gone or self._domain_gone:
            return  # dropped already, or being dropped: nothing to fail
        if not dev._connected:
            # The connection the code served is over, and the frontend was
            # told (it closed it, started over, or it failed already): a
            # Closing now would land after its Closed was answered, and
            # stay, or fail the connection it is setting up anew.
            return
        err, message = _errno_of(exc)
        try:
            self._disconnect(dev)
            self._fatal_or_drop(dev, err, f"{what}: {message}")
        except Exception as again:
            if not self._callback_failed(again):
                dev.ratelimit.log(logger, logging.ERROR, "%s: could not fail the device: %s",
                                  dev.nodename, again, exc_info=again)

    def _fatal_or_drop(self, dev: BackendDevice, err: int, message: str) -> bool:
        """Report a failure of ``dev`` (:meth:`BackendDevice.fatal`) and
        return True; but if its directory is no longer its own (deleted,
        or deleted and made again by the toolstack for a new device at the
        same path, see ``BackendDevice._ours``) drop it instead and return
        False.  The failure is then the old device's: fatal() logs it only
        as information and writes nothing.  The drop looks at the path
        again, and a new device there is probed.

        The look before fatal() is outside a transaction, and fatal()'s
        own (one, for its error node and Closing both) tells the
        re-creation that comes after it.  It is still worth its reads:
        XenStore's error to them (the connection lost, our domain going)
        is raised, to the callback's handler, which says the cause once,
        where fatal() would report it as this device's.  A read of our
        own directory refused (see _refused), our state included, which
        the look reads before our first switch for that alone, drops the
        device, writing nothing, the failure only logged.

        A device that a report of its own found taken already (see
        BackendDevice._refused_report: its failure said, its drop queued)
        is dropped at once, this failure only a debug line: it is that
        one's sequel (a driver told False gives up and raises, or returns
        and its Connected is refused by the same taking), and one event
        is said once."""
        quoted = _error_message(abs(err), message)
        if dev._refusal is not None:
            logger.debug("%s: %s (errno %d), after a report met a node taken: not reported",
                         dev.nodename, quoted, abs(err))
            self._refused(dev, dev._refusal)
            return False
        try:
            why = dev._stale(self.xenstore)
            if why is None and not dev._switched:
                # That look reads no state before our first switch: one we
                # may not read is refused all the same, as _backend_changed
                # would find next, after fatal() wrote the error node.
                self.xenstore.read(f"{dev.nodename}/state")
        except PermissionError as exc:
            if not self._taken(exc):
                raise
            # Said before the drop, whose last line is the device's last.
            dev._not_reported(abs(err), quoted, f"{exc.filename} may not be read")
            self._refused(dev, exc)
            return False
        if why is not None:
            dev._not_reported(abs(err), quoted, why)
        # "is not False": a driver's fatal() wrapped (or overridden) before
        # it told anything returns None, and that is no drop.
        elif dev.fatal(err, message) is not False:
            return True
        elif dev._refusal is not None:
            # fatal() found a node taken since the look (see
            # BackendDevice._refused_report): no Closed tried, no drop of
            # another kind; the drop it queued finds the device gone.
            self._refused(dev, dev._refusal)
            return False
        self._drop(dev)
        return False

    def _taken(self, exc: PermissionError) -> bool:
        """Whether ``exc``, EACCES to a read of our own directory, says the
        toolstack took the node from us (set_perms on our ``state``, say:
        see _refused): not when our domain is going, nor once the
        connection went; ``exc`` is then for the callback's handler, which
        says the cause once."""
        return not (self._lost_domain(exc) or self._connection_gone(exc))

    def _refused(self, dev: BackendDevice, exc: PermissionError) -> None:
        """A read of ``dev``'s own directory got EACCES, and the toolstack
        took the node from us (see _taken).  Said once, as a warning, and
        the device dropped, writing nothing there: once we switched, only
        that node tells our directory from a new device's made at its path
        (see _ours), and every switch reads it first, so the device could
        never tell its frontend anything again, nor be told from a new
        device.  Linux keeps such a device bound, its grants and ports
        held, and its switches, which read the node first, give up without
        a word (xenbus_switch_state); here they go at once, remove() is
        called, and the path, should the toolstack give the node back, is
        served again only as a new device (Initialising), as Linux probes
        one (an unreadable state reads as Unknown to its
        xenbus_read_driver_state, and is not probed).  Once only: the
        drop a report queued (see BackendDevice._refused_report) may
        find it done."""
        if dev.gone:
            return
        self._say_taken(dev, exc)
        self._drop(dev, closed=False)

    @staticmethod
    def _say_taken(dev: BackendDevice, exc: PermissionError) -> None:
        """The one line of a taking (see _refused), whichever path met it."""
        logger.warning("%s: its own node may not be read any more (%s): dropping the device, "
                       "writing nothing there", dev.nodename, exc)

    def _disconnect(self, dev: BackendDevice) -> None:
        if dev._connected:
            dev._connected = False
            try:
                self.disconnect(dev)
            except Exception as exc:
                self._hook_failed(dev, "disconnect", exc)
        dev.release_resources()

    def _hook_failed(self, dev: BackendDevice, hook: str, exc: Exception) -> None:
        """A driver's disconnect() or remove() raised: a bug of the driver,
        unless it tried XenStore (or the host) as our domain went away."""
        if self._lost_domain(exc):
            logger.debug("%s: %s failed as domain %d goes", dev.nodename, hook,
                         self.platform.domid, exc_info=exc)
        else:
            logger.error("%s: " + hook + " failed", dev.nodename, exc_info=exc)

    def _forget(self, dev: BackendDevice) -> None:
        """What _drop() does once the device is gone: each step may be
        done again."""
        key = (dev.frontend_id, dev.devid)
        claimed = False
        try:
            with self._lock:
                # Forgotten, and said so; or being forgotten on another
                # thread: the drop, and the look at the path that finishes
                # one cut short (see _check_device), may both get here.
                # Whichever is first releases and says it, once; the drop
                # looks at the path again when done, which finishes one
                # that was cut short after all.
                if self._devices.get(key) is not dev or dev._forgetting:
                    return
                dev._forgetting = claimed = True
            # A driver's own work item may have mapped or bound since the
            # disconnect; from now on nothing can be added.  Under the
            # claim: the forget that says the device removed is the one
            # that released it, not one that came upon another's release.
            dev.release_resources()
            # Both lines before the device leaves devices(): whoever sees
            # it gone there finds its removal said, a drop cut short
            # before them included.  (Cut short after them, the next says
            # them again.)  The lines suppressed since the last report are
            # counted first.
            dev.ratelimit.close(logger)
            logger.info("%s: removed", dev.nodename)
            with self._lock:
                if self._devices.get(key) is dev:
                    del self._devices[key]
        finally:
            if claimed:
                dev._forgetting = False  # cut short: the next does it

    def _drop(self, dev: BackendDevice, *, closed: bool = True) -> None:
        """Disconnect, write Closed (if the directory is still there, and
        ``closed``), call remove() (if probe() was) and forget the device;
        then, once it is gone, look at its path again (also when cut short
        past Exception: the look finishes the drop)."""
        try:
            # Once gone: dropped already, or cut short once it had marked
            # the device gone (a Ctrl-C in stop()'s own drop of a
            # leftover, see _stop): the rest is done again, or the device
            # stayed listed after stop(), and after a restart every event
            # of a new device at its path went to its closed queue.
            if not dev.gone:
                self._take_down(dev, closed)
            self._forget(dev)
        finally:
            # The toolstack may have made a new device at the same path
            # while this one was still known, and the new one's events
            # went to this one's queue: look again.  Also when the drop
            # ended past Exception once the device was gone (SystemExit
            # from a driver's logging handler): the look finishes it (see
            # _check_device).  (The bus queue refuses once stopping; once
            # our domain is going, nothing is served any more.)
            if dev.gone and self._bus is not None and not self._domain_gone:
                self._bus.call(self._check_device, str(dev.frontend_id), str(dev.devid))

    def _take_down(self, dev: BackendDevice, closed: bool) -> None:
        """What _drop() does until the device is gone."""
        self._disconnect(dev)
        try:
            # Not once our domain is going: our directory went with our home.
            if closed and not self._domain_gone:
                dev.switch_state(XenbusState.CLOSED)
        except OSError as exc:
            # Dropped for another reason (the frontend gone, its domain
            # dead) with a node of ours taken meanwhile, before the
            # taking's own event: said as the taking, not as a Closed
            # refused, which would not say the node was taken (see _refused).
            taken = dev._taken_from_us(exc)
            if taken is not None:
                self._say_taken(dev, taken)
            elif self._said_already(exc):
                logger.debug("%s: could not switch to Closed: %s", dev.nodename, exc)
            else:
                logger.warning("%s: could not switch to Closed: %s", dev.nodename, exc)
        if dev._otherend_watch is not None:
            try:
                dev._otherend_watch.unwatch()
            except OSError:
                pass
            dev._otherend_watch = None
        try:
            if dev._probed:
                self.remove(dev)
        except Exception as exc:
            self._hook_failed(dev, "remove", exc)
        # Closed before _gone is set: whoever sees the device gone has its
        # queue() refused, as that docstring says (closed after, a call
        # taken in between would run on a device nobody serves).
        dev.events.close(wait=False)
        with dev._lock:
            dev._gone = True
