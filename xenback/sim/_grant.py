"""Grant tables of the simulated host: the ``xengnttab`` and ``xengntshr`` handles.

Granted pages live in shared-memory files owned by the hypervisor service
(:mod:`xenback.sim._hypervisor`), so a granter and a mapper may be different
processes.  Mapping several refs reserves one address range and maps each
run of pages into it with ``MAP_FIXED``, so that the caller sees one
contiguous buffer, as with ``xengnttab_map_domain_grant_refs``.

Unmapping must not leave a dangling memoryview: a slice taken from
``buffer`` would otherwise point at unmapped memory and crash the process.
So unmap first replaces the granted pages by private zero pages (the grant
is gone from this process at once) and the address range itself is freed
only when the last view of it has been released.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, Self, TypeVar

import cffi

from xenback._closing import Closing
from xenback._flags import check_flag
from xenback.platform import (
    PAGE_SIZE,
    GrantError,
    check_domid,
    check_grant_refs,
    check_page_count,
)

from ._proto import Message, ServiceConnection, close_taken

logger = logging.getLogger(__name__)

_ffi = cffi.FFI()
_ffi.cdef(
    """
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    """
)
_libc: Any = _ffi.dlopen(None)

# The same on every Linux architecture; the mmap module does not export them.
_MAP_FIXED = 0x10
_PROT_NONE = 0
_F_SEAL_FUTURE_WRITE = 0x10  # linux/fcntl.h, not in Python's fcntl module


def _check_mmap(addr: Any, what: str) -> None:
    if int(_ffi.cast("intptr_t", addr)) == -1:
        err = _ffi.errno
        raise GrantError(err, f"{what}: {os.strerror(err)}")


class _Region:
    """A reserved, page-aligned address range.

    Pages are mapped into it with :meth:`map`; :meth:`scrub` replaces them
    all by private zero pages.  The range is unmapped once neither this
    object nor any memoryview uses it.

    The range is reserved by an :class:`mmap.mmap`, whose deallocation
    unmaps it in C.  A finalizer of our own (``ffi.gc`` with a Python
    function) could be cut short by a Ctrl-C as it started, which is only
    printed, and the range would stay mapped for the life of the process.
    """

    def __init__(self, npages: int) -> None:
        size = npages * PAGE_SIZE
        try:
            reservation = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=_PROT_NONE
            )
        except OSError as e:
            raise GrantError(e.errno, f"cannot reserve address space: {e.strerror}") from None
        self.size = size
        # Keeps the reservation alive, as does every buffer made of it.
        self._base = _ffi.from_buffer("char[]", reservation)

    def map(self, page: int, npages: int, fd: int, file_page: int, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(
            self._base + page * PAGE_SIZE,
            npages * PAGE_SIZE,
            prot,
            mmap.MAP_SHARED | _MAP_FIXED,
            fd,
            file_page * PAGE_SIZE,
        )
        _check_mmap(addr, "cannot map granted pages")

    def scrub(self) -> None:
        addr = _libc.mmap(
            self._base,
            self.size,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
            -1,
            0,
        )
        _check_mmap(addr, "cannot unmap granted pages")

    def view(self, writable: bool) -> memoryview:
        view = memoryview(_ffi.buffer(self._base, self.size))
        return view if writable else view.toreadonly()


def _seal_future_writes(fd: int) -> None:
    """Forbid every later writable mapping or write of a read-only share.

    The grantee gets a read-only descriptor already; this also stops one
    that reopens the file through ``/proc`` (same user).  Our own mapping,
    made before, stays writable.  Kernels before 5.1 lack the seal.
    Any other refusal is a :class:`GrantError`, which is what share_pages()
    promises (its apply gives the share back).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise GrantError(e.errno, f"cannot seal a read-only share: {e.strerror}") from None
        logger.debug("no F_SEAL_FUTURE_WRITE on this kernel: %s", e)


def _release(view: memoryview | None) -> None:
    # A view someone re-exported (memoryview(view), numpy...) cannot be
    # released; it keeps pointing at the scrubbed zero pages, harmlessly.
    if view is not None:
        try:
            view.release()
        except BufferError:
            pass


def _unmap_failed(region: _Region) -> None:
    """Scrub ``region``, whose pages an ``apply`` failed to make (the
    connection gives the service's grant back): the error's frames hold
    the region, and whoever keeps the error (a log record, a test, a
    REPL's last traceback) would keep the granted pages mapped here, the
    service taking them for unmapped.  A scrub that fails (logged: the
    error on its way out says more) leaves the region to the garbage
    collector, which unmaps it once the error goes."""
    try:
        region.scrub()
    except GrantError as e:
        logger.warning("pages a failed map or share left stay mapped until collected: %s", e)


