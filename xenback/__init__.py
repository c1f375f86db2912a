"""xenback: write a Xen backend in Python in a page of code.

The pieces, each in a module of its own:

* :mod:`xenback.platform`: the interface to Xen (XenStore, grants, event
  channels) with two implementations, :mod:`xenback.sim` (a simulated host)
  and :mod:`xenback.xen` (a real dom0, ``xenback.xen.open()``);
* :mod:`xenback.xenbus`: :class:`XenbusState`, :class:`BackendDriver` and
  :class:`BackendDevice`, the xenbus state machine a driver plugs into,
  and :class:`DeviceWork`, a device's work item, whose exception fails the
  device;
* :mod:`xenback.xenstore`: :class:`XenStore`, a typed XenStore helper over
  pyxs, and :class:`EventQueue`, calls run one at a time in order on a
  shared workqueue (how watch events reach a device in order);
* :mod:`xenback.ring`: ``ring.h`` request/response rings (:class:`BackRing`,
  :class:`FrontRing`) and flex byte rings (:class:`FlexRing`);
* :mod:`xenback.events`: :class:`EventDispatcher`, an event-channel handle
  and an epoll loop, on a thread of its own or polled by a work item (poll
  mode);
* :mod:`xenback.hostlock`: :class:`HostLock`, one process at a time for a
  job on a host (every :class:`BackendDriver` holds one for its device
  type and domain), refused with :class:`HostLockHeld`;
* :mod:`xenback.ratelimit`: :class:`RateLimit`, the kernel's
  ``printk_ratelimited`` for what a guest can make a backend log;
* :class:`Closing`: the ``with`` mixin of everything whose way out is
  ``close()``;
* errors: :class:`PlatformError`, an :class:`OSError`, and its kinds
  :class:`PlatformUnavailable` (no Xen here: the message names every
  missing piece), :class:`GrantError` and :class:`EventChannelError`;
  :class:`RingError` (the other end broke a ring's protocol);
* ``PAGE_SIZE``: 4096, the size of a granted page;
* :data:`wire`: the cffi declarations of ``ring.h``'s shared ring header,
  ``xs_wire.h``'s ``xsd_sockmsg`` and ``console.h``'s ``xencons_interface``
  (``wire.offsetof("struct xencons_interface", "out_prod")``).

``examples/console_backend.py`` (byte rings) and ``examples/ring_backend.py``
(a ``ring.h`` request/response ring) are complete backends to copy from.
"""

from xenback._closing import Closing
from xenback._wire import ffi as wire
from xenback.events import EventDispatcher
from xenback.hostlock import HostLock, HostLockHeld
from xenback.platform import (
    PAGE_SIZE,
    EventChannelError,
    GrantError,
    Platform,
    PlatformError,
    PlatformUnavailable,
)
from xenback.ratelimit import RateLimit
from xenback.ring import BackRing, FlexRing, FrontRing, RingError
from xenback.xenbus import BackendDevice, BackendDriver, DeviceWork, XenbusState
from xenback.xenstore import EventQueue, XenStore

__all__ = [
    "PAGE_SIZE",
    "BackRing",
    "BackendDevice",
    "BackendDriver",
    "Closing",
    "DeviceWork",
    "EventChannelError",
    "EventDispatcher",
    "EventQueue",
    "FlexRing",
    "FrontRing",
    "GrantError",
    "HostLock",
    "HostLockHeld",
    "Platform",
    "PlatformError",
    "PlatformUnavailable",
    "RateLimit",
    "RingError",
    "XenStore",
    "XenbusState",
    "wire",
]
