"""The real-Xen platform on a machine without Xen (this one): one clear
error naming what is missing, cffi declarations that match the headers, the
errors of bad requests, and grant pages that end without leaving a stale
view pointing at nothing (a memfd stands in for the grant devices)."""

from __future__ import annotations

import contextlib
import dis
import enum
import errno
import functools
import gc
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, overload

import pytest
from cffi import FFI
from racewindow import TIMEOUT, Attempt, PauseAt, stands_at
from stolensignal import interrupted_at

import xenback.xen
from xenback.platform import PAGE_SIZE, EventChannelError, GrantError, PlatformUnavailable
from xenback.xen import _platform
from xenback.xen._platform import ffi

NO_XEN = not Path("/dev/xen/evtchn").exists()
needs_no_xen = pytest.mark.skipif(not NO_XEN, reason="this machine runs on Xen")


@pytest.fixture(autouse=True)
def _fresh_library_cache():
    _platform._load.cache_clear()
    yield
    _platform._load.cache_clear()


@needs_no_xen
def test_open_names_every_missing_piece(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-such-socket"))
    with pytest.raises(PlatformUnavailable) as info:
        xenback.xen.open()
    message = str(info.value)
    assert info.value.errno == errno.ENODEV
    assert "/dev/xen/gntdev" in message
    assert "/dev/xen/evtchn" in message
    assert f"xenstored socket {tmp_path / 'no-such-socket'}" in message
    # Grants go through the devices, not libxengnttab: never asked for.
    assert "libxengnttab" not in message
    # Debian's libxenevtchn1 is installed on the test machine: not reported.
    if _platform._loadable("libxenevtchn.so.1"):
        assert "library" not in message


@needs_no_xen
def test_open_names_a_missing_library(monkeypatch) -> None:
    monkeypatch.setattr(_platform, "EVTCHN_LIBRARY", "libxenevtchn-absent.so.1")
    with pytest.raises(PlatformUnavailable, match=r"library libxenevtchn-absent\.so\.1 "
                                                  r"\(Debian package libxenevtchn1\)"):
        xenback.xen.open()


@needs_no_xen
def test_a_running_xenstored_is_not_reported(monkeypatch, tmp_path) -> None:
    path = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("XENSTORED_PATH", str(path))
        pieces = xenback.xen.missing_pieces()
    assert not any("xenstored" in p for p in pieces)
    assert any("/dev/xen/evtchn" in p for p in pieces)


def test_xenstored_socket_follows_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    monkeypatch.setenv("XENSTORED_RUNDIR", "/tmp/rundir")
    assert _platform.xenstored_socket() == Path("/tmp/rundir/socket")
    monkeypatch.delenv("XENSTORED_RUNDIR")
    assert _platform.xenstored_socket() == Path("/var/run/xenstored/socket")
    monkeypatch.setenv("XENSTORED_PATH", "")  # set empty: as if unset
    assert _platform.xenstored_socket() == Path("/var/run/xenstored/socket")


@needs_no_xen
def test_handles_fail_cleanly_without_the_devices() -> None:
    for handle, device in ((_platform.XenGrantTable, "/dev/xen/gntdev"),
                           (_platform.XenGrantShare, "/dev/xen/gntalloc")):
        with pytest.raises(PlatformUnavailable, match=f"cannot open {device}") as info:
            handle()
        assert info.value.errno == errno.ENOENT
    if not _platform._loadable("libxenevtchn.so.1"):
        pytest.skip("Debian's libxenevtchn1 is not installed")
    with pytest.raises(PlatformUnavailable, match="xenevtchn_open"):
        _platform.XenEventChannel()


# -- the declarations against the headers -------------------------------------

HEADERS = ["xenevtchn.h", "xen/sys/evtchn.h", "xen/sys/gntdev.h", "xen/sys/gntalloc.h"]


def kernel_constants() -> dict[str, int]:
    """The module's ioctl numbers and gntalloc flags, by their C names."""
    constants = {name: value for name, value in vars(_platform).items()
                 if name.startswith(("IOCTL_GNT", "IOCTL_EVTCHN_", "GNTALLOC_FLAG_"))}
    assert len(constants) == 6, constants
    return constants


def layout_assertions(structs: FFI, constants: dict[str, int]) -> str:
    """C static assertions that each struct ``structs`` declares has, in the
    headers, members of the same types at the same offsets and the same
    size, and that each of ``constants`` has the headers' value."""
    lines = []
    for name in structs.list_types()[1]:
        struct = f"struct {name}"
        if structs.typeof(struct).fields is None:
            continue  # opaque (a library's handle): no layout to compare
        for member, field in structs.typeof(struct).fields:
            where = f"{struct}.{member}"
            lines.append(
                f"_Static_assert(__builtin_types_compatible_p("
                f"__typeof__((({struct} *)0)->{member}), {field.type.cname}), \"{where}: type\");"
            )
            lines.append(f"_Static_assert(offsetof({struct}, {member}) == {field.offset}, "
                         f"\"{where}: offset\");")
        lines.append(f"_Static_assert(sizeof({struct}) == {structs.sizeof(struct)}, "
                     f"\"{struct}: size\");")
    for name, value in constants.items():
        lines.append(f"_Static_assert({name} == {value:#x}, \"{name}\");")
    return "\n".join(lines)


def compile_after_headers(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """gcc -Werror on ``code`` placed after libc's and the Xen headers."""
    gcc = shutil.which("gcc")
    if gcc is None or not all((Path("/usr/include") / h).exists() for h in HEADERS):
        pytest.skip("gcc or libxen-dev headers missing")
    source = tmp_path / "decl.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdint.h>\n#include <sys/types.h>\n"
        "#include <sys/mman.h>\n#include <sys/ioctl.h>\n"
        + "".join(f"#include <{h}>\n" for h in HEADERS)
        + code
        + "\nint main(void) { return 0; }\n"
    )
    return subprocess.run(
        [gcc, "-std=gnu11", "-Werror", "-c", "-o", str(tmp_path / "decl.o"), str(source)],
        capture_output=True,
        text=True,
    )


def test_declarations_match_the_headers(tmp_path) -> None:
    """Our ABI-mode prototypes compiled after the real headers (any
    difference in a type is a conflicting declaration, i.e. a gcc error),
    then the ioctl structs and numbers compared with the headers' by
    static assertions."""
    code = (_platform.CDEF.replace("typedef uint32_t evtchn_port_t;", "")
            + layout_assertions(ffi, kernel_constants()))
    result = compile_after_headers(tmp_path, code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("wrong", ["order", "type", "size", "ioctl"])
def test_the_header_check_sees_a_mismatch(tmp_path, wrong: str) -> None:
    """The check above fails when a member moves, changes its type, the
    struct grows, or an ioctl number is off."""
    members = {
        "order": "uint32_t count; uint64_t index;",
        "type": "int64_t index; uint32_t count;",
        "size": "uint64_t index; uint32_t count; uint32_t pad;",
        "ioctl": "uint64_t index; uint32_t count;",
    }[wrong]
    structs = FFI()
    structs.cdef(f"struct ioctl_gntalloc_dealloc_gref {{ {members} }};")
    constants = {"IOCTL_GNTALLOC_DEALLOC_GREF": _platform.IOCTL_GNTALLOC_DEALLOC_GREF
                 + (1 if wrong == "ioctl" else 0)}
    result = compile_after_headers(tmp_path, layout_assertions(structs, constants))
    assert result.returncode != 0
    expected = "IOCTL_GNTALLOC_DEALLOC_GREF" if wrong == "ioctl" else "ioctl_gntalloc_dealloc_gref"
    assert expected in result.stderr


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize("refs", [[-1], [2**32], [True]], ids=["negative", "huge", "bool"])
def test_frontend_numbers_out_of_range_are_platform_errors(refs) -> None:
    """A frontend's ring-ref or port that does not fit the C library's
    uint32_t is a GrantError/EventChannelError (EINVAL), as on the
    simulated host, not cffi's OverflowError; the library is not called."""
    table = object.__new__(_platform.XenGrantTable)  # no /dev/xen/gntdev here
    with pytest.raises(GrantError, match="grant reference .* 32-bit") as info:
        table.map_grant_refs(1, refs)
    assert info.value.errno == errno.EINVAL
    channel = object.__new__(_platform.XenEventChannel)
    with pytest.raises(EventChannelError, match="invalid event channel port"):
        channel.bind_interdomain(1, refs[0])


@pytest.mark.parametrize(("refs", "shown"), [(5, "int 5"), ("8", "str '8'"), (b"8", "bytes b'8'"),
                                             ({8}, "set {8}"), (None, "NoneType None")])
def test_refs_must_be_a_sequence_before_any_ioctl(refs: object, shown: str) -> None:
    """As on the simulated host (one check for both): TypeError naming
    refs, not "'int' object is not iterable", nor b"8" mapped as grant 56."""
    table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    with pytest.raises(TypeError, match=rf"^refs must be a sequence of grant references "
                                        rf"\(ints\), not {re.escape(shown)}$"):
        table.map_grant_refs(1, refs)  # type: ignore[arg-type]


def test_a_huge_ref_or_domid_is_einval_not_a_digit_limit_error() -> None:
    """10**5000 in a message's repr raised Python's own ValueError of its
    4300-digit limit instead of the GrantError EINVAL."""
    table = object.__new__(_platform.XenGrantTable)
    for call in (lambda: table.map_grant_refs(1, [10**5000]),
                 lambda: table.map_grant_refs(10**5000, [8])):
        with pytest.raises(GrantError, match=r"an int of 16610 bits") as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_bad_domains_and_counts_are_refused_before_any_ioctl() -> None:
    table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    with pytest.raises(GrantError,
                       match=r"invalid domain id 4294967296 \(a domain's is 0 to 32751\)") as info:
        table.map_grant_refs(2**32, [8])
    assert info.value.errno == errno.EINVAL
    with pytest.raises(GrantError, match="no grant references") as info:
        table.map_grant_refs(1, [])
    assert info.value.errno == errno.EINVAL
    share = object.__new__(_platform.XenGrantShare)
    with pytest.raises(GrantError, match="invalid domain id 65536") as info:
        share.share_pages(0x10000, 1)
    assert info.value.errno == errno.EINVAL
    for count, text in ((0, "can share 1..1024 pages at once, not 0"),
                        (-1, "at once, not -1"), ("1", "at once, not '1'"),
                        (2**32, "at once, not 4294967296")):
        with pytest.raises(GrantError, match=text) as info:
            share.share_pages(1, count)  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("flag", ["no", "", 0, 1, None])
def test_writable_must_be_true_or_false_before_any_ioctl(flag: object) -> None:
    """As on the simulated host: writable="no" is a TypeError naming the
    argument, not pages mapped or shared writable."""
    message = f"writable must be True or False, not {type(flag).__name__} {flag!r}"
    table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    with pytest.raises(TypeError, match=re.escape(message)):
        table.map_grant_refs(1, [8], writable=flag)  # type: ignore[arg-type]
    share = object.__new__(_platform.XenGrantShare)
    with pytest.raises(TypeError, match=re.escape(message)):
        share.share_pages(1, 1, writable=flag)  # type: ignore[arg-type]


@pytest.fixture
def fake_devices(monkeypatch, tmp_path) -> None:
    """Plain files for /dev/xen/gntdev and gntalloc: they open, and every
    ioctl on them fails with ENOTTY."""
    for name in ("GNTDEV", "GNTALLOC"):
        path = tmp_path / name.lower()
        path.write_bytes(b"")
        monkeypatch.setattr(_platform, name, path)


@pytest.mark.usefixtures("fake_devices")
def test_device_errors_carry_errno_and_say_what_failed() -> None:
    table, share = _platform.XenGrantTable(), _platform.XenGrantShare()
    with pytest.raises(GrantError, match=r"mapping 2 grants \(8, 9\) of domain 1: ") as info:
        table.map_grant_refs(1, [8, 9])
    assert info.value.errno == errno.ENOTTY
    with pytest.raises(GrantError, match="sharing 2 pages with domain 0: ") as info:
        share.share_pages(0, 2)
    assert info.value.errno == errno.ENOTTY
    table.close()
    share.close()
    table.close()  # idempotent
    with pytest.raises(GrantError, match="grant table is closed") as info:
        table.map_grant_refs(1, [8])
    assert info.value.errno == errno.EBADF
    with pytest.raises(GrantError, match="grant share handle is closed") as info:
        share.share_pages(0, 1)
    assert info.value.errno == errno.EBADF


class _Named(int):
    """An int subclass whose str() is not its number (a driver's own class
    may be one): an error message must name the number."""

    def __str__(self) -> str:
        return "guest"


@pytest.mark.usefixtures("fake_devices")
def test_device_errors_name_the_numbers_of_int_subclasses() -> None:
    """Ints by the rule of ports are kept as plain ints: "sharing guest
    pages with domain guest" said nothing."""
    table, share = _platform.XenGrantTable(), _platform.XenGrantShare()
    with pytest.raises(GrantError, match=r"mapping 2 grants \(8, 9\) of domain 1: "):
        table.map_grant_refs(_Named(1), [_Named(8), 9])
    with pytest.raises(GrantError, match="sharing 2 pages with domain 0: "):
        share.share_pages(_Named(0), _Named(2))
    table.close()
    share.close()


# -- ending pages that views still show ---------------------------------------


@pytest.fixture
def granted() -> Iterator[int]:
    """A two-page memfd standing in for granted pages: "secret" at 0,
    "second" at the second page."""
    fd = os.memfd_create("granted")
    os.ftruncate(fd, 2 * PAGE_SIZE)
    os.pwrite(fd, b"secret", 0)
    os.pwrite(fd, b"second", PAGE_SIZE)
    yield fd
    os.close(fd)


def address_of(view: memoryview) -> int:
    with ffi.from_buffer(view, require_writable=False) as pointer:
        return int(ffi.cast("uintptr_t", pointer))


def maps_line(addr: int) -> str | None:
    """The /proc/self/maps line of the range that holds ``addr``, if any."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.rstrip("\n")
    return None


def private_anonymous(line: str | None) -> bool:
    """A maps line of private anonymous memory: no file, no device."""
    assert line is not None
    return line.split()[1].endswith("p") and len(line.split()) == 5


def pages_of(kind: str, fd: int, *, writable: bool = True) -> _platform._DevicePages:
    """Shared pages, or a grant mapping whose table is already closed (so
    that unmapping asks gntdev for nothing), over ``fd``'s two pages."""
    mapped: list[Any] = []
    _platform._map_device(mapped, fd, 0, 2, writable, "mapping the stand-in")
    if kind == "shared":
        return _platform.XenSharedPages(mapped, (5, 6), writable)
    table = _platform.XenGrantTable()
    table.close()
    return _platform.XenGrantMapping(table, 0, mapped, (5, 6), writable)


def end(pages: _platform._DevicePages) -> None:
    if isinstance(pages, _platform.XenGrantMapping):
        pages.unmap()
    else:
        assert isinstance(pages, _platform.XenSharedPages)
        pages.unshare()


KINDS = ["mapping", "shared"]


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("kind", KINDS)
def test_a_slice_held_across_the_end_sees_zeros_and_writes_nowhere(
    granted: int, kind: str, caplog
) -> None:
    pages = pages_of(kind, granted)
    assert repr(pages).endswith(" refs=[5, 6] live>")
    view = pages.buffer
    stale = pages.buffer[0:6]
    last = pages.buffer[PAGE_SIZE:PAGE_SIZE + 6]  # every page goes, not only the first
    addr = address_of(stale)
    assert bytes(stale) == b"secret" and bytes(last) == b"second"
    assert "memfd:granted" in maps_line(addr)
    with caplog.at_level(logging.WARNING, logger=_platform.__name__):
        end(pages)
        end(pages)  # idempotent
    assert [r.getMessage() for r in caplog.records] == [
        "2 grants (5, 6) ended while views of their pages are held: those read zeros from now on"
    ]
    with pytest.raises(ValueError):
        pages.buffer  # noqa: B018
    with pytest.raises(ValueError):
        bytes(view)  # the buffer itself is released
    # The granted pages are gone from this process; zero pages stand in.
    assert repr(pages).endswith(" refs=[5, 6] ended>")
    assert private_anonymous(maps_line(addr))
    assert private_anonymous(maps_line(addr + PAGE_SIZE))
    assert bytes(stale) == bytes(6) and bytes(last) == bytes(6)
    stale[0:6] = b"public"
    assert bytes(stale) == b"public"
    assert os.pread(granted, 6, 0) == b"secret"
    # The zero pages go with the last view.
    del stale, last
    assert maps_line(addr) is None
    assert maps_line(addr + PAGE_SIZE) is None


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("kind", KINDS)
def test_ending_without_views_unmaps_at_once_and_quietly(granted: int, kind: str, caplog) -> None:
    pages = pages_of(kind, granted)
    addr = address_of(pages.buffer)
    with caplog.at_level(logging.WARNING, logger=_platform.__name__):
        end(pages)
    assert caplog.records == []
    assert maps_line(addr) is None
    assert maps_line(addr + PAGE_SIZE) is None


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slice_held", [False, True], ids=["nothing held", "a slice held"])
def test_pages_whose_buffer_its_user_released_end_all_the_same(
        granted: int, kind: str, slice_held: bool, caplog) -> None:
    """:attr:`buffer` released by its user, as ``with pages.buffer as
    view:`` does: ending the pages ends them all the same, the range
    unmapped at once with no view held, else zero pages standing in until
    the slice taken before goes.  _scrub() asked the released buffer what
    it viewed: unmap() and unshare() raised ValueError, gntdev's slots
    left held until the next unmap()."""
    pages = pages_of(kind, granted)
    stale = pages.buffer[0:6] if slice_held else None
    with pages.buffer as view:
        addr = address_of(view)
    with caplog.at_level(logging.WARNING, logger=_platform.__name__):
        end(pages)
        end(pages)  # idempotent
    assert len(caplog.records) == slice_held  # "ended while views of their pages are held"
    if stale is not None:
        assert private_anonymous(maps_line(addr))
        assert bytes(stale) == bytes(6)
        del stale
    assert maps_line(addr) is None
    assert maps_line(addr + PAGE_SIZE) is None


@pytest.mark.usefixtures("fake_devices")
def test_a_read_only_mapping_stays_read_only_after_unmap(granted: int) -> None:
    mapping = pages_of("mapping", granted, writable=False)
    stale = mapping.buffer[0:6]
    assert stale.readonly and bytes(stale) == b"secret"
    end(mapping)
    assert stale.readonly and bytes(stale) == bytes(6)


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("kind", KINDS)
def test_a_scrub_the_kernel_refuses_names_the_grants_and_keeps_the_pages(
        granted: int, kind: str, monkeypatch) -> None:
    """The zero pages refused (ENOMEM): the error names the refs as the
    other messages do, short, and the pages stay, to be ended again."""
    pages = pages_of(kind, granted)
    mmap_pages = _platform._mmap

    def refused(addr: Any, npages: int, prot: int, flags: int, fd: int, offset: int,
                what: str) -> Any:
        raise GrantError(errno.ENOMEM, f"{what}: {os.strerror(errno.ENOMEM)}")

    monkeypatch.setattr(_platform, "_mmap", refused)
    with pytest.raises(GrantError) as info:
        end(pages)
    assert (info.value.errno, info.value.strerror) == (
        errno.ENOMEM, f"replacing 2 grants (5, 6) by zero pages: {os.strerror(errno.ENOMEM)}")
    assert bytes(pages.buffer[0:6]) == b"secret"
    monkeypatch.setattr(_platform, "_mmap", mmap_pages)
    end(pages)
    with pytest.raises(ValueError):
        pages.buffer  # noqa: B018


@pytest.mark.usefixtures("fake_devices")
def test_a_failing_slot_release_is_reported_after_the_pages_are_gone(granted: int) -> None:
    table = _platform.XenGrantTable()  # a plain file: UNMAP_GRANT_REF fails
    mapped: list[Any] = []
    _platform._map_device(mapped, granted, 0, 1, True, "mapping the stand-in")
    mapping = _platform.XenGrantMapping(table, 0, mapped, (5,), True)
    stale = mapping.buffer[0:6]
    with pytest.raises(GrantError, match=r"releasing gntdev's slots of grant 5: ") as info:
        mapping.unmap()
    assert info.value.errno == errno.ENOTTY
    assert bytes(stale) == bytes(6)
    mapping.unmap()  # done: not tried again
    table.close()


# -- the grant devices' ioctls, over a stand-in for the kernel ------------------


def _room(arg: Any) -> int:
    """Bytes of the buffer an ioctl argument made by ``_ioctl_arg`` lives in."""
    (buffer,) = [r for r in gc.get_referents(arg) if isinstance(r, bytearray)]
    return len(buffer)


class FakeGrantLibc:
    """libc as the grant handles call it, gntdev's and gntalloc's ioctls
    answered as the kernel does: records each request with what its
    struct says, and fails those named in ``fail`` ("map", "unmap",
    "alloc", "dealloc", or "mmap" of a device) with their errno.  mmap
    and munmap are libc's own, over a memfd standing in for both devices:
    its page at MAP_INDEX holds b"granted", at ALLOC_INDEX b"shared".
    ``unmapped_twice`` lists the addresses munmapped with no device range
    mapped there (a second munmap could unmap what is mapped there since)."""

    MAP_INDEX = 2 * PAGE_SIZE
    ALLOC_INDEX = PAGE_SIZE
    FIRST_GREF = 100

    def __init__(self, real: Any) -> None:
        self.real = real
        self.requests: list[tuple[object, ...]] = []
        self.fail: dict[str, int] = {}
        self.mapped: set[int] = set()
        self.unmapped_twice: list[int] = []
        self.names = {
            _platform.IOCTL_GNTDEV_MAP_GRANT_REF: "map",
            _platform.IOCTL_GNTDEV_UNMAP_GRANT_REF: "unmap",
            _platform.IOCTL_GNTALLOC_ALLOC_GREF: "alloc",
            _platform.IOCTL_GNTALLOC_DEALLOC_GREF: "dealloc",
        }

    def _failed(self, name: str) -> bool:
        if name not in self.fail:
            return False
        ffi.errno = self.fail[name]
        return True

    def ioctl(self, fd: int, request: int, arg: Any = None) -> int:
        name = self.names.get(request, "unknown")
        if name == "unknown":
            ffi.errno = errno.ENOTTY
            return -1
        if self._failed(name):
            self.requests.append((name, "failed"))
            return -1
        if name == "map":
            op = ffi.cast("struct ioctl_gntdev_map_grant_ref *", arg)
            struct = "struct ioctl_gntdev_map_grant_ref"
            assert _room(arg) >= ffi.offsetof(struct, "refs") + op.count * ffi.sizeof(
                "struct ioctl_gntdev_grant_ref"), "refs past the end of the argument"
            grants = ffi.cast("struct ioctl_gntdev_grant_ref *", op.refs)
            self.requests.append(
                ("map", [(grants[i].domid, grants[i].ref) for i in range(op.count)]))
            op.index = self.MAP_INDEX
        elif name == "unmap":
            op = ffi.cast("struct ioctl_gntdev_unmap_grant_ref *", arg)
            self.requests.append(("unmap", op.index, op.count))
        elif name == "alloc":
            op = ffi.cast("struct ioctl_gntalloc_alloc_gref *", arg)
            struct = "struct ioctl_gntalloc_alloc_gref"
            assert _room(arg) >= ffi.offsetof(struct, "gref_ids") + op.count * 4, \
                "gref_ids past the end of the argument"
            self.requests.append(("alloc", op.domid, op.flags, op.count))
            op.index = self.ALLOC_INDEX
            grefs = ffi.cast("uint32_t *", op.gref_ids)
            for i in range(op.count):
                grefs[i] = self.FIRST_GREF + i
        else:
            op = ffi.cast("struct ioctl_gntalloc_dealloc_gref *", arg)
            self.requests.append(("dealloc", op.index, op.count))
        return 0

    def mmap(self, addr: Any, length: int, prot: int, flags: int, fd: int, offset: int) -> Any:
        if fd != -1 and self._failed("mmap"):  # a device's, not the zero pages
            return ffi.cast("void *", -1)
        mapped = self.real.mmap(addr, length, prot, flags, fd, offset)
        if fd != -1:
            self.mapped.add(int(ffi.cast("uintptr_t", mapped)))
        return mapped

    def munmap(self, addr: Any, length: int) -> int:
        if int(ffi.cast("uintptr_t", addr)) in self.mapped:
            self.mapped.remove(int(ffi.cast("uintptr_t", addr)))
        else:
            self.unmapped_twice.append(int(ffi.cast("uintptr_t", addr)))
        return int(self.real.munmap(addr, length))


@pytest.fixture
def fake_grant_libc(monkeypatch) -> Iterator[FakeGrantLibc]:
    """Both grant devices a four-page memfd; their ioctls FakeGrantLibc's."""
    fd = os.memfd_create("grant-device")
    os.ftruncate(fd, 4 * PAGE_SIZE)
    os.pwrite(fd, b"shared", FakeGrantLibc.ALLOC_INDEX)
    os.pwrite(fd, b"granted", FakeGrantLibc.MAP_INDEX)
    for name in ("GNTDEV", "GNTALLOC"):
        monkeypatch.setattr(_platform, name, Path(f"/proc/self/fd/{fd}"))
    libc = FakeGrantLibc(_platform._libc)
    # Pages an earlier test left in a reference cycle (a pytest.raises'
    # traceback holding its frame) are unmapped by the collector through
    # whatever _libc is then: collected under this fake, their munmap
    # would count as one of an address it never mapped.
    gc.collect()
    monkeypatch.setattr(_platform, "_libc", libc)
    yield libc
    os.close(fd)


def permissions(view: memoryview) -> str:
    """The protection of the pages ``view`` shows, as /proc/self/maps says it."""
    line = maps_line(address_of(view))
    assert line is not None
    return line.split()[1]


@pytest.mark.parametrize("writable", [True, False])
def test_a_mapping_asks_gntdev_for_each_ref_and_maps_the_slots_it_gave(
        fake_grant_libc: FakeGrantLibc, writable: bool) -> None:
    """Every ref goes to MAP_GRANT_REF with its domain, the slots gntdev
    gave are what is mapped (read-only pages for a read-only mapping, not
    only a read-only view of writable ones), and unmapping releases those
    slots, all of them."""
    with _platform.XenGrantTable() as table:
        mapping = table.map_grant_refs(3, [8, 9], writable=writable)
        assert fake_grant_libc.requests == [("map", [(3, 8), (3, 9)])]
        assert mapping.refs == (8, 9)
        assert len(mapping.buffer) == 2 * PAGE_SIZE
        assert bytes(mapping.buffer[:7]) == b"granted"
        assert mapping.buffer.readonly is not writable
        assert permissions(mapping.buffer) == ("rw-s" if writable else "r--s")
        mapping.unmap()
        assert fake_grant_libc.requests[1:] == [("unmap", FakeGrantLibc.MAP_INDEX, 2)]


@pytest.mark.parametrize("view_held", [True, False], ids=["a view held", "no view held"])
def test_an_unmap_interrupted_anywhere_is_finished_by_the_next(
        fake_grant_libc: FakeGrantLibc, view_held: bool) -> None:
    """A Ctrl-C landing at any place of unmap(): a second unmap() finishes
    it, gntdev's slots released exactly once (their index may be another
    mapping's once released), the range unmapped once.  As ``if
    self._scrub(): release``, one landing after the pages were scrubbed,
    before UNMAP_GRANT_REF, left the slots held until the device was
    closed, and the second unmap() did nothing.  With no view of the
    pages held, unmap() unmaps the range itself: it was left to the
    pointer's destructor, a callback of cffi's run as unmap() dropped the
    pointer, which printed and dropped a Ctrl-C landing as it started,
    and left the range mapped.  With a view held the destructor runs as
    the view goes, after unmap()."""
    within = os.path.dirname(xenback.__file__)
    before = _device_mappings()
    landed: list[str] = []
    with _platform.XenGrantTable() as table:
        for n in itertools.count():
            mapping = table.map_grant_refs(3, [8, 9])
            fake_grant_libc.requests.clear()
            view = mapping.buffer[:1] if view_held else None
            address = address_of(mapping.buffer)
            where = interrupted_at(n, within, mapping.unmap)
            mapping.unmap()
            mapping.unmap()  # idempotent
            assert fake_grant_libc.requests == [("unmap", FakeGrantLibc.MAP_INDEX, 2)], where
            del mapping, view
            gc.collect()
            assert _device_mappings() == before, where
            assert address not in fake_grant_libc.mapped, f"{where}: the range is left mapped"
            assert fake_grant_libc.unmapped_twice == [], where
            if not where:
                break
            landed.append(where)
    assert any("XenGrantMapping.unmap" in where for where in landed), landed


def test_the_argument_of_the_most_refs_has_room_for_them_all(
        fake_grant_libc: FakeGrantLibc) -> None:
    """The struct's one-element array really holds every ref (and every
    gref of a share): else the last ones are written past the buffer."""
    fake_grant_libc.fail["mmap"] = errno.ENOMEM  # the ioctls are what is looked at
    with _platform.XenGrantTable() as table, _platform.XenGrantShare() as share:
        with pytest.raises(GrantError):
            table.map_grant_refs(1, range(1024))
        with pytest.raises(GrantError):
            share.share_pages(1, 1024)
    assert fake_grant_libc.requests[0] == ("map", [(1, ref) for ref in range(1024)])
    assert fake_grant_libc.requests[2] == ("alloc", 1, 1, 1024)


def test_a_mapping_mmap_refuses_releases_the_slots_and_says_why(
        fake_grant_libc: FakeGrantLibc) -> None:
    """gntdev maps the grants as they are mmapped, so a bad one fails the
    mmap: the slots MAP_GRANT_REF took are released, and the error is the
    mmap's."""
    fake_grant_libc.fail["mmap"] = errno.EFAULT
    with _platform.XenGrantTable() as table:
        with pytest.raises(GrantError) as info:
            table.map_grant_refs(3, [8])
        assert (info.value.errno, info.value.strerror) == (
            errno.EFAULT, f"mapping grant 8 of domain 3: {os.strerror(errno.EFAULT)}")
        assert fake_grant_libc.requests == [("map", [(3, 8)]),
                                            ("unmap", FakeGrantLibc.MAP_INDEX, 1)]
        assert fake_grant_libc.unmapped_twice == []  # nor MAP_FAILED's address


@pytest.mark.parametrize("writable", [True, False])
def test_a_share_maps_the_pages_gntalloc_gave_and_drops_its_reference(
        fake_grant_libc: FakeGrantLibc, writable: bool) -> None:
    """ALLOC_GREF with the domain, the count and the grantee's right to
    write; the refs are those gntalloc made, the pages those at its index,
    mapped writable whatever the grantee may do (as xengntshr's), and the
    device's own reference is dropped at once (DEALLOC_GREF), so that
    unsharing ends the grants."""
    with _platform.XenGrantShare() as share:
        pages = share.share_pages(4, 2, writable=writable)
        assert fake_grant_libc.requests == [
            ("alloc", 4, _platform.GNTALLOC_FLAG_WRITABLE if writable else 0, 2),
            ("dealloc", FakeGrantLibc.ALLOC_INDEX, 2)]
        assert pages.refs == (100, 101)
        assert len(pages.buffer) == 2 * PAGE_SIZE
        assert bytes(pages.buffer[:6]) == b"shared"
        assert not pages.buffer.readonly and permissions(pages.buffer) == "rw-s"
        pages.unshare()
        assert len(fake_grant_libc.requests) == 2


def test_a_share_whose_mmap_fails_drops_the_grants_and_says_why(
        fake_grant_libc: FakeGrantLibc) -> None:
    fake_grant_libc.fail["mmap"] = errno.ENOMEM
    with _platform.XenGrantShare() as share:
        with pytest.raises(GrantError) as info:
            share.share_pages(4, 2)
        assert (info.value.errno, info.value.strerror) == (
            errno.ENOMEM, f"sharing 2 pages with domain 4: {os.strerror(errno.ENOMEM)}")
    assert fake_grant_libc.requests == [("alloc", 4, 1, 2),
                                        ("dealloc", FakeGrantLibc.ALLOC_INDEX, 2)]
    assert fake_grant_libc.unmapped_twice == []  # nor MAP_FAILED's address



@pytest.mark.parametrize("kind", ["mapping", "shared"])
def test_slots_at_offset_zero_are_given_back_too(fake_grant_libc: FakeGrantLibc,
                                                 kind: str) -> None:
    """gntdev gives the first request of a handle offset 0 (gntalloc may
    too): a failed mmap gives those back as any others.  Taking offset 0
    for "not answered yet" left them until the handle closed."""
    fake_grant_libc.MAP_INDEX = fake_grant_libc.ALLOC_INDEX = 0
    fake_grant_libc.fail["mmap"] = errno.EFAULT
    with _platform.XenGrantTable() as table, _platform.XenGrantShare() as share:
        with pytest.raises(GrantError):
            if kind == "mapping":
                table.map_grant_refs(3, [8])
            else:
                share.share_pages(3, 1)
    assert fake_grant_libc.requests == (
        [("map", [(3, 8)]), ("unmap", 0, 1)] if kind == "mapping"
        else [("alloc", 3, 1, 1), ("dealloc", 0, 1)])


@pytest.mark.parametrize("refused", [False, True])
def test_a_ctrl_c_after_dealloc_answered_logs_only_a_refusal_with_its_errno(
        fake_grant_libc: FakeGrantLibc, refused: bool, monkeypatch, caplog) -> None:
    """A Ctrl-C landing once DEALLOC_GREF has answered, before the caller
    has the pages: the range is unmapped and DEALLOC not asked again; the
    grants staying until the handle closes is logged only if it refused,
    with its errno (the Ctrl-C has none), not EIO."""
    def interrupt(*args: Any) -> Any:
        raise KeyboardInterrupt

    if refused:
        fake_grant_libc.fail["dealloc"] = errno.EINVAL
        # Raised where the refusal's error would be made: after the answer.
        monkeypatch.setattr(_platform, "_error", interrupt)
    else:
        monkeypatch.setattr(_platform, "XenSharedPages", interrupt)
    before = _device_mappings()
    with _platform.XenGrantShare() as share:
        with caplog.at_level(logging.WARNING, logger=_platform.__name__), \
                pytest.raises(KeyboardInterrupt):
            share.share_pages(4, 1)
        assert _device_mappings() == before
    assert fake_grant_libc.unmapped_twice == []
    assert [r[0] for r in fake_grant_libc.requests] == ["alloc", "dealloc"]
    assert [r.getMessage() for r in caplog.records] == ([
        f"dropping gntalloc's reference to grant 100 failed: {os.strerror(errno.EINVAL)}; "
        f"they stay until the grant share handle is closed "
        f"(sharing 1 pages with domain 4 did not complete)"] if refused else [])


@pytest.mark.parametrize("kind", ["mapping", "shared"])
def test_a_failed_mmap_s_error_is_the_answer_when_undoing_it_fails_too(
        fake_grant_libc: FakeGrantLibc, kind: str, caplog) -> None:
    """The mmap failed, then releasing gntdev's slots (or dropping
    gntalloc's grants) failed too: the caller is told of the mmap, the
    request's own error (a frontend's bad grant, EFAULT, or ENOMEM), not
    of the release's, and the leftovers, which the handle's close frees,
    are logged.  The release's error replaced the mmap's, errno and all,
    under the request's message ("mapping grant 8 of domain 3: Inappropriate
    ioctl for device")."""
    fake_grant_libc.fail = {"mmap": errno.EFAULT, "unmap": errno.ENOTTY,
                            "dealloc": errno.ENOTTY}
    with _platform.XenGrantTable() as table, _platform.XenGrantShare() as share:
        with caplog.at_level(logging.WARNING, logger=_platform.__name__), \
                pytest.raises(GrantError) as info:
            if kind == "mapping":
                table.map_grant_refs(3, [8])
            else:
                share.share_pages(3, 1)
    what = "mapping grant 8 of domain 3" if kind == "mapping" else "sharing 1 pages with domain 3"
    assert (info.value.errno, info.value.strerror) == (
        errno.EFAULT, f"{what}: {os.strerror(errno.EFAULT)}")
    undone = ("releasing gntdev's slots of grant 8" if kind == "mapping"
              else "dropping gntalloc's reference to grant 100")
    assert [r.getMessage() for r in caplog.records] == [
        f"{undone} failed: {os.strerror(errno.ENOTTY)}; "
        f"they stay until the {'grant table' if kind == 'mapping' else 'grant share handle'} "
        f"is closed ({what} did not complete)"]


def _device_mappings() -> int:
    """How many ranges of grant devices' stand-ins this process maps (those
    of an earlier test's, had it leaked some, included)."""
    with open("/proc/self/maps") as maps:
        return sum("memfd:grant-device" in line for line in maps)


def _request_or_refusal(request: Callable[[], _platform._DevicePages],
                        made: list[_platform._DevicePages | GrantError]) -> None:
    """``request()``'s pages, or the GrantError it raised, into ``made``."""
    try:
        made.append(request())
    except GrantError as exc:
        made.append(exc)


@pytest.mark.parametrize("kind", ["mapping", "shared", "shared, DEALLOC refused"])
def test_a_request_interrupted_anywhere_leaves_no_pages_and_no_slots(
        fake_grant_libc: FakeGrantLibc, kind: str) -> None:
    """A Ctrl-C landing at any place of map_grant_refs() or share_pages():
    the request raises having unmapped what it mapped and given back what
    MAP_GRANT_REF (ALLOC_GREF) took, or returns pages that work (or, when
    gntalloc refuses to drop its reference, its error).  Landing after
    the mmap, before the pages object owned the range, it lost the
    address: the mapping, and gntdev's slots (gntalloc's grants), stayed
    for the life of the process."""
    within = os.path.dirname(xenback.__file__)
    table, share = _platform.XenGrantTable(), _platform.XenGrantShare()
    request: Callable[[], _platform._DevicePages] = (
        (lambda: table.map_grant_refs(3, [8, 9])) if kind == "mapping"
        else (lambda: share.share_pages(3, 2)))
    taken, given_back = ("map", "unmap") if kind == "mapping" else ("alloc", "dealloc")
    refused = kind.endswith("refused")
    if refused:
        fake_grant_libc.fail["dealloc"] = errno.EINVAL
    before = _device_mappings()
    landed: list[str] = []
    for n in itertools.count():
        fake_grant_libc.requests.clear()
        made: list[_platform._DevicePages | GrantError] = []
        # Not xenback's places: a Ctrl-C lands in the request or not at all.
        # Nor in the undoing of the refusal: a second fault, whose undoing
        # any place of it could stop (the one a Ctrl-C stops is undone).
        where = interrupted_at(n, within, functools.partial(_request_or_refusal, request, made),
                               unless=lambda: isinstance(sys.exc_info()[1], GrantError))
        if not where:
            break
        landed.append(where)
        assert made == [], where
        gc.collect()
        assert _device_mappings() == before, f"interrupted {where}"
        assert fake_grant_libc.unmapped_twice == [], f"interrupted {where}"
        names = [r[0] for r in fake_grant_libc.requests]
        assert names.count(taken) == names.count(given_back), (
            f"interrupted {where}: {fake_grant_libc.requests}")
    if refused:
        (error,) = made
        assert isinstance(error, GrantError) and error.errno == errno.EINVAL
        del error, made
        gc.collect()
        assert _device_mappings() == before
        assert fake_grant_libc.requests == [("alloc", 3, 1, 2), ("dealloc", "failed")]
        assert len(landed) > 10, landed
        return
    (pages,) = made
    assert isinstance(pages, _platform._DevicePages)
    assert _device_mappings() == before + 1
    assert bytes(pages.buffer[:6]) == (b"grante" if kind == "mapping" else b"shared")
    end(pages)
    assert _device_mappings() == before
    names = [r[0] for r in fake_grant_libc.requests]
    assert names == [taken, given_back]
    table.close()
    share.close()
    assert any("after the mmap" in w or "_map_device" in w for w in landed), landed
    assert len(landed) > 10, landed




@pytest.mark.parametrize("kind", ["mapping", "shared"])
def test_a_ctrl_c_as_a_context_manager_is_entered_leaves_the_handle_unlocked(
        fake_grant_libc: FakeGrantLibc, kind: str) -> None:
    """A Ctrl-C landing in map_grant_refs() or share_pages() as a
    contextlib.contextmanager's __enter__ has its generator's value (CPython
    runs a signal's handler as next() returns): while it propagates, the
    handle's lock is free, so that ``with table:`` (or an ``except`` that
    closes the handle) can close it.  _open_fd() was such a generator,
    taking the lock before its yield: landing there left it suspended with
    the lock held and no __exit__ to let go of it until the traceback
    went, and close() in the same thread hung.  (stolensignal's sweeps
    leave that place out: the next() is in a try, its return not.)"""
    table, share = _platform.XenGrantTable(), _platform.XenGrantShare()
    handle = table if kind == "mapping" else share
    enter = contextlib._GeneratorContextManager.__enter__.__code__
    calls = {ins.offset for ins in dis.get_instructions(enter) if ins.opname == "CALL"}
    landed: list[bool] = []
    free: list[bool] = []

    def in_enter(frame: FrameType, event: str, arg: object) -> Any:
        # As next(self.gen) returns with the lock taken by the generator.
        if (event == "opcode" and not landed and frame.f_lasti not in calls
                and handle._lock.locked()):
            landed.append(True)
            raise KeyboardInterrupt
        return in_enter

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code is not enter:
            return None
        frame.f_trace_opcodes = True
        return in_enter

    sys.settrace(tracer)
    try:
        if kind == "mapping":
            table.map_grant_refs(3, [8]).unmap()
        else:
            share.share_pages(3, 1).unshare()
    except KeyboardInterrupt:
        sys.settrace(None)
        # Not a blocking acquire: held here, it would never be freed.
        free.append(handle._lock.acquire(blocking=False))
        if free[-1]:
            handle._lock.release()
    finally:
        sys.settrace(None)
    assert free == landed, "the lock stays held while the Ctrl-C propagates"
    table.close()
    share.close()


@pytest.mark.parametrize("kind", ["mapping", "shared"])
def test_an_undoing_that_fails_after_a_ctrl_c_says_so_without_blaming_an_mmap(
        fake_grant_libc: FakeGrantLibc, kind: str, monkeypatch, caplog) -> None:
    """A Ctrl-C landing as the mmap returned, then the undoing refused:
    the Ctrl-C goes on, the range is unmapped, and the log names the
    leftovers without saying an mmap failed, which none did."""
    fake_grant_libc.fail = {"unmap": errno.ENOTTY, "dealloc": errno.ENOTTY}
    map_device = _platform._map_device

    def interrupted(*args: Any) -> Any:
        map_device(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(_platform, "_map_device", interrupted)
    before = _device_mappings()
    with _platform.XenGrantTable() as table, _platform.XenGrantShare() as share:
        with caplog.at_level(logging.WARNING, logger=_platform.__name__), \
                pytest.raises(KeyboardInterrupt):
            if kind == "mapping":
                table.map_grant_refs(3, [8])
            else:
                share.share_pages(3, 1)
        assert _device_mappings() == before
    if kind == "mapping":
        undone, what, handle = ("releasing gntdev's slots of grant 8",
                                "mapping grant 8 of domain 3", "grant table")
    else:
        undone, what, handle = ("dropping gntalloc's reference to grant 100",
                                "sharing 1 pages with domain 3", "grant share handle")
    assert [r.getMessage() for r in caplog.records] == [
        f"{undone} failed: {os.strerror(errno.ENOTTY)}; they stay until the {handle} is "
        f"closed ({what} did not complete)"]


def test_a_share_whose_reference_stays_says_so_and_keeps_no_pages(
        fake_grant_libc: FakeGrantLibc, caplog) -> None:
    """DEALLOC_GREF refused after the mmap: the share fails with its error,
    unmapped, and the log says that gntalloc's grants stay until the
    handle closes, as when undoing a failed mmap fails; the error alone
    said only that the share failed.  Not asked twice: a second DEALLOC
    cannot do what the first refused."""
    fake_grant_libc.fail["dealloc"] = errno.EINVAL
    before = _device_mappings()
    with _platform.XenGrantShare() as share:
        with caplog.at_level(logging.WARNING, logger=_platform.__name__), \
                pytest.raises(GrantError) as info:
            share.share_pages(4, 2)
        assert _device_mappings() == before
    assert (info.value.errno, info.value.strerror) == (
        errno.EINVAL, f"sharing 2 pages with domain 4: {os.strerror(errno.EINVAL)}")
    assert fake_grant_libc.requests == [("alloc", 4, 1, 2), ("dealloc", "failed")]
    assert [r.getMessage() for r in caplog.records] == [
        f"dropping gntalloc's reference to 2 grants (100, 101) failed: "
        f"{os.strerror(errno.EINVAL)}; they stay until the grant share handle is closed "
        f"(sharing 2 pages with domain 4 did not complete)"]


def test_pages_ended_by_two_threads_at_once_are_ended_once(
        fake_grant_libc: FakeGrantLibc, monkeypatch) -> None:
    """A backend's worker and its close may unmap one mapping at once:
    gntdev's slots are released once, not twice (the second release
    would fail, or free slots gntdev has given out again meanwhile)."""
    with _platform.XenGrantTable() as table:
        mapping = table.map_grant_refs(3, [8])
        scrub = _platform._DevicePages._scrub
        pause = PauseAt.in_method(monkeypatch, _platform._DevicePages, "_scrub", "_mmap(")
        first = Attempt(mapping.unmap)
        assert pause.reached.wait(TIMEOUT)
        second = Attempt(mapping.unmap)
        # Either the second unmap waits for the first, or it ends the pages too.
        deadline = time.monotonic() + TIMEOUT
        while second.thread.is_alive() and not stands_at(
                second.thread.ident or 0, scrub, "with self._lock"):
            assert time.monotonic() < deadline, "unmap() neither returned nor waited"
            time.sleep(0.001)
        pause.resume()
        assert first.result() is None and second.result() is None
    assert fake_grant_libc.requests == [("map", [(3, 8)]), ("unmap", FakeGrantLibc.MAP_INDEX, 1)]


def test_an_unmap_releasing_the_slots_keeps_a_second_from_releasing_them_again(
        fake_grant_libc: FakeGrantLibc, monkeypatch) -> None:
    """A second unmap() while the first one asks gntdev to release the
    slots (the pages gone already): it waits for the answer, and asks
    nothing (the slots' index may be another mapping's by then)."""
    with _platform.XenGrantTable() as table:
        mapping = table.map_grant_refs(3, [8])
        release = _platform.XenGrantTable._release_slots
        pause = PauseAt.in_method(monkeypatch, _platform.XenGrantTable, "_release_slots",
                                  "self._unmap_grant_ref(")
        first = Attempt(mapping.unmap)
        assert pause.reached.wait(TIMEOUT)
        second = Attempt(mapping.unmap)
        # Until the second waits: for the mapping, in its scrub or after
        # it (or, wrongly, for the table).
        waits = (_platform._DevicePages._scrub, _platform.XenGrantMapping.unmap, release)
        deadline = time.monotonic() + TIMEOUT
        while second.thread.is_alive() and not any(
                stands_at(second.thread.ident or 0, func, "with self._lock") for func in waits):
            assert time.monotonic() < deadline, "unmap() neither returned nor waited"
            time.sleep(0.001)
        pause.resume()
        assert first.result() is None and second.result() is None
    assert fake_grant_libc.requests == [("map", [(3, 8)]), ("unmap", FakeGrantLibc.MAP_INDEX, 1)]


@pytest.mark.parametrize("kind", ["gnttab", "gntshr"])
def test_closing_a_grant_handle_waits_for_a_request_in_flight(
        fake_grant_libc: FakeGrantLibc, monkeypatch, kind: str) -> None:
    """The descriptor is closed once the request that uses it has done:
    closed under it, its number could be another open's by the mmap."""
    if kind == "gnttab":
        handle: Any = _platform.XenGrantTable()
        owner: type = _platform.XenGrantTable
        method, request = "map_grant_refs", (lambda: handle.map_grant_refs(3, [8]))
        content = b"granted"
    else:
        handle = _platform.XenGrantShare()
        owner = _platform.XenGrantShare
        method, request = "share_pages", (lambda: handle.share_pages(3, 1))
        content = b"shared"
    pause = PauseAt.in_method(monkeypatch, owner, method, "_ioctl(fd, ")
    requesting = Attempt(request)
    assert pause.reached.wait(TIMEOUT)
    closing = Attempt(handle.close)
    deadline = time.monotonic() + TIMEOUT
    while closing.thread.is_alive() and not stands_at(
            closing.thread.ident or 0, _platform._Device.close, "with self._lock"):
        assert time.monotonic() < deadline, "close() neither returned nor waited for the request"
        time.sleep(0.001)
    assert closing.thread.is_alive(), "closed under the request"
    pause.resume()
    with requesting.result() as pages:
        assert closing.result() is None
        assert bytes(pages.buffer[:len(content)]) == content


def test_a_device_error_without_an_errno_is_eio(fake_grant_libc: FakeGrantLibc) -> None:
    """A failure that set no errno is still an error with one: EIO."""
    fake_grant_libc.fail["map"] = 0
    with _platform.XenGrantTable() as table:
        with pytest.raises(GrantError) as info:
            table.map_grant_refs(3, [8])
    assert info.value.errno == errno.EIO
    assert fake_grant_libc.requests == [("map", "failed")]


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("kind", KINDS)
def test_ending_pages_whose_buffer_is_exported_still_ends_them(
        granted: int, kind: str, caplog) -> None:
    """The buffer cannot be released while something holds a buffer of
    it (cffi, numpy...): the end goes on, and what holds it sees zeros."""
    pages = pages_of(kind, granted)
    exported = ffi.from_buffer(pages.buffer)
    assert ffi.buffer(exported, 6)[:] == b"secret"
    with caplog.at_level(logging.WARNING, logger=_platform.__name__):
        end(pages)
    assert "ended while views of their pages are held" in caplog.text
    assert ffi.buffer(exported, 6)[:] == bytes(6)
    with pytest.raises(ValueError):
        pages.buffer  # noqa: B018


# -- the event channel handle, over a stand-in for libxenevtchn ----------------


class FakeEvtchnLib:
    """libxenevtchn as XenEventChannel calls it: the handle is any cdata
    pointer, its descriptor a pipe's read end.  Records every call, and
    every use of the handle after ``xenevtchn_close`` freed it.  The next
    call named in ``block_in`` waits inside the library until ``release``.
    A call named in ``fail`` returns -1 with its errno; one in ``returns``
    returns its value (0 otherwise)."""

    def __init__(self) -> None:
        self.handle = ffi.new("char[1]")
        self.rfd, self.wfd = os.pipe()
        self.calls: list[str] = []
        self.args: list[tuple[object, ...]] = []
        self.after_free: list[str] = []
        self.freed = False
        self.block_in: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: dict[str, int] = {}
        self.returns: dict[str, int] = {}

    def __getattr__(self, name: str) -> Callable[..., int]:
        if not name.startswith("xenevtchn_"):
            raise AttributeError(name)

        def call(handle: object, *args: int) -> int:
            self.calls.append(name)
            self.args.append(args)
            if handle is not self.handle or self.freed:
                self.after_free.append(name)
            if name == self.block_in:
                self.block_in = None
                self.entered.set()
                assert self.release.wait(TIMEOUT)
            if name == "xenevtchn_close":
                self.freed = True
            if name in self.fail:
                ffi.errno = self.fail[name]
                return -1
            return self.rfd if name == "xenevtchn_fd" else self.returns.get(name, 0)

        return call

    def xenevtchn_open(self, logger: object, flags: int) -> object:
        self.calls.append("xenevtchn_open")
        return self.handle

    def close_fds(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


@pytest.fixture
def fake_evtchn(monkeypatch) -> Iterator[FakeEvtchnLib]:
    lib = FakeEvtchnLib()
    monkeypatch.setattr(_platform, "_load", lambda name: lib)
    yield lib
    lib.release.set()
    lib.close_fds()


def test_a_closed_event_channel_is_ebadf_and_never_reaches_the_library(
        fake_evtchn: FakeEvtchnLib) -> None:
    """As on the simulated host: every call on a closed handle is an
    EventChannelError (EBADF), not cffi's TypeError for a None handle."""
    channel = _platform.XenEventChannel()
    channel.close()
    channel.close()  # idempotent
    calls: list[Callable[[], object]] = [
        channel.fileno, channel.pending, lambda: channel.notify(5), lambda: channel.unmask(5),
        lambda: channel.unbind(5), lambda: channel.bind_interdomain(1, 5),
        lambda: channel.bind_unbound_port(1), channel.reset,
    ]
    for call in calls:
        with pytest.raises(EventChannelError, match="the event channel handle is closed") as info:
            call()
        assert info.value.errno == errno.EBADF
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd", "xenevtchn_close"]


def test_close_waits_for_a_call_in_flight(fake_evtchn: FakeEvtchnLib) -> None:
    """A notify in one thread while another closes the handle: the handle
    is freed only once the call has returned, never under it."""
    channel = _platform.XenEventChannel()
    fake_evtchn.block_in = "xenevtchn_notify"
    notifying = threading.Thread(target=channel.notify, args=(5,))
    notifying.start()
    try:
        assert fake_evtchn.entered.wait(TIMEOUT)
        closing = threading.Thread(target=channel.close)
        closing.start()
        # Either close() frees the handle under the call, or it waits.
        deadline = time.monotonic() + TIMEOUT
        while closing.is_alive() and not stands_at(
                closing.ident or 0, _platform.XenEventChannel.close, "with self._lock"):
            assert time.monotonic() < deadline, "close() neither returned nor waited for the call"
            time.sleep(0.001)
        assert "xenevtchn_close" not in fake_evtchn.calls
    finally:
        fake_evtchn.release.set()
        notifying.join(TIMEOUT)
    closing.join(TIMEOUT)
    assert fake_evtchn.calls[-2:] == ["xenevtchn_notify", "xenevtchn_close"]
    assert fake_evtchn.after_free == []


def test_reset_is_the_evtchn_device_s_ioctl_on_the_handle_s_descriptor(
        fake_evtchn: FakeEvtchnLib) -> None:
    """libxenevtchn has no call for IOCTL_EVTCHN_RESET: it goes to the
    handle's descriptor (here a pipe, which knows no such ioctl), and its
    failure says what failed, with the errno."""
    channel = _platform.XenEventChannel()
    try:
        with pytest.raises(EventChannelError, match="resetting the event channel handle: ") as info:
            channel.reset()
        assert info.value.errno == errno.ENOTTY
        assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd"]
    finally:
        channel.close()


def test_library_failures_carry_the_errno_and_say_what_failed(
        fake_evtchn: FakeEvtchnLib) -> None:
    """Each call's -1 is an EventChannelError with libxenevtchn's errno,
    naming the call and its numbers; EIO if the library set none."""
    channel = _platform.XenEventChannel()
    calls: list[tuple[str, Callable[[], object], int, str]] = [
        ("xenevtchn_bind_interdomain", lambda: channel.bind_interdomain(1, 5), errno.EINVAL,
         "binding port 5 of domain 1"),
        ("xenevtchn_bind_unbound_port", lambda: channel.bind_unbound_port(2), errno.ENOSPC,
         "allocating a port for domain 2"),
        ("xenevtchn_notify", lambda: channel.notify(6), errno.ENOTCONN, "notifying port 6"),
        ("xenevtchn_unmask", lambda: channel.unmask(7), errno.EINVAL, "unmasking port 7"),
        ("xenevtchn_unbind", lambda: channel.unbind(8), errno.ENOTCONN, "unbinding port 8"),
        ("xenevtchn_pending", channel.pending, errno.EFBIG, "reading pending ports"),
        ("xenevtchn_notify", lambda: channel.notify(6), 0, "notifying port 6"),
    ]
    for name, call, code, what in calls:
        fake_evtchn.fail = {name: code}
        with pytest.raises(EventChannelError) as info:
            call()
        code = code or errno.EIO
        assert (info.value.errno, info.value.strerror) == (code, f"{what}: {os.strerror(code)}")
    # Each call alone: a failed bind has no port to give back (its -1, an
    # evtchn_port_t to libxenevtchn, would be an OverflowError of cffi's).
    assert fake_evtchn.calls[2:] == [name for name, *_ in calls]
    channel.close()


def test_a_handle_s_calls_reach_the_library_with_their_numbers(
        fake_evtchn: FakeEvtchnLib) -> None:
    """What each call passes on, in libxenevtchn's order, and the ports it
    returns; pending() is None when nothing fired (the descriptor is
    non-blocking: EAGAIN), not an error nor a wait."""
    channel = _platform.XenEventChannel()
    assert not os.get_blocking(channel.fileno())
    fake_evtchn.returns = {"xenevtchn_bind_interdomain": 11, "xenevtchn_bind_unbound_port": 12,
                           "xenevtchn_pending": 13}
    assert channel.bind_interdomain(1, 5) == 11
    assert channel.bind_unbound_port(2) == 12
    assert channel.pending() == 13
    fake_evtchn.fail = {"xenevtchn_pending": errno.EAGAIN}
    assert channel.pending() is None
    assert fake_evtchn.args[1:] == [(1, 5), (2,), (), ()]
    channel.close()


@pytest.mark.parametrize("which", ["bind_interdomain", "bind_unbound_port"])
def test_a_bind_interrupted_anywhere_unbinds_the_port_it_made(
        fake_evtchn: FakeEvtchnLib, which: str) -> None:
    """A Ctrl-C landing as any call of a bind returns, or as any of its
    frames starts: the bind raises having unbound the port libxenevtchn
    gave it, or returns that port.  As ``self._port(self._call(...))``,
    one as the library's call (or _call) returned lost the number, the
    port bound until the handle closed (the backend's life)."""
    channel = _platform.XenEventChannel()
    name = f"xenevtchn_{which}"
    fake_evtchn.returns = {name: 11}
    bind: Callable[[], object] = ((lambda: channel.bind_interdomain(1, 5))
                                  if which == "bind_interdomain"
                                  else (lambda: channel.bind_unbound_port(1)))
    within = os.path.dirname(xenback.__file__)
    landed: list[str] = []
    try:
        for n in itertools.count():
            fake_evtchn.calls.clear()
            fake_evtchn.args.clear()
            where = interrupted_at(n, within, bind)
            calls = list(zip(fake_evtchn.calls, fake_evtchn.args, strict=True))
            if not where:
                assert calls == [(name, (1, 5) if which == "bind_interdomain" else (1,))]
                break
            landed.append(where)
            unbound = [args for call, args in calls if call == "xenevtchn_unbind"]
            assert unbound == [(11,)] * fake_evtchn.calls.count(name), f"{where}: {calls}"
    finally:
        channel.close()
    assert any(f"XenEventChannel.{which}" in where for where in landed), landed


def test_a_bind_s_give_back_after_a_racing_close_leaves_the_library_alone(
        fake_evtchn: FakeEvtchnLib, monkeypatch) -> None:
    """A bind interrupted after it recorded its port, and the handle closed
    by another thread before the give-back took the lock: closing the
    handle unbound the port, so the give-back calls nothing (on the freed
    handle, and a TypeError of cffi's for None raised over the Ctrl-C)."""

    class Interrupting(int):
        """A port whose check raises: an exception once it is recorded."""

        def __lt__(self, other: object) -> bool:
            raise KeyboardInterrupt

    channel = _platform.XenEventChannel()
    fake_evtchn.returns = {"xenevtchn_bind_unbound_port": Interrupting(11)}
    pause = PauseAt.in_method(monkeypatch, _platform.XenEventChannel, "_give_back",
                              "with self._lock")
    attempt = Attempt(lambda: channel.bind_unbound_port(1))
    assert pause.reached.wait(TIMEOUT)
    channel.close()
    pause.resume()
    assert isinstance(attempt.result(), KeyboardInterrupt)
    assert fake_evtchn.after_free == []
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd", "xenevtchn_bind_unbound_port",
                                 "xenevtchn_close"]


def test_a_handle_interrupted_anywhere_in_its_making_leaves_nothing(
        fake_evtchn: FakeEvtchnLib, tmp_path: Path) -> None:
    """A Ctrl-C landing as any call of XenPlatform.evtchn() returns: the
    factory raises having closed the libxenevtchn handle it opened, or
    returns one that works.  As ``self._handle = xenevtchn_open()`` and
    ``return XenEventChannel()``, one as the call returned lost the handle,
    and its descriptor of /dev/xen/evtchn, for the life of the process."""
    platform = _platform.XenPlatform(0, tmp_path / "socket")
    within = os.path.dirname(xenback.__file__)
    landed: list[str] = []
    for n in itertools.count():
        fake_evtchn.calls.clear()
        made: list[_platform.XenEventChannel] = []
        # This lambda is no place of xenback's: a Ctrl-C lands in
        # evtchn() or not at all.
        where = interrupted_at(n, within, lambda made=made: made.append(platform.evtchn()))
        if not where:
            break
        landed.append(where)
        assert made == [], where
        assert fake_evtchn.calls.count("xenevtchn_open") == fake_evtchn.calls.count(
            "xenevtchn_close"), f"interrupted {where}: {fake_evtchn.calls}"
    (channel,) = made
    channel.notify(5)
    channel.close()
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd", "xenevtchn_notify",
                                 "xenevtchn_close"]
    assert len(landed) > 3, landed


def _device_descriptors(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == str(path)
        except FileNotFoundError:
            pass  # listdir()'s own, or closed meanwhile
    return count


@pytest.mark.usefixtures("fake_devices")
@pytest.mark.parametrize("factory", ["gnttab", "gntshr"])
def test_a_grant_handle_interrupted_anywhere_in_its_making_leaves_nothing(
        tmp_path: Path, factory: str) -> None:
    """A Ctrl-C landing as any call of XenPlatform.gnttab() or gntshr()
    returns: the factory raises having closed the device it opened, or
    returns a handle on it.  As ``return os.open()``, ``self._fd =
    _open_device()`` and ``return XenGrantTable()``, one as the call
    returned lost the descriptor, an int nothing closes, for the life of
    the process."""
    platform = _platform.XenPlatform(0, tmp_path / "socket")
    device = _platform.GNTDEV if factory == "gnttab" else _platform.GNTALLOC
    make = getattr(platform, factory)
    within = os.path.dirname(xenback.__file__)
    landed: list[str] = []
    for n in itertools.count():
        made: list[_platform.XenGrantTable | _platform.XenGrantShare] = []
        # This lambda is no place of xenback's: a Ctrl-C lands in the
        # factory or not at all.
        where = interrupted_at(n, within, lambda made=made: made.append(make()))
        if not where:
            break
        landed.append(where)
        assert made == [], where
        assert _device_descriptors(device) == 0, f"interrupted {where}"
    (handle,) = made
    assert _device_descriptors(device) == 1
    handle.close()
    assert _device_descriptors(device) == 0
    assert len(landed) > 3, landed


@pytest.mark.parametrize("bad", [-1, 2**32, True, "5"], ids=["negative", "huge", "bool", "str"])
def test_event_channel_numbers_out_of_range_are_einval(fake_evtchn: FakeEvtchnLib, bad) -> None:
    """Every port that is none (:func:`xenback.platform.check_port`), and every
    domain id that is not a domain's, is an EventChannelError (EINVAL), as
    on the simulated host, not cffi's OverflowError or TypeError; the
    library is not called."""
    channel = _platform.XenEventChannel()
    calls: list[Callable[[], object]] = [
        lambda: channel.notify(bad), lambda: channel.unmask(bad), lambda: channel.unbind(bad),
        lambda: channel.bind_unbound_port(bad),
    ]
    for call in calls:
        with pytest.raises(EventChannelError,
                           match=r"invalid (event channel port|domain id)") as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd"]
    channel.close()


def test_an_int_subclass_port_reaches_the_library(fake_evtchn: FakeEvtchnLib) -> None:
    """An IntEnum is an int to libxenevtchn's uint32_t, as to the
    simulated host: a backend numbering its ports so works on both.  It
    reaches the library as the plain int it stands for (check_port()'s),
    as the simulated host sends it on: a subclass's own str() or
    __index__ is never what the call or its message goes by."""
    Port = enum.IntEnum("Port", {"RING": 5})
    channel = _platform.XenEventChannel()
    channel.bind_interdomain(1, Port.RING)
    channel.notify(Port.RING)
    channel.unmask(Port.RING)
    channel.unbind(Port.RING)
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd", "xenevtchn_bind_interdomain",
                                 "xenevtchn_notify", "xenevtchn_unmask", "xenevtchn_unbind"]
    assert [tuple(map(type, args)) for args in fake_evtchn.args[-4:]] == [
        (int, int), (int,), (int,), (int,)]
    channel.close()


@pytest.mark.usefixtures("fake_devices")
def test_handles_and_shares_close_on_leaving_with(fake_evtchn: FakeEvtchnLib, granted: int) -> None:
    """As the simulated host's: ``with`` closes a handle and unshares pages,
    so code written as ``with platform.gnttab() as tab:`` runs on both."""
    with _platform.XenGrantTable() as table, _platform.XenGrantShare() as share:
        pass
    with pytest.raises(GrantError, match="grant table is closed"):
        table.map_grant_refs(1, [8])
    with pytest.raises(GrantError, match="grant share handle is closed"):
        share.share_pages(1, 1)
    with _platform.XenEventChannel() as channel:
        pass
    assert fake_evtchn.calls[-1] == "xenevtchn_close"
    with pytest.raises(EventChannelError, match="closed"):
        channel.fileno()
    with pages_of("shared", granted) as pages:
        pass
    with pytest.raises(ValueError):
        pages.buffer  # noqa: B018


def test_two_handles_on_one_domain_are_equal(tmp_path: Path) -> None:
    """As the simulated host's domains are: a backend that refuses a second
    instance for one domain (pvcalls.Backend) must know two open()s for one."""
    sock = tmp_path / "socket"
    one, two = _platform.XenPlatform(0, sock), _platform.XenPlatform(0, sock)
    assert one == two and hash(one) == hash(two)
    assert one != _platform.XenPlatform(1, sock)
    assert one != _platform.XenPlatform(0, tmp_path / "other")
    assert one != object()


def test_the_platform_keeps_what_its_host_s_processes_share_in_run(tmp_path: Path) -> None:
    # All a HostLock asks of it, without Xen.
    from xenback.platform import Platform

    platform = _platform.XenPlatform(0, tmp_path / "socket")
    assert isinstance(platform, Platform)
    assert platform.run_dir == Path("/run")


@pytest.mark.parametrize(("node", "domid"), [(None, 0), ("0", 0), ("7", 7)])
def test_open_reads_our_domid(monkeypatch, node: str | None, domid: int) -> None:
    """Our domain's ``domid`` node, relative to our home; dom0's may be
    missing (xenstored writes none for it)."""
    from xenback.sim import SimHost

    monkeypatch.setattr(_platform, "missing_pieces", lambda: [])
    with SimHost() as host:
        monkeypatch.setenv("XENSTORED_PATH", str(host.xenstore_path))
        with host.dom0.xenstore() as xs:
            if node is None:
                xs.delete(b"/local/domain/0/domid")
            else:
                xs.write(b"/local/domain/0/domid", node.encode())
        assert xenback.xen.open().domid == domid


def test_a_platform_s_xenstore_client_connects_to_its_own_socket(
        monkeypatch, tmp_path) -> None:
    """The socket the platform was opened on, not the environment's of the
    moment (it may have changed since)."""
    from xenback.sim import SimHost
    from xenback.xenstore import XenStore

    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "elsewhere"))
    with SimHost() as host:
        platform = _platform.XenPlatform(0, host.xenstore_path)
        with XenStore(platform.xenstore()) as xs:
            assert xs.read("/local/domain/0/name") == "Domain-0"


