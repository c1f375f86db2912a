"""A domain of the simulated host: its :class:`xenback.platform.Platform`."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyxs

from workqueue import shown
from xenback._flags import check_domain_id
from xenback.platform import PlatformError, PlatformUnavailable

from ._evtchn import EventChannel
from ._grant import GrantShare, GrantTable
from ._hypervisor import domain_socket
from ._proto import Message, ServiceConnection, close_taken

if TYPE_CHECKING:
    from ._toolstack import Toolstack


class Domain:
    """One domain's view of the simulated host.

    Every handle it opens connects to the host through the run directory,
    so a Domain works the same in the host's process and in any other
    (see :func:`attach`).
    """

    def __init__(self, run_dir: Path, domid: int, name: str, xenstore_path: Path) -> None:
        self._run_dir = Path(run_dir)
        self._domid = domid
        self._name = name
        self._xenstore_path = Path(xenstore_path)

    @property
    def domid(self) -> int:
        """The domain's id (0 for dom0)."""
        return self._domid

    @property
    def name(self) -> str:
        """The domain's name (its XenStore ``name`` node)."""
        return self._name

    @property
    def path(self) -> str:
        """The domain's XenStore home, ``/local/domain/<domid>``."""
        return f"/local/domain/{self._domid}"

    @property
    def run_dir(self) -> Path:
        """The run directory of the host this domain lives on (the
        platform's ``run_dir``: shared by all of the host's domains)."""
        return self._run_dir

    @property
    def xenstore_path(self) -> Path:
        """The socket whose connections are this domain (dom0: the main socket)."""
        return self._xenstore_path

    @property
    def toolstack(self) -> Toolstack:
        """The host's toolstack (it acts as dom0, whatever domain this is;
        it holds no connection, so a fresh one per access costs nothing)."""
        from ._toolstack import Toolstack

        return Toolstack(self._run_dir / "xenstored" / "socket")

    def xenstore(self) -> pyxs.Client:
        """A new, unconnected pyxs client that connects as this domain."""
        return pyxs.Client(unix_socket_path=os.fspath(self._xenstore_path))

    def gnttab(self) -> GrantTable:
        """A new grant table handle (``xengnttab``) of this domain."""
        # Made through list.extend(), as evtchn()'s handle is.
        made: list[GrantTable] = []
        try:
            made.extend(map(GrantTable, (domain_socket(self._run_dir, self._domid),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]

    def gntshr(self) -> GrantShare:
        """A new grant share handle (``xengntshr``) of this domain."""
        # Made through list.extend(), as evtchn()'s handle is.
        made: list[GrantShare] = []
        try:
            made.extend(map(GrantShare, (domain_socket(self._run_dir, self._domid),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]

    def evtchn(self) -> EventChannel:
        """A new event channel handle (``xenevtchn``) of this domain."""
        # Made through list.extend(), which stores the handle before
        # control is back in Python code: as ``return EventChannel()``, a
        # Ctrl-C as the constructor returned would lose it, its
        # descriptors open, before our caller had it.
        made: list[EventChannel] = []
        try:
            made.extend(map(EventChannel, (domain_socket(self._run_dir, self._domid),)))
        except BaseException:
            for handle in made:
                handle.close()
            raise
        return made[0]

    def __repr__(self) -> str:
        return f"<Domain {self._domid} {self._name!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Domain):
            return NotImplemented
        return (self._run_dir, self._domid) == (other._run_dir, other._domid)

    def __hash__(self) -> int:
        return hash((self._run_dir, self._domid))


def _domain_of(run_dir: Path, reply: Message, error: type[PlatformError],
               domid: int | None = None) -> Domain:
    """The domain an ``info`` or ``domain_create`` reply names (``domid``:
    the one asked for, if any).  A reply short of a field, or with one of
    the wrong type, or naming another domain, is the service's protocol
    error (EPROTO): not a KeyError or TypeError, nor a Domain whose id or
    name is none."""
    got, name, xenstore_path = reply.get("domid"), reply.get("name"), reply.get("xenstore_path")
    try:
        got = check_domain_id(got)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        got = None
    if (got is None or (domid is not None and got != domid) or type(name) is not str
            or type(xenstore_path) is not str):
        raise error(errno.EPROTO,
                    f"a malformed reply from the simulated hypervisor: {shown(reply)}")
    return Domain(run_dir, got, name, Path(xenstore_path))


def _dom0_call(run_dir: Path, op: str, **args: Any) -> dict[str, Any]:
    path = domain_socket(run_dir, 0)
    try:
        conn = ServiceConnection(path, PlatformError)
    except PlatformError as e:
        raise PlatformUnavailable(
            e.errno or errno.ENOENT, f"no simulated host in {run_dir} ({path}: {e.strerror or e})"
        ) from None
    try:
        reply, fds = conn.call(op, **args)
    finally:
        conn.close()
    close_taken(fds)  # none are due: a malformed reply's
    return reply


def run_dir_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` as an absolute path; ValueError if it is empty.

    ``Path("")`` is the current directory: an empty run directory (say, an
    unset variable) would quietly mean wherever the process happens to run.
    TypeError, naming the argument, for anything but a str path (Path()
    takes no bytes).
    """
    path = os.fspath(run_dir) if isinstance(run_dir, os.PathLike) else run_dir
    if not isinstance(path, str):
        raise TypeError(f"run_dir must be a str or an os.PathLike of str, "
                        f"not {type(path).__name__}")
    if path == "":
        raise ValueError("run_dir is empty (give the host's run directory; "
                         "'.' for the current one)")
    return Path(path).absolute()


def run_dir_argument(text: str) -> Path:
    """The ``type`` of a command's ``--run-dir`` option: the path made
    absolute (:func:`run_dir_path`); an empty one, which would quietly mean
    the current directory, is a usage error."""
    try:
        return run_dir_path(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "empty path (write '.' for the current directory)") from None


def create_domain(run_dir: str | os.PathLike[str], name: str) -> Domain:
    """Ask a running host (embedded or ``xenback-sim``) to create a guest.

    For processes other than the host's; raises
    :class:`~xenback.platform.PlatformError` with ``EINVAL`` for a bad or
    duplicate name, ``ENOMEM`` once the host has no domid left, ``EAGAIN``
    while it has no thread to serve the request (try again later),
    ``ENODEV`` if the host closes before it answers;
    :class:`~xenback.platform.PlatformUnavailable` if no host runs in
    ``run_dir`` (as :func:`attach`); :class:`TypeError` at once for a name
    that is no str, and TypeError or ValueError for a ``run_dir`` as
    :func:`attach` refuses it.
    """
    if not isinstance(name, str):
        raise TypeError(f"a domain name must be a str, not {type(name).__name__} {shown(name)}")
    run_dir = run_dir_path(run_dir)
    reply = _dom0_call(run_dir, "domain_create", name=name)
    return _domain_of(run_dir, reply, PlatformError)


def destroy_domain(run_dir: str | os.PathLike[str], domid: int) -> None:
    """Ask a running host to destroy guest ``domid`` (``ESRCH`` if unknown,
    ``EINVAL`` for dom0, ``EAGAIN``, ``ENODEV`` and PlatformUnavailable
    as :func:`create_domain` says); at once, as :func:`attach`
    checks it, :class:`TypeError` for a ``domid`` that is no int (by the
    rule of ports: True would destroy domain 1) and :class:`ValueError` for
    one that is no domain id (0 to 0x7FEF: 10**5000 would fail in the
    request's JSON, saying only Python's digit limit)."""
    domid = check_domain_id(domid)
    _dom0_call(run_dir_path(run_dir), "domain_destroy", domid=domid)


#: How a connection to a domain's hypervisor socket fails when the domain,
#: or the host, is not there (ECONNREFUSED: its socket outlived its host).
_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ECONNREFUSED})


def attach(run_dir: str | os.PathLike[str], domid: int) -> Domain:
    """Join a running host (embedded or ``xenback-sim``) as domain ``domid``.

    Raises :class:`~xenback.platform.PlatformUnavailable` if there is no
    such host or domain (errno ENOENT, ENOTDIR or ECONNREFUSED) or it
    cannot be reached (the connection's own errno: EMFILE, EACCES...),
    :class:`TypeError` for a ``domid`` that is no int (by the rule of
    ports) or a ``run_dir`` that is no str path, :class:`ValueError` for
    an empty ``run_dir`` or a ``domid`` that is not a domain id (0 to
    0x7FEF).
    """
    domid = check_domain_id(domid)
    run_dir = run_dir_path(run_dir)
    path = domain_socket(run_dir, domid)
    try:
        conn = ServiceConnection(path, PlatformUnavailable)
    except PlatformUnavailable as e:
        if e.errno in _NOT_THERE:
            raise PlatformUnavailable(
                e.errno,
                f"no domain {domid} on a simulated host in {run_dir} ({path}: {e.strerror or e})",
            ) from None
        # Anything else (no descriptors or memory left to connect with)
        # says nothing of whether the domain is there.
        raise PlatformUnavailable(
            e.errno or errno.ENODEV,
            f"cannot join domain {domid} of the simulated host in {run_dir}: {e.strerror or e}",
        ) from None
    try:
        info, fds = conn.call("info")
    finally:
        conn.close()
    close_taken(fds)  # none are due: a malformed reply's
    return _domain_of(run_dir, info, PlatformUnavailable, domid)
