"""The platform interface: what a backend needs from Xen, and nothing more.

A backend talks to Xen through three services, each modelled on the C
library a real dom0 uses:

* a XenStore connection (``libxenstore``; here an unmodified :mod:`pyxs`
  client),
* a grant table handle (``libxengnttab``: map pages another domain granted
  to us) and, for frontends, a grant share handle (``libxengntshr``),
* an event channel handle (``libxenevtchn``: one pollable descriptor for many
  ports).

Besides, a platform says where the processes of its host keep what they
share while they run (``run_dir``: lock files such as
:class:`xenback.hostlock.HostLock`'s).

Two implementations exist: :mod:`xenback.sim` (the simulated host, which needs
no hypervisor) and :mod:`xenback.xen` (a real dom0 through cffi).  Backends
receive a :class:`Platform` and never ask which one it is.

Errors are :class:`OSError` subclasses carrying the errno the C library would
have set, so that ``except OSError`` code written for one platform works on
the other.  What both check before anything reaches the hypervisor (the
``domid`` of a grant or event channel call, see :func:`check_domid`; the
refs of a mapping, see :func:`check_grant_refs`; the number of pages shared,
:func:`check_page_count`; an event channel port, :func:`check_port`), they
check here, alike.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from workqueue import shown
from xenback._flags import DOMID_FIRST_RESERVED, is_int

if TYPE_CHECKING:
    import pyxs

__all__ = [
    "DOMID_FIRST_RESERVED",
    "EVTCHN_PORT_MAX",
    "MAX_PAGES_PER_REQUEST",
    "PAGE_SIZE",
    "EventChannel",
    "EventChannelError",
    "GrantError",
    "GrantMapping",
    "GrantShare",
    "GrantTable",
    "Platform",
    "PlatformError",
    "PlatformUnavailable",
    "SharedPages",
    "check_domid",
    "check_grant_refs",
    "check_page_count",
    "check_platform",
    "check_port",
]

#: Size of a grant-mapped page.  Xen's grant ABI is in 4 KiB frames on every
#: architecture we support.
PAGE_SIZE = 4096

#: The largest event channel port any of Xen's event channel ABIs can
#: name: the FIFO ABI's 2**17 ports (``EVTCHN_FIFO_NR_CHANNELS``), port 0
#: being reserved.  See :func:`check_port`.
EVTCHN_PORT_MAX = (1 << 17) - 1

#: The most pages one :meth:`GrantTable.map_grant_refs` or
#: :meth:`GrantShare.share_pages` may cover, on both platforms (see
#: :func:`check_grant_refs` and :func:`check_page_count` for why).
MAX_PAGES_PER_REQUEST = 1024


class PlatformError(OSError):
    """Base class of the errors a platform raises."""


class PlatformUnavailable(PlatformError):
    """The platform cannot be opened on this machine.

    The message names every missing piece (library, device node, XenStore
    socket) so that an operator knows what to install or start.
    """


class GrantError(PlatformError):
    """A grant operation failed (bad reference, wrong domain, read-only...)."""


class EventChannelError(PlatformError):
    """An event channel operation failed (unknown port, dead peer...)."""


@runtime_checkable
class GrantMapping(Protocol):
    """Pages of another domain mapped contiguously into this process.

    ``buffer`` is a memoryview of exactly ``PAGE_SIZE * len(refs)`` bytes; it
    is read-only when the mapping was requested read-only.  After
    :meth:`unmap` the memoryview is released and must not be used.
    """

    @property
    def buffer(self) -> memoryview:
        """The mapped pages, ``PAGE_SIZE * len(refs)`` bytes."""
        ...

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant references mapped, in order."""
        ...

    def unmap(self) -> None:
        """Unmap the pages (``xengnttab_unmap``); idempotent.  Raises
        :class:`GrantError` if the platform refuses: called again, it
        tries again what may still succeed (the pages left mapped, as
        for ENOMEM), and does nothing once what failed cannot (a real
        host's gntdev refusing to release slots: see
        ``xenback.xen._platform.XenGrantMapping.unmap``)."""
        ...

    def __enter__(self) -> GrantMapping: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class GrantTable(Protocol):
    """A ``xengnttab`` handle: maps grants made to this domain."""

    def map_grant_refs(
        self, domid: int, refs: Sequence[int], *, writable: bool = True
    ) -> GrantMapping:
        """Map ``refs`` granted by ``domid`` contiguously, like
        ``xengnttab_map_domain_grant_refs``.  Raises :class:`GrantError`
        (EINVAL for a ``domid`` that is not a domain's, 0 to 0x7FEF: see
        :func:`check_domid`; for no refs, more than
        :data:`MAX_PAGES_PER_REQUEST`, or a ref that is not an int of 0 to
        2**32 - 1, a ``grant_ref_t``: see :func:`check_grant_refs`);
        :class:`TypeError` if ``refs`` is not a sequence at all, or
        ``writable`` not True or False (a flag is never read for its
        truth: ``writable="no"`` must not map writable)."""
        ...

    def close(self) -> None:
        """Close the handle; closing it again does nothing."""
        ...