def test_open_fails_when_xenstored_hangs_up_under_its_read(monkeypatch, tmp_path) -> None:
    """open() reads our domid with a pyxs client of its own, whose
    request waited for ever for a reply once xenstored hung up (pyxs's
    router ends and tells nobody): it is a platform that cannot be used."""
    from tests.sim.hosthelpers import hang_up_after_one_request

    path = str(tmp_path / "socket")
    server = hang_up_after_one_request(path)
    monkeypatch.setenv("XENSTORED_PATH", path)
    monkeypatch.setattr(_platform, "missing_pieces", lambda: [])
    opener = Attempt(xenback.xen.open)
    exc = opener.result(msg="open() waits for ever for its domid")
    assert isinstance(exc, PlatformUnavailable), repr(exc)
    assert "cannot read our domid from xenstored" in str(exc)
    server.join(TIMEOUT)


def test_open_keeps_the_errno_of_a_xenstored_it_cannot_reach(monkeypatch, tmp_path) -> None:
    """No xenstored at the socket is ENOENT, one refusing ECONNREFUSED (a
    host short of descriptors would be EMFILE): not all one EIO, which is
    what a domid that is no number says."""
    from xenback.sim import SimHost

    monkeypatch.setattr(_platform, "missing_pieces", lambda: [])
    refusing = tmp_path / "refusing"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(refusing))  # never listens: connecting is refused
        for path, code in ((tmp_path / "none", errno.ENOENT), (refusing, errno.ECONNREFUSED)):
            monkeypatch.setenv("XENSTORED_PATH", str(path))
            with pytest.raises(PlatformUnavailable, match="cannot read our domid") as info:
                xenback.xen.open()
            assert info.value.errno == code
    with SimHost() as host:
        monkeypatch.setenv("XENSTORED_PATH", str(host.xenstore_path))
        with host.dom0.xenstore() as xs:
            xs.write(b"/local/domain/0/domid", b"zero")
        with pytest.raises(PlatformUnavailable, match="expected an integer") as info:
            xenback.xen.open()
        assert info.value.errno == errno.EIO