# The end of the last page a segment of a map's reply may name: a file
# offset past it is none mmap takes (Linux's MAX_LFS_FILESIZE).
_MAX_FILE_END = (1 << 63) - 1


def _segments(reply: Message, nfds: int, npages: int) -> list[tuple[int, int, int]] | None:
    """The segments of a map's reply, ``(file index, first page, pages)``,
    if they are runs of ``npages`` pages in all, in the ``nfds`` files the
    reply carried; None if not (the service broke the protocol).  Checked
    before any is mapped: fewer pages would leave part of the buffer
    inaccessible (a crash as it is read), more would map a file past the
    region (MAP_FIXED) over whatever follows it in this process."""
    segments = reply.get("segments")
    if type(segments) is not list:
        return None
    runs: list[tuple[int, int, int]] = []
    for segment in segments:
        if (type(segment) is not list or len(segment) != 3
                or any(type(n) is not int for n in segment)):
            return None
        index, file_page, count = segment
        if (not 0 <= index < nfds or file_page < 0 or count < 1
                or (file_page + count) * PAGE_SIZE > _MAX_FILE_END):
            return None
        runs.append((index, file_page, count))
    if sum(count for _, _, count in runs) != npages:
        return None
    return runs


class _Pages:
    """Granted pages as this process sees them: what a mapping and a share
    have in common.  Ending them (:meth:`_end`) scrubs the pages out of this
    process, releases the buffer and tells the service, once."""

    _states = ("live", "ended")  # for repr and errors: (live, ended)

    def __init__(
        self,
        owner: _Handle[Any],
        key: int,
        end_request: tuple[str, dict[str, Any]],
        refs: tuple[int, ...],
        region: _Region,
        writable: bool,
    ) -> None:
        self._owner = owner  # the handle they live through
        self._key = key
        self._end_request = end_request
        self._refs = refs
        # _ending serialises _end(): two threads ending the same pages (an
        # unmap racing the handle's close) must not both tell the service,
        # which may have given the refs to a new share by the second
        # request.  Rule: taken before the handle's lock and the service
        # connection's; held across the request.
        self._ending = threading.Lock()
        # The service's answer to the end request, stored by the call
        # itself (list.extend): nonempty once it was told.
        self._told: list[object] = []
        # The reply's descriptors, taken from the connection with the pages
        # (see _Handle._take) and closed right after; one a Ctrl-C left
        # here is closed by _end().
        self._fds: list[int] = []
        # None once ended: the last step of _end(), so that one cut short
        # is finished by the next.
        self._region: _Region | None = region
        self._buffer: memoryview | None = region.view(writable)

    @property
    def buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError(f"the pages were {self._states[1]}")
        return self._buffer

    @property
    def refs(self) -> tuple[int, ...]:
        return self._refs

    def _end(self) -> None:
        # Every step may be done again, by the next _end() after a Ctrl-C
        # as any call here returned: scrubbing scrubbed pages and
        # releasing a released view do nothing, and the service is told
        # only if its answer was not recorded.
        with self._ending:
            close_taken(self._fds)
            region = self._region
            if region is None:
                return
            region.scrub()
            _release(self._buffer)
            self._buffer = None
            if not self._told:
                # done: the service's answer also reaches _told when it
                # comes to a later call, this one cut short before it.
                done = functools.partial(self._told.append, True)
                try:
                    self._told.extend(map(self._owner._tell, (self._end_request,), (done,)))
                except GrantError:
                    # EINVAL to a request made again: the first one ended
                    # the pages, its answer read in this one's wait.
                    if not self._told:
                        raise
            self._owner._forget(self._key, self)
            self._region = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end()

    def __repr__(self) -> str:
        state = self._states[self._region is None]
        return f"<{type(self).__name__} refs={list(self._refs)} {state}>"


class GrantMapping(_Pages):
    """Pages of another domain mapped contiguously (see :class:`xenback.platform.GrantMapping`)."""

    _states = ("mapped", "unmapped")

    def unmap(self) -> None:
        """Unmap the pages; idempotent.  The memoryview is released."""
        self._end()


class SharedPages(_Pages):
    """Zeroed pages this domain granted to another one."""

    _states = ("shared", "unshared")

    def unshare(self) -> None:
        """End foreign access and free the pages; idempotent.

        The grantee keeps what it already mapped until it unmaps; the refs
        can no longer be mapped anew.
        """
        self._end()


P = TypeVar("P", bound=_Pages)


