"""PV Calls: a guest's socket calls served by host sockets over Xen shared memory.

:class:`Backend` serves every ``pvcalls`` device of a platform (a dom0 or the
simulated host); :class:`Frontend` is the guest-side library, whose
:meth:`Frontend.socket` gives :class:`PVSocket` objects that behave like
``socket.socket``.  :class:`Policy` restricts what each guest may connect
to and bind::

    from xenback.sim import SimHost
    import pvcalls

    with SimHost() as host, pvcalls.Backend(host.dom0) as backend:
        guest = host.create_domain("guest1")
        with pvcalls.Frontend(guest) as fe, fe.socket() as s:
            s.connect(("127.0.0.1", port))

:meth:`Backend.stats` gives a :class:`BackendStats`: a :class:`SocketStats`
per socket and a :class:`CpuStats` per ioworker CPU.  A backend's
ioworkers use at most ``DEFAULT_MAX_IOWORKERS`` (64) CPUs unless told
otherwise.  A :class:`Policy` is read from a TOML file
(:meth:`Policy.from_file`; the format is in ``help(pvcalls.Policy)``) or
built of :class:`DomainPolicy`, :class:`AccessList` and :class:`Rule`
objects; a malformed one is a :class:`PolicyError`.

The wire format is in :mod:`pvcalls._wire`, Xen's errno numbering in
:mod:`pvcalls._errno`.
"""

from __future__ import annotations

from ._backend import DEFAULT_MAX_IOWORKERS, Backend, BackendStats, CpuStats, SocketStats
from ._policy import AccessList, DomainPolicy, Policy, PolicyError, Rule
from .frontend import Frontend, PVSocket

__all__ = [
    "DEFAULT_MAX_IOWORKERS",
    "AccessList",
    "Backend",
    "BackendStats",
    "CpuStats",
    "DomainPolicy",
    "Frontend",
    "PVSocket",
    "Policy",
    "PolicyError",
    "Rule",
    "SocketStats",
]