@pytest.mark.parametrize("domid", [
    -1, 0x7FF0, 0x7FF2, 0xFFFF, 0x10001, 2**32 + 1, True, "1", 1.0, None,
    pytest.param(10**5000, id="1e5000")])
def test_both_platforms_refuse_the_same_domain_ids_before_any_call(
        host: Any, fake_evtchn: FakeEvtchnLib, domid: object) -> None:
    """One platform interface, one rule: a domid of a grant or event
    channel call is a domain's, 0 to 0x7FEF, on both platforms, refused
    with the same error before anything is called.  The xen platform
    passed any uint32_t (uint16_t to gntalloc): the reserved ids, which
    the simulated host refused, and 0x10001, which the kernel's domid_t
    (the hypercalls' uint16_t) would have cut to domain 1."""
    real_table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    real_share = object.__new__(_platform.XenGrantShare)
    real_channel = _platform.XenEventChannel()
    calls: list[Callable[[Any, Any, Any], object]] = [
        lambda tab, shr, ch: tab.map_grant_refs(domid, [8]),
        # Both check the domid first: a call wrong twice says the same.
        lambda tab, shr, ch: tab.map_grant_refs(domid, []),
        lambda tab, shr, ch: shr.share_pages(domid, 0),
        lambda tab, shr, ch: ch.bind_interdomain(domid, -1),
        lambda tab, shr, ch: shr.share_pages(domid, 1),
        lambda tab, shr, ch: ch.bind_unbound_port(domid),
        lambda tab, shr, ch: ch.bind_interdomain(domid, 5),
    ]
    dom0 = host.dom0
    with dom0.gnttab() as tab, dom0.gntshr() as shr, dom0.evtchn() as ch:
        for call in calls:
            seen = []
            for handles in ((real_table, real_share, real_channel), (tab, shr, ch)):
                with pytest.raises((GrantError, EventChannelError)) as info:
                    call(*handles)
                seen.append((type(info.value), info.value.errno, str(info.value)))
            assert seen[0] == seen[1]
            assert seen[0][1] == errno.EINVAL
            assert "invalid domain id" in seen[0][2] and len(seen[0][2]) < 120
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd"]
    real_channel.close()


