"""pvcalls._wire against the real ``xen/io/pvcalls.h`` compiled by gcc."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pvcalls import _wire
from pvcalls._wire import ffi

# tests/ccheck.py is imported as ``tests.ccheck``: the repository root must
# be importable also when pytest runs as a script.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests import ccheck  # noqa: E402

HEADER = Path("/usr/include/xen/io/pvcalls.h")

# Every member of every structure the protocol defines.
MEMBERS: dict[str, list[str]] = {
    "struct pvcalls_data_intf": [
        "in_cons", "in_prod", "in_error", "pad1", "out_cons", "out_prod", "out_error",
        "pad2", "ring_order", "ref",
    ],
    "struct xen_pvcalls_request": [
        "req_id", "cmd", "u",
        "u.socket.id", "u.socket.domain", "u.socket.type", "u.socket.protocol", "u.socket.pad",
        "u.connect.id", "u.connect.addr", "u.connect.len", "u.connect.flags", "u.connect.ref",
        "u.connect.evtchn", "u.connect.pad",
        "u.release.id", "u.release.reuse", "u.release.pad",
        "u.bind.id", "u.bind.addr", "u.bind.len",
        "u.listen.id", "u.listen.backlog", "u.listen.pad",
        "u.accept.id", "u.accept.id_new", "u.accept.ref", "u.accept.evtchn",
        "u.poll.id", "u.dummy.dummy",
    ],
    "struct xen_pvcalls_response": [
        "req_id", "cmd", "ret", "pad", "u",
        "u.socket.id", "u.connect.id", "u.release.id", "u.bind.id", "u.listen.id",
        "u.accept.id", "u.poll.id", "u.dummy.dummy",
    ],
    "union xen_pvcalls_sring_entry": ["req", "rsp"],
}
# Member types whose sizes are checked too (unions and their structs).
TYPES = [
    "struct xen_pvcalls_socket", "struct xen_pvcalls_connect", "struct xen_pvcalls_release",
    "struct xen_pvcalls_bind", "struct xen_pvcalls_listen", "struct xen_pvcalls_accept",
    "struct xen_pvcalls_poll", "struct xen_pvcalls_dummy", "struct _xen_pvcalls_socket",
    "struct _xen_pvcalls_dummy", "RING_IDX", "grant_ref_t",
]


# Macro values, measured as the size of a char array (ccheck reports sizes).
PROBES = """
struct probe_ring_slots { char n[__CONST_RING_SIZE(xen_pvcalls, 4096)]; };
struct probe_flex1 { char n[XEN_FLEX_RING_SIZE(1)]; };
struct probe_flex4 { char n[XEN_FLEX_RING_SIZE(4)]; };
"""


def _c_layout() -> dict[str, int]:
    """sizeof/offsetof of everything above, from gcc (tests/ccheck.py)."""
    structs = dict(MEMBERS)
    structs.update({name: [] for name in TYPES})
    structs["struct xen_pvcalls_sring"] = ["ring"]
    structs.update({f"struct probe_{n}": [] for n in ("ring_slots", "flex1", "flex4")})
    got = ccheck.c_layout(["xen/io/pvcalls.h"], structs, prelude=PROBES)
    result = {}
    for label, value in got.items():
        if label.startswith("sizeof("):
            result[f"sizeof {label[7:-1]}"] = value
        else:
            type_name, _, member = label[9:-1].partition(", ")
            result[f"{type_name}.{member}"] = value
    result["sizeof xen_pvcalls_sring_header"] = result["struct xen_pvcalls_sring.ring"]
    result["RING_SLOTS"] = result["sizeof struct probe_ring_slots"]
    result["FLEX1"] = result["sizeof struct probe_flex1"]
    result["FLEX4"] = result["sizeof struct probe_flex4"]
    return result


@pytest.fixture(scope="module")
def layout() -> dict[str, int]:
    return _c_layout()


def _cffi_offset(type_name: str, member: str) -> int:
    return ffi.offsetof(type_name, *member.split("."))


def test_every_offset_matches_gcc(layout: dict[str, int]) -> None:
    for type_name, members in MEMBERS.items():
        assert ffi.sizeof(type_name) == layout[f"sizeof {type_name}"], type_name
        for member in members:
            assert _cffi_offset(type_name, member) == layout[f"{type_name}.{member}"], (
                type_name, member)


def test_every_size_matches_gcc(layout: dict[str, int]) -> None:
    for type_name in TYPES:
        assert ffi.sizeof(type_name) == layout[f"sizeof {type_name}"], type_name


def test_derived_constants(layout: dict[str, int]) -> None:
    assert _wire.SRING_HEADER_SIZE == layout["sizeof xen_pvcalls_sring_header"]
    assert _wire.RING_SLOTS == layout["RING_SLOTS"]
    assert _wire.SLOT_SIZE == layout["sizeof union xen_pvcalls_sring_entry"]
    assert _wire.REQUEST_SIZE == layout["sizeof struct xen_pvcalls_request"]
    assert _wire.RESPONSE_SIZE == layout["sizeof struct xen_pvcalls_response"]
    assert _wire.flex_ring_size(4) == layout["FLEX4"]
    assert _wire.flex_ring_size(1) == layout["FLEX1"]
    assert _wire.INDEXES_HEADER_SIZE == layout["struct pvcalls_data_intf.ref"]
    assert (_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET, _wire.IN_ERROR_OFFSET) == (0, 4, 8)
    assert (_wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET, _wire.OUT_ERROR_OFFSET) == (64, 68, 72)
    assert _wire.RING_ORDER_OFFSET == 128


def test_command_numbers_match_header() -> None:
    text = HEADER.read_text() if HEADER.exists() else pytest.skip("no pvcalls.h")
    for number, name in _wire.PVCALLS_COMMANDS.items():
        assert f"#define PVCALLS_{name}" in text
        value = getattr(_wire, f"PVCALLS_{name}")
        assert value == number
        line = next(ln for ln in text.splitlines() if ln.startswith(f"#define PVCALLS_{name} "))
        assert int(line.split()[-1]) == number


def test_page_order_limit_fits_one_indexes_page() -> None:
    limit = _wire.MAX_PAGE_ORDER_LIMIT
    assert _wire.REF_OFFSET + 4 * (1 << limit) <= _wire.PAGE_SIZE
    assert _wire.REF_OFFSET + 4 * (1 << (limit + 1)) > _wire.PAGE_SIZE


def test_sockaddr_round_trip() -> None:
    raw = _wire.pack_sockaddr_in("10.1.2.3", 443)
    assert len(raw) == _wire.SOCKADDR_IN_LEN
    # sa_family in the guest's (the host's) byte order, port and address in the network's.
    assert raw[:2] == _wire.AF_INET.to_bytes(2, sys.byteorder)
    assert raw[2:4] == b"\x01\xbb" and raw[4:8] == bytes([10, 1, 2, 3])
    assert _wire.unpack_sockaddr_in(raw.ljust(28, b"\0"), 16) == ("10.1.2.3", 443)
    # Up to the whole 28-byte field, as a frontend with a larger sockaddr may send.
    assert _wire.unpack_sockaddr_in(raw.ljust(28, b"\0"), 28) == ("10.1.2.3", 443)
    with pytest.raises(ValueError, match="family"):
        _wire.unpack_sockaddr_in(b"\x0a\x00" + raw[2:], 16)
    with pytest.raises(ValueError, match="length"):
        _wire.unpack_sockaddr_in(raw, 4)
    with pytest.raises(ValueError, match="length"):
        _wire.unpack_sockaddr_in(raw, 29)


def test_sockaddr_edges() -> None:
    raw = _wire.pack_sockaddr_in("255.255.255.255", 65535)
    assert raw[2:8] == b"\xff" * 6
    # The first ``length`` bytes only, however few: the port and address are in 8.
    assert _wire.unpack_sockaddr_in(raw[:8], 8) == ("255.255.255.255", 65535)
    # Port 0: BIND to any port.
    assert _wire.unpack_sockaddr_in(_wire.pack_sockaddr_in("0.0.0.0", 0)) == ("0.0.0.0", 0)
    with pytest.raises(ValueError, match="port 65536 out of range"):
        _wire.pack_sockaddr_in("127.0.0.1", 65536)
    with pytest.raises(ValueError, match="port -1 out of range"):
        _wire.pack_sockaddr_in("127.0.0.1", -1)
    # ipaddress would take an int, or 4 packed bytes, for an address.
    for host in (0x7F000001, b"\x7f\x00\x00\x01"):
        with pytest.raises(TypeError, match="dotted IPv4 address string"):
            _wire.pack_sockaddr_in(host, 80)  # type: ignore[arg-type]