@runtime_checkable
class SharedPages(Protocol):
    """Pages this domain shares with another one (frontend side)."""

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant references of the pages, in order."""
        ...

    @property
    def buffer(self) -> memoryview:
        """The shared pages, ``PAGE_SIZE * len(refs)`` bytes."""
        ...

    def unshare(self) -> None:
        """End the grants and free the pages (``xengntshr_unshare``)."""
        ...


@runtime_checkable
class GrantShare(Protocol):
    """A ``xengntshr`` handle: allocates pages and grants them to a domain."""

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> SharedPages:
        """Allocate ``count`` zeroed pages granted to ``domid``.
        :class:`GrantError` EINVAL for a ``domid`` that is not a domain's
        (:func:`check_domid`), or a ``count`` that is not an int of 1 to
        :data:`MAX_PAGES_PER_REQUEST` (:func:`check_page_count`);
        :class:`TypeError` if ``writable`` is not True or False."""
        ...

    def close(self) -> None:
        """Close the handle; closing it again does nothing."""
        ...


@runtime_checkable
class EventChannel(Protocol):
    """A ``xenevtchn`` handle with libxenevtchn's semantics.

    :meth:`fileno` becomes readable when a bound port fired.  :meth:`pending`
    returns one fired port (or ``None``); that port stays masked, and further
    notifications are only remembered, until :meth:`unmask` is called.  Drain
    the port's work first, then unmask: this survives event storms.

    Every call taking a port (``remote_port`` of :meth:`bind_interdomain`
    too) says :class:`EventChannelError` EINVAL, before anything is
    called, for a number that is no port: not an int of 1 to
    :data:`EVTCHN_PORT_MAX` (:func:`check_port`).

    The fired ports wait in a queue of the handle's, one entry per port
    (Linux sizes it so), which only an unmask before the port was taken can
    overflow.  Then :meth:`pending` fails with EFBIG until :meth:`reset`.
    """

    def fileno(self) -> int:
        """The descriptor to poll for readability."""
        ...

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind to ``remote_port`` of ``domid``; returns the local port.
        :class:`EventChannelError` EINVAL for a ``domid`` that is not a
        domain's (:func:`check_domid`), then for a ``remote_port`` that is
        no port (:func:`check_port`) or not an unbound port of ``domid``
        for us."""
        ...

    def bind_unbound_port(self, domid: int) -> int:
        """Allocate a local port for ``domid`` to bind to.
        :class:`EventChannelError` EINVAL for a ``domid`` that is not a
        domain's (:func:`check_domid`)."""
        ...

    def notify(self, port: int) -> None:
        """Send an event on local ``port``.  :class:`EventChannelError`
        ENOTCONN for a port this handle has not bound (Linux's evtchn
        driver)."""
        ...

    def pending(self) -> int | None:
        """One fired port, now masked, or ``None`` if none fired."""
        ...

    def unmask(self, port: int) -> None:
        """Let ``port`` fire again."""
        ...

    def unbind(self, port: int) -> None:
        """Close local ``port``.  :class:`EventChannelError` ENOTCONN for
        a port this handle has not bound (Linux's evtchn driver)."""
        ...

    def reset(self) -> None:
        """Empty the handle's queue of fired ports and clear its overflow
        (Linux's ``IOCTL_EVTCHN_RESET``), after :meth:`pending` failed
        with EFBIG.  The ports that fired and were not taken, in the queue
        or lost to the overflow, stay masked until :meth:`unmask`."""
        ...

    def close(self) -> None:
        """Unbind every port and close the handle."""
        ...