def test_the_last_domain_id_reaches_the_library(fake_evtchn: FakeEvtchnLib) -> None:
    channel = _platform.XenEventChannel()
    channel.bind_unbound_port(0x7FEF)
    channel.bind_interdomain(0, 5)
    assert fake_evtchn.calls[2:] == ["xenevtchn_bind_unbound_port", "xenevtchn_bind_interdomain"]
    channel.close()


# -- one rule of ports and of page counts on both platforms --------------------


@pytest.mark.parametrize("port", [
    0, -1, 1 << 17, 2**32 - 1, 2**32 + 5, True, "5", 5.0, None,
    pytest.param(10**5000, id="1e5000")])
def test_both_platforms_refuse_the_same_ports_before_any_call(
        host: Any, fake_evtchn: FakeEvtchnLib, port: object) -> None:
    """One platform interface, one rule: a port of any event channel call
    is 1 to 2**17 - 1 (the FIFO ABI's, port 0 reserved), refused alike,
    EINVAL, before anything is called.  The xen platform passed any
    uint32_t to libxenevtchn: 0, which the simulated host refused as a
    remote port, and 2**32 - 1, which it refused everywhere."""
    real = _platform.XenEventChannel()
    calls: list[Callable[[Any], object]] = [
        lambda ch: ch.bind_interdomain(0, port),
        lambda ch: ch.notify(port),
        lambda ch: ch.unmask(port),
        lambda ch: ch.unbind(port),
    ]
    with host.dom0.evtchn() as sim:
        for call in calls:
            seen = []
            for channel in (real, sim):
                with pytest.raises(EventChannelError) as info:
                    call(channel)
                seen.append((info.value.errno, str(info.value)))
            assert seen[0] == seen[1]
            assert seen[0][0] == errno.EINVAL
            assert "invalid event channel port" in seen[0][1] and len(seen[0][1]) < 120
    assert fake_evtchn.calls == ["xenevtchn_open", "xenevtchn_fd"]
    real.close()


