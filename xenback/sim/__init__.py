"""An embedded simulated Xen host.

Real software speaking Xen's real protocols, so that backends, frontends and
toolstack code run and are tested without a hypervisor::

    from xenback.sim import SimHost

    with SimHost() as host:
        guest = host.create_domain("guest")
        device = host.toolstack.add_device("pvcalls", guest.domid)
        ...

* :class:`SimHost` runs a XenStore server (dom0 on ``run_dir/xenstored/socket``,
  each guest unprivileged on a socket of its own) and the hypervisor service
  (grant tables and event channels, see :mod:`xenback.sim._hypervisor`).
* :class:`Domain` is one domain's :class:`xenback.platform.Platform`.
* :func:`attach` joins a running host from another process: a guest and its
  backend may live in different processes and still share pages and
  event channels.  :func:`create_domain` and :func:`destroy_domain` ask a
  running host for guests from another process (as dom0).
* :class:`Toolstack` adds and removes devices the way libxl does.
* :class:`FrontendDevice` plays a device's frontend on a guest (shares
  pages, allocates a port, publishes them, walks the xenbus states, closes
  as a Linux frontend does): what a test of a backend needs of a guest.
* ``xenback-sim --run-dir DIR`` (or ``python -m xenback.sim``) runs the host
  as a daemon.  :func:`run_dir_argument` and :func:`stdio_problem` are what
  the commands on a simulated host check of their ``--run-dir`` and of
  their standard streams before they start anything (this one's, and
  pvcalls'); :func:`stdio_to_devnull`, what they do with an output whose
  reader is gone.

Isolation is what a domain can do through the interfaces: a guest gets
errors, never another domain's pages, ports or XenStore nodes, and cannot
make the host or a backend block.  Processes of the same user can of course
still reach each other's memory outside them (``/proc``, ``ptrace``); the
simulated host is a test bed, not a security boundary.
"""

from ._domain import Domain, attach, create_domain, destroy_domain, run_dir_argument
from ._evtchn import EventChannel
from ._frontend import FrontendDevice
from ._grant import GrantMapping, GrantShare, GrantTable, SharedPages
from ._host import SimHost
from ._stdio import stdio_problem, stdio_to_devnull
from ._toolstack import Device, Toolstack

__all__ = [
    "Device",
    "Domain",
    "EventChannel",
    "FrontendDevice",
    "GrantMapping",
    "GrantShare",
    "GrantTable",
    "SharedPages",
    "SimHost",
    "Toolstack",
    "attach",
    "create_domain",
    "destroy_domain",
    "run_dir_argument",
    "stdio_problem",
    "stdio_to_devnull",
]