class _Handle(Closing, Generic[P]):
    """A handle's connection to the service and the pages live through it.

    :meth:`close` ends whatever is still live (unlike ``xengnttab_close``,
    which leaves mappings alone), so that closing a handle never leaves a
    grant in use behind it.
    """

    _kind = "handle"

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        # _lock protects _live and _closed.  Rule: never held across a
        # request to the service (the connection has its own lock), nor
        # across a scrub; taken after a page's _ending lock, and after the
        # connection's (the pages are listed by the reply's apply).
        self._lock = threading.Lock()
        self._live: dict[int, P] = {}
        self._closed = False
        # The region an apply mapped granted pages into, until the step
        # that lists its pages takes it off (see _take); one at most, as
        # applies run one at a time.  It joins in the step that makes it,
        # and an apply that fails (a Ctrl-C before that step, say) scrubs
        # it before the error goes on: the error's frames hold the region,
        # and the pages would stay mapped here, the service taking them
        # for unmapped, for as long as the error is kept.  One a second
        # Ctrl-C left, cutting that scrub short, is scrubbed by the next
        # apply or by close().  Rule: used under the connection's lock
        # (applies run under it), or by close() once the connection is
        # closed (two close() calls at once may both scrub a region:
        # harmless).
        self._unlisted: list[_Region] = []
        # Last, so that a Ctrl-C landing in a step after it cannot drop it
        # unclosed; dropped on its way in, it closes its socket itself.
        self._conn = ServiceConnection(socket_path, GrantError)

    def _check_open(self) -> None:
        with self._lock:
            if self._closed:
                raise GrantError(errno.EBADF, f"the {self._kind} handle is closed")

    def _make_region(self, npages: int) -> _Region:
        """A region for the pages an apply makes, in _unlisted (under the
        connection's lock); first, what an apply cut short left there."""
        self._scrub_unlisted()
        # list.extend() stores the region before a signal's handler can run.
        self._unlisted.extend(map(_Region, (npages,)))
        return self._unlisted[-1]

    def _scrub_unlisted(self) -> None:
        """Scrub the region of pages an apply made and did not list (see
        _unlisted).  It stays there until scrubbed: a Ctrl-C in between
        leaves it to be scrubbed again, which changes nothing."""
        unlisted = self._unlisted
        while unlisted:
            region = unlisted[-1]
            _unmap_failed(region)
            try:
                unlisted.remove(region)
            except ValueError:
                pass  # taken off by a close() in another thread, which scrubbed it too

    def _take(self, key: int, pages: P, fds: list[int]) -> None:
        """List ``pages``, made of a reply whose descriptors are ``fds``
        and of the region in _unlisted (the end of the reply's ``apply``,
        under the connection's lock).

        Until the step that lists them, the reply is the connection's,
        which gives it back if a Ctrl-C lands before (or the handle was
        closed meanwhile): descriptors closed, the service's mapping or
        share released; and the apply scrubs the region.  From that step
        on, the pages are the handle's, live until ended, also if the
        call is cut short before it returns them: its close() ends them.
        """
        with self._lock:
            closed = self._closed
            held = self._live.get(key)
            if not closed and held is not None and not held._told:
                # The key of pages the service still holds for this handle
                # (its bug; once told of their end, it may give the key
                # again): listed over them, those would be lost, never
                # ended.  Given back as any malformed reply.
                raise GrantError(errno.EPROTO, f"the service gave {self._kind} key {key} "
                                 "again, which this handle holds")
            if not closed:
                # One step, as far as a signal goes (no call in between):
                # the pages, their region and the descriptors become the
                # handle's, no longer the apply's and the connection's.
                self._live[key] = pages
                del self._unlisted[:]
                pages._fds = fds[:]
                del fds[:]
                # The pages are mapped: their files are no longer needed.
                # Under the lock, which nobody else takes these pages by
                # (close()) before it is let go of: those a Ctrl-C leaves
                # are closed by _end(), never by two threads at once.
                close_taken(pages._fds)
        if closed:
            # Closed while the request was in flight: close() did not see
            # these pages, which the apply scrubs as it fails.
            raise GrantError(errno.EBADF, f"the {self._kind} handle is closed")

    def _taken(self, key: object) -> P:
        """The pages a call's apply listed under ``key``, for the call to
        return; EBADF if the handle's close() ended them since."""
        with self._lock:
            pages = self._live.get(key) if type(key) is int else None
            if pages is None:
                raise GrantError(errno.EBADF, f"the {self._kind} handle is closed")
            return pages

    def _tell(self, request: tuple[str, dict[str, Any]], done: Callable[[], None]) -> bool:
        """Tell the service that pages ended (``request``: op and args);
        ``done()`` once it said so (see ServiceConnection.call)."""
        op, args = request
        try:
            _, fds = self._conn.call(op, done=done, **args)
            close_taken(fds)  # none are due: a malformed reply's
        except GrantError as e:
            if e.errno != errno.ENODEV:
                raise
            # The host is gone: there is nobody left to tell.
        return True

    def _forget(self, key: int, pages: P) -> None:
        """Forget ``pages``, ended, listed under ``key``; the last step of
        their end, so that close() still finds pages whose end was cut
        short.  Only if still theirs: once the service freed the key (a
        share's first ref), a share made meanwhile may be listed under it."""
        with self._lock:
            if self._live.get(key) is pages:
                del self._live[key]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live.values())
        for pages in live:
            pages._end()
        self._conn.close()
        self._scrub_unlisted()  # no apply runs any more