def test_the_ports_at_the_ends_of_the_range_reach_the_library(
        fake_evtchn: FakeEvtchnLib) -> None:
    channel = _platform.XenEventChannel()
    for port in (1, (1 << 17) - 1):
        channel.bind_interdomain(0, port)
        channel.notify(port)
        channel.unmask(port)
        channel.unbind(port)
    assert fake_evtchn.calls[2:] == ["xenevtchn_bind_interdomain", "xenevtchn_notify",
                                     "xenevtchn_unmask", "xenevtchn_unbind"] * 2
    channel.close()


@pytest.mark.parametrize("port", [99, 4096, (1 << 17) - 1])
def test_a_port_in_the_range_not_bound_is_the_host_s_answer(host: Any, port: int) -> None:
    """Past the simulated host's own 4095 ports, up to the FIFO ABI's, a
    port is one the host has not given: ENOTCONN to notify and unbind, as
    Linux says on a FIFO host, and EINVAL (not an unbound port of the
    peer) to bind to, as Xen says, not the number refused as no port."""
    with host.dom0.evtchn() as ch:
        for call, err in ((ch.notify, errno.ENOTCONN), (ch.unbind, errno.ENOTCONN),
                          (ch.unmask, errno.EINVAL),
                          (lambda p: ch.bind_interdomain(0, p), errno.EINVAL)):
            with pytest.raises(EventChannelError) as info:
                call(port)
            assert info.value.errno == err, call
            assert "invalid event channel port" not in str(info.value)
            # The service's own answer, not its refusal of the number.
            assert re.search(fr"port {port} (is not bound by this handle|of domain 0 is "
                             fr"not an unbound port for 0)", str(info.value)), info.value


