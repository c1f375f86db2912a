"""xenback._wire against ring.h, xs_wire.h and console.h compiled by gcc."""

from __future__ import annotations

from tests.ccheck import c_layout
from xenback import _wire
from xenback._wire import ffi

# The ring.h shared ring, instantiated the way every protocol does it.
RING_PRELUDE = """
struct xb_req { uint64_t id; uint8_t body[56]; };
struct xb_rsp { uint64_t id; int32_t status; };
DEFINE_RING_TYPES(xb, struct xb_req, struct xb_rsp);
"""

SRING_FIELDS = ["req_prod", "req_event", "rsp_prod", "rsp_event", "pvt", "pvt.pvt_pad",
                "pvt.netif.smartpoll_active", "pvt.tapif_user.msg", "__pad"]
CONS_FIELDS = ["in", "out", "in_cons", "in_prod", "out_cons", "out_prod"]
SOCKMSG_FIELDS = ["type", "req_id", "tx_id", "len"]


def _python_offset(ctype: str, member: str) -> int:
    return ffi.offsetof(ctype, *member.split("."))


def test_sring_header_matches_ring_h() -> None:
    c = c_layout(["xen/io/ring.h"], {"struct xb_sring": SRING_FIELDS + ["ring"]},
                 prelude=RING_PRELUDE)
    for field in SRING_FIELDS:
        assert _python_offset("struct xen_sring_header", field) == c[
            f"offsetof(struct xb_sring, {field})"], field
    # The slots start right after our header.
    assert _wire.SRING_HEADER_SIZE == c["offsetof(struct xb_sring, ring)"] == 64


def test_ring_size_matches_ring_h() -> None:
    from xenback.ring import ring_size

    prelude = RING_PRELUDE + "\nstruct sizes { char a[__CONST_RING_SIZE(xb, 4096)]; " \
        "char b[__CONST_RING_SIZE(xb, 16384)]; };\n"
    c = c_layout(["xen/io/ring.h"], {"union xb_sring_entry": [], "struct sizes": ["b"]},
                 prelude=prelude)
    slot = c["sizeof(union xb_sring_entry)"]
    assert ring_size(4096, slot) == c["offsetof(struct sizes, b)"]
    assert ring_size(16384, slot) == c["sizeof(struct sizes)"] - c["offsetof(struct sizes, b)"]


def test_xencons_interface_matches_console_h() -> None:
    c = c_layout(["xen/io/console.h"], {"struct xencons_interface": CONS_FIELDS})
    assert ffi.sizeof("struct xencons_interface") == c["sizeof(struct xencons_interface)"]
    for field in CONS_FIELDS:
        assert ffi.offsetof("struct xencons_interface", field) == c[
            f"offsetof(struct xencons_interface, {field})"], field
    assert (_wire.XENCONS_IN_SIZE, _wire.XENCONS_OUT_SIZE) == (1024, 2048)


def test_xsd_sockmsg_matches_xs_wire_h() -> None:
    c = c_layout(["xen/io/xs_wire.h"], {"struct xsd_sockmsg": SOCKMSG_FIELDS})
    assert ffi.sizeof("struct xsd_sockmsg") == c["sizeof(struct xsd_sockmsg)"] == 16
    for field in SOCKMSG_FIELDS:
        assert ffi.offsetof("struct xsd_sockmsg", field) == c[
            f"offsetof(struct xsd_sockmsg, {field})"], field


def test_xs_wire_tables_match_the_header() -> None:
    # Operation numbers and error names, read from the header by the compiler.
    prelude = "struct ops { " + " ".join(
        f"char {name}[XS_{name} + 1];" for name in _wire.XS_OPS) + " };"
    c = c_layout(["xen/io/xs_wire.h"], {"struct ops": list(_wire.XS_OPS)}, prelude=prelude)
    names = list(_wire.XS_OPS)
    # Each member's size is its op number + 1: recover it from the offsets.
    offsets = [c[f"offsetof(struct ops, {n})"] for n in names] + [c["sizeof(struct ops)"]]
    for i, name in enumerate(names):
        assert offsets[i + 1] - offsets[i] - 1 == _wire.XS_OPS[name], name
    text = open("/usr/include/xen/io/xs_wire.h").read()
    table = text[text.index("xsd_errors[]"):]
    table = table[: table.index("};")]
    assert [part.split(")")[0] for part in table.split("XSD_ERROR(")[1:]] == list(_wire.XSD_ERRORS)


def test_xenstore_payload_max_matches_xs_wire_h() -> None:
    c = c_layout(["xen/io/xs_wire.h"], {"struct payload": []},
                 prelude="struct payload { char max[XENSTORE_PAYLOAD_MAX]; };")
    assert _wire.XENSTORE_PAYLOAD_MAX == c["sizeof(struct payload)"]