class GrantTable(_Handle[GrantMapping]):
    """A ``xengnttab`` handle of one domain; :meth:`close` unmaps everything."""

    _kind = "grant table"

    def map_grant_refs(
        self, domid: int, refs: Sequence[int], *, writable: bool = True
    ) -> GrantMapping:
        """Map ``refs`` granted by ``domid`` contiguously.  Raises :class:`GrantError`;
        :class:`TypeError` for a ``writable`` that is not True or False, or
        ``refs`` that is not a sequence (:func:`xenback.platform.check_grant_refs`)."""
        check_flag("writable", writable)
        domid = check_domid(GrantError, domid)  # as the xen platform checks it
        # As the xen platform checks them: a ref past a grant_ref_t must
        # not reach the service as if it could be granted, nor more than
        # both platforms map at once.
        refs = check_grant_refs(refs)
        self._check_open()
        apply = functools.partial(self._take_mapping, refs, writable)
        reply, _ = self._conn.call(
            "gnt_map", apply=apply, domid=domid, refs=list(refs), writable=writable
        )
        return self._taken(reply["handle"])

    def _take_mapping(self, refs: tuple[int, ...], writable: bool,
                      reply: Message, fds: list[int]) -> None:
        """Map the pages a map's reply gave, contiguously, and list them
        (the map's ``apply``).  An error raised here, or a Ctrl-C, before
        they are listed gives the reply back (see :meth:`_take`)."""
        # get(): a reply short of its handle or segments is the service's
        # fault (EPROTO), not a KeyError that would pass for a bug here.
        handle = reply.get("handle")
        segments = _segments(reply, len(fds), len(refs))
        if segments is None or type(handle) is not int:
            raise GrantError(errno.EPROTO, f"a malformed reply from the service: {reply!r}")
        try:
            region = self._make_region(len(refs))
            page = 0
            for index, file_page, npages in segments:
                region.map(page, npages, fds[index], file_page, writable)
                page += npages
            end = ("gnt_unmap", {"handle": handle})
            self._take(handle, GrantMapping(self, handle, end, refs, region, writable), fds)
        except BaseException:
            self._scrub_unlisted()
            raise


class GrantShare(_Handle[SharedPages]):
    """A ``xengntshr`` handle of one domain; :meth:`close` unshares everything."""

    _kind = "grant share"

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> SharedPages:
        """Allocate ``count`` zeroed pages granted to ``domid``.  Raises
        :class:`GrantError`; :class:`TypeError` for a ``writable`` that is not
        True or False."""
        check_flag("writable", writable)
        domid = check_domid(GrantError, domid)
        count = check_page_count(count)  # as the xen platform checks it
        self._check_open()
        apply = functools.partial(self._take_share, count, writable)
        reply, _ = self._conn.call("gnt_share", apply=apply, domid=domid, count=count,
                                   writable=writable)
        # Keyed by the first ref: unique while the share lives.
        return self._taken(reply["refs"][0])

    def _take_share(self, count: int, writable: bool, reply: Message, fds: list[int]) -> None:
        """Map the pages a share's reply gave and list them (the share's
        ``apply``).  An error raised here, or a Ctrl-C, before they are
        listed gives the reply back (see :meth:`_take`)."""
        # Refs are the share's keys and what its end names: any but a list
        # of count of them, each a grant_ref_t (which a peer maps), is the
        # service's fault (EPROTO; get(): none at all, say), not a KeyError
        # or TypeError that would pass for a bug here, nor pages listed
        # under a key share_pages() does not look for.
        given = reply.get("refs")
        if (len(fds) != 1 or type(given) is not list or len(given) != count
                or any(type(ref) is not int or not 0 <= ref <= 0xFFFFFFFF for ref in given)):
            raise GrantError(errno.EPROTO, f"a malformed reply from the service: {reply!r}")
        refs: tuple[int, ...] = tuple(given)
        try:
            region = self._make_region(count)
            region.map(0, count, fds[0], 0, True)
            if not writable:
                _seal_future_writes(fds[0])
            end = ("gnt_end", {"refs": list(refs)})
            self._take(refs[0], SharedPages(self, refs[0], end, refs, region, True), fds)
        except BaseException:
            self._scrub_unlisted()
            raise