@pytest.mark.parametrize("count", [0, -1, 1025, 2**32, True, "1", 1.0, None])
def test_both_platforms_refuse_the_same_page_counts_before_any_ioctl(
        host: Any, count: object) -> None:
    """One cap on the pages of one share, and of one mapping, on both:
    the xen platform passed up to 2**32 - 1 to gntalloc and gntdev, which
    the simulated host refused past 1024 pages, so that a backend could
    work on one and fail on the other."""
    real_table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    real_share = object.__new__(_platform.XenGrantShare)
    dom0 = host.dom0
    with dom0.gnttab() as tab, dom0.gntshr() as shr:
        seen = []
        for share in (real_share, shr):
            with pytest.raises(GrantError) as info:
                share.share_pages(0, count)
            seen.append((info.value.errno, str(info.value)))
        assert seen[0] == seen[1]
        assert seen[0][0] == errno.EINVAL
        assert "can share 1..1024 pages at once" in seen[0][1]
        if type(count) is int and count > 0:
            seen = []
            for table in (real_table, tab):
                with pytest.raises(GrantError) as info:
                    table.map_grant_refs(0, range(count))  # told by len()
                seen.append((info.value.errno, str(info.value)))
            assert seen[0] == seen[1]
            assert seen[0] == (errno.EINVAL, f"[Errno 22] can map 1..1024 refs at once, "
                                             f"not {count}")