@runtime_checkable
class Platform(Protocol):
    """One domain's view of Xen: the only object a backend is given."""

    @property
    def domid(self) -> int:
        """This domain's id."""
        ...

    @property
    def run_dir(self) -> Path:
        """Where this host keeps what its processes share while they run,
        such as lock files (:class:`xenback.hostlock.HostLock`): ``/run``
        on Xen, the run directory of a simulated host (which its domains
        share: a file there names its domain)."""
        ...

    def xenstore(self) -> pyxs.Client:
        """A new, not yet connected :class:`pyxs.Client` for this domain."""
        ...

    def gnttab(self) -> GrantTable:
        """A new grant table handle."""
        ...

    def gntshr(self) -> GrantShare:
        """A new grant share handle."""
        ...

    def evtchn(self) -> EventChannel:
        """A new event channel handle."""
        ...


def check_domid(error: type[PlatformError], domid: int) -> int:
    """``domid``, the peer of a grant or event channel call, as a plain int,
    checked as both platforms check it before anything reaches the
    hypervisor or the service: the id of a domain, 0 to 0x7FEF, an int
    (or an int subclass, as ports: :func:`xenback._flags.is_int`);
    ``error`` with EINVAL otherwise (for any wrong type too, as for a
    grant ref or a port: the C library's answer to a bad number).

    Xen's reserved ids (DOMID_FIRST_RESERVED, 0x7FF0, and up: DOMID_SELF,
    DOMID_IO...) name no peer: a backend's peers are domains, whose ids
    it reads from XenStore, and its own is :attr:`Platform.domid`.  Nor a
    larger number: libxenevtchn and gntdev take a 32-bit domid, which
    the kernel cuts to the hypercalls' 16-bit ``domid_t``, so that
    0x10001 would have reached domain 1.
    """
    if (type(domid) is not int and not is_int(domid)) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise error(errno.EINVAL, f"invalid domain id {shown(domid)} "
                                  f"(a domain's is 0 to {DOMID_FIRST_RESERVED - 1})")
    return int(domid)


def check_grant_refs(refs: Sequence[int]) -> tuple[int, ...]:
    """``refs`` for :meth:`GrantTable.map_grant_refs`, checked as both
    platforms check them before anything reaches the hypervisor or the
    service: a tuple of plain ints.

    :class:`TypeError` naming ``refs`` unless it is a sequence, in its
    order (a set has none), and not a str or bytes-like one, whose
    letters or bytes would be taken for refs (``b"8"`` is grant 56);
    :class:`GrantError` EINVAL for none at all, or a ref that is not a
    ``grant_ref_t``, an int (or an int subclass, as ports:
    :func:`xenback._flags.is_int`) of 0 to 2**32 - 1; and for more than
    :data:`MAX_PAGES_PER_REQUEST` refs, told before any is looked at.

    That cap is the simulated host's (a hostile frontend names how many
    refs to map, and each costs the service), where gntdev would take up
    to its ``limit`` parameter's 65536 (and a ``uint32_t`` count): a
    backend that maps more, refused on the simulated host, would work
    only on Xen, or one tested up to Xen's limits fail on the simulated
    host, which is what one interface for both is there to prevent.  So
    both refuse past the cap, which is twice what the largest ring here
    needs (pvcalls' data ring of 2**9 pages, the most its indexes page
    can name; Linux's frontends use 2**4) and gntalloc's default
    allowance for a whole host.
    """
    if not isinstance(refs, Sequence) or isinstance(refs, str | bytes | bytearray | memoryview):
        raise TypeError(f"refs must be a sequence of grant references (ints), "
                        f"not {type(refs).__name__} {shown(refs)}")
    try:
        count = len(refs)
    except OverflowError:  # a range past sys.maxsize: more than any cap
        raise _too_many("map", "refs", refs) from None
    if count > MAX_PAGES_PER_REQUEST:
        raise _too_many("map", "refs", count)
    checked = []
    for i, ref in enumerate(refs):
        if (type(ref) is not int and not is_int(ref)) or not 0 <= ref <= 0xFFFFFFFF:
            raise GrantError(errno.EINVAL, f"grant reference {shown(ref)} (refs[{i}]) is not "
                                           f"a 32-bit unsigned integer (a grant_ref_t)")
        checked.append(int(ref))
    if not checked:
        # EINVAL, not a TypeError: a frontend's list of refs may well be empty.
        raise GrantError(errno.EINVAL, "no grant references to map")
    if len(checked) > MAX_PAGES_PER_REQUEST:  # a sequence whose len() said less
        raise _too_many("map", "refs", len(checked))
    return tuple(checked)


