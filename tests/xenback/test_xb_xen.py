"""The real-Xen platform on a machine without Xen (this one): one clear
error naming what is missing, and cffi declarations that match the headers."""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import xenback.xen
from xenback.platform import PlatformUnavailable
from xenback.xen import _platform

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
    # Debian's libraries are installed on the test machine: not reported.
    if _platform._loadable("libxengnttab.so.1") and _platform._loadable("libxenevtchn.so.1"):
        assert "library" not in message


@needs_no_xen
def test_open_names_a_missing_library(monkeypatch) -> None:
    monkeypatch.setattr(_platform, "GNTTAB_LIBRARY", "libxengnttab-absent.so.1")
    with pytest.raises(PlatformUnavailable, match=r"library libxengnttab-absent\.so\.1 \(Debian package libxengnttab1\)"):
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


@needs_no_xen
def test_handles_fail_cleanly_without_the_devices() -> None:
    if not (_platform._loadable("libxengnttab.so.1") and _platform._loadable("libxenevtchn.so.1")):
        pytest.skip("Debian's libxengnttab1/libxenevtchn1 are not installed")
    with pytest.raises(PlatformUnavailable, match="xenevtchn_open"):
        _platform.XenEventChannel()
    with pytest.raises(PlatformUnavailable, match="xengnttab_open"):
        _platform.XenGrantTable()


def test_declarations_match_the_headers(tmp_path) -> None:
    """Our ABI-mode prototypes compiled after the real headers: any
    difference in a type is a conflicting declaration, i.e. a gcc error."""
    gcc = shutil.which("gcc")
    headers = [Path("/usr/include/xengnttab.h"), Path("/usr/include/xenevtchn.h")]
    if gcc is None or not all(h.exists() for h in headers):
        pytest.skip("gcc or libxen-dev headers missing")
    source = tmp_path / "decl.c"
    source.write_text(
        "#include <stdint.h>\n#include <xenevtchn.h>\n#include <xengnttab.h>\n"
        + _platform.CDEF.replace("typedef uint32_t evtchn_port_t;", "")
        + "\nint main(void) { return 0; }\n"
    )
    result = subprocess.run(
        [gcc, "-std=gnu11", "-Werror", "-c", "-o", str(tmp_path / "decl.o"), str(source)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("refs", [[-1], [2**32], [True]], ids=["negative", "huge", "bool"])
def test_frontend_numbers_out_of_range_are_platform_errors(refs) -> None:
    """A frontend's ring-ref or port that does not fit the C library's
    uint32_t is a GrantError/EventChannelError (EINVAL), as on the
    simulated host, not cffi's OverflowError; the library is not called."""
    from xenback.platform import EventChannelError, GrantError

    table = object.__new__(_platform.XenGrantTable)  # no /dev/xen/gntdev here
    with pytest.raises(GrantError, match="grant reference .* 32-bit") as info:
        table.map_grant_refs(1, refs)
    assert info.value.errno == errno.EINVAL
    channel = object.__new__(_platform.XenEventChannel)
    with pytest.raises(EventChannelError, match="event channel port .* 32-bit"):
        channel.bind_interdomain(1, refs[0])