class _Understated(Sequence[int]):
    """``n`` refs that len() says are one: told by the refs read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return 1

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice) or not 0 <= i < self.n:
            raise IndexError(i)
        return 8


def test_refs_past_the_cap_are_refused_when_len_said_fewer(host: Any) -> None:
    """check_grant_refs() counts the refs it read too, not only what
    len() said: else gntdev was handed 1025 refs the simulated host
    refuses, the cap kept on one platform only."""
    real_table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    seen = []
    with host.dom0.gnttab() as tab:
        for table in (real_table, tab):
            with pytest.raises(GrantError) as info:
                table.map_grant_refs(0, _Understated(1025))
            seen.append((info.value.errno, str(info.value)))
    assert seen == [(errno.EINVAL, "[Errno 22] can map 1..1024 refs at once, not 1025")] * 2


@pytest.mark.usefixtures("fake_devices")
def test_the_most_pages_of_a_request_reach_the_device() -> None:
    table, share = _platform.XenGrantTable(), _platform.XenGrantShare()
    with pytest.raises(GrantError) as info:
        table.map_grant_refs(1, range(8, 8 + 1024))
    assert info.value.errno == errno.ENOTTY
    # The refs shown short, with how many: all 1024 of them made a
    # message of some 7 KB (gntdev does not say which one failed).
    assert re.fullmatch(r"mapping 1024 grants \(8, 9, 10, 11, 12, 13, \.\.\.\) of domain 1: "
                        r"[^:]*", info.value.strerror), info.value.strerror
    with pytest.raises(GrantError, match="sharing 1024 pages with domain 0: ") as info:
        share.share_pages(0, 1024)
    assert info.value.errno == errno.ENOTTY
    table.close()
    share.close()


def test_refs_past_what_len_can_count_are_refused_alike(host: Any) -> None:
    """A range past sys.maxsize is more refs than any cap, but len() of
    it raises OverflowError: refused as too many, EINVAL, on both
    platforms, not an OverflowError no caller of a platform expects."""
    real_table = object.__new__(_platform.XenGrantTable)  # no device: nothing may reach it
    seen = []
    with host.dom0.gnttab() as tab:
        for table in (real_table, tab):
            with pytest.raises(GrantError) as info:
                table.map_grant_refs(0, range(2**64))
            seen.append((info.value.errno, str(info.value)))
    assert seen == [(errno.EINVAL, "[Errno 22] can map 1..1024 refs at once, "
                                   "not range(0, 18446744073709551616)")] * 2