def _too_many(verb: str, what: str, count: object) -> GrantError:
    return GrantError(errno.EINVAL, f"can {verb} 1..{MAX_PAGES_PER_REQUEST} {what} at once, "
                                    f"not {shown(count)}")


def check_page_count(count: int) -> int:
    """``count``, the pages of :meth:`GrantShare.share_pages`, as a plain
    int, checked as both platforms check it before anything reaches the
    hypervisor or the service: an int (or an int subclass, as ports:
    :func:`xenback._flags.is_int`) of 1 to :data:`MAX_PAGES_PER_REQUEST`;
    :class:`GrantError` EINVAL otherwise.

    The cap is the simulated host's, and Linux's own default for this
    side of a share: gntalloc hands out 1024 grants at most (its
    ``limit`` parameter), all its users together, so that sharing more
    at once, which gntalloc's ``uint32_t`` count would pass on, fails
    on Xen anyway (ENOSPC) but on a host tuned for it.  See
    :func:`check_grant_refs` for why both platforms share it.
    """
    if (type(count) is not int and not is_int(count)) or not 1 <= count <= MAX_PAGES_PER_REQUEST:
        raise _too_many("share", "pages", count)
    return int(count)


def check_port(port: int) -> int:
    """``port``, an event channel port of any :class:`EventChannel` call
    (the local port of notify, unmask and unbind, the remote port of
    bind_interdomain), as a plain int, checked as both platforms check it
    before anything reaches the hypervisor or the service: an int (or an
    int subclass: :func:`xenback._flags.is_int`) of 1 to
    :data:`EVTCHN_PORT_MAX`, 2**17 - 1; :class:`EventChannelError` EINVAL
    otherwise (for any wrong type too: the C library's answer to a bad
    number).

    Why that range: Xen names ports with ``evtchn_port_t``, a
    ``uint32_t``, but no ABI has more than the FIFO ABI's 2**17 ports
    (the 2-level ABI has 4096 on a 64-bit guest, 1024 on a 32-bit one),
    and Xen reserves port 0 in every domain: it is never allocated, so
    never bound.  A number outside is therefore no port on any host, and
    refused alike; within it, whether a port exists is the host's answer
    (ENOTCONN for a local port this handle has not bound, EINVAL for a
    remote port that is not an unbound one for us), as Linux gives it on
    a FIFO host, the default since Xen 4.4.  Not the 2-level ABI's 4095:
    a busy dom0 with FIFO numbers ports past it, and a backend there
    would have its own ports refused.  The simulated host allocates a
    domain's ports within 1 to 4095, the 2-level ABI's (as a domain's
    ``max_event_channels`` bounds it on Xen); past them, it answers as
    for any port not bound.

    Port 0 is refused, EINVAL, also where Linux, handed it, would say
    ENOTCONN (notify, unbind): what no bind ever returned is a caller's
    wrong number, as -1 is, and one rule for every call says so alike.
    """
    if (type(port) is not int and not is_int(port)) or not 1 <= port <= EVTCHN_PORT_MAX:
        raise EventChannelError(errno.EINVAL, f"invalid event channel port {shown(port)} "
                                              f"(a port is 1 to {EVTCHN_PORT_MAX})")
    return int(port)


def check_platform(platform: object) -> None:
    """Raise TypeError, naming the argument, unless ``platform`` is a
    :class:`Platform`: used unchecked, a wrong one (a path, a SimHost
    rather than one of its domains) fails later as a missing attribute,
    naming neither the argument nor what it should have been.

    Its members are looked up without calling them, as ``isinstance()``
    does from Python 3.12 on: 3.11's reads each property, so a platform
    whose ``domid`` asks xenstored failed this check with xenstored's
    error, and a property's own AttributeError made it "not a Platform".
    """
    missing = [name for name in _PLATFORM_MEMBERS if not _has_member(platform, name)]
    if missing:
        raise TypeError(
            f"platform must be a xenback.platform.Platform, not {type(platform).__name__}")


_PLATFORM_MEMBERS = tuple(name for name in vars(Platform) if not name.startswith("_"))


def _has_member(platform: object, name: str) -> bool:
    try:
        value = inspect.getattr_static(platform, name)
    except AttributeError:
        # Only a __getattr__ can have it now (a proxy of a platform); what
        # it runs is that class's own way to have members.
        return hasattr(platform, name)
    # None marks a method not there, as for a Protocol's isinstance().
    return value is not None or isinstance(vars(Platform)[name], property)
