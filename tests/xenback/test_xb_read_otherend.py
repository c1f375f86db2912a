"""BackendDevice.read_otherend_u32(): a grant reference, a port, a page
order from the frontend, read as strictly as the guest's word deserves."""

from __future__ import annotations

import errno
import sys

import pytest

from xenback import XenbusState
from xenback.sim._xenstored import RawClient

S = XenbusState


@pytest.fixture
def guest_nodes(host, driver, frontends):
    """``(backend device, write, frontend)``: write(key, value) puts a node
    in the frontend's directory, as the guest would."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    fe.wait_backend(S.INIT_WAIT)
    (bdev,) = [d for d in driver.devices() if d.frontend_id == guest.domid]

    # The guest's own connection, raw: XenStore() refuses to write much of
    # what a hostile guest would.
    with RawClient(guest.xenstore_path) as raw:
        def write(key: str, value: str | bytes) -> None:
            raw.write(f"{dev.frontend_path}/{key}", value)

        yield bdev, write, fe


@pytest.fixture
def nodes(guest_nodes):
    """``(backend device, write)``, as guest_nodes."""
    bdev, write, _fe = guest_nodes
    return bdev, write


@pytest.mark.parametrize("text, value", [("0", 0), ("8", 8), ("007", 7),
                                         ("4294967295", 0xFFFFFFFF),
                                         ("0000000000004294967295", 0xFFFFFFFF)])
def test_decimal_digits_are_read_as_linux_reads_them(nodes, text: str, value: int) -> None:
    bdev, write = nodes
    write("ring-ref", text)
    assert bdev.read_otherend_u32("ring-ref") == value


@pytest.mark.parametrize("text", ["-1", "+1", " 1", "1 ", "1_0", "0x10", "", "١", "1\n", "abc"])
def test_anything_but_digits_is_refused_naming_the_node(nodes, text: str) -> None:
    """int() would take a sign, white space, underscores and other scripts'
    digits: a frontend writes none of them, and a broken one is better
    told so than half understood."""
    bdev, write = nodes
    write("port", text)
    with pytest.raises(ValueError) as caught:
        bdev.read_otherend_u32("port")
    assert str(caught.value) == (f"frontend node {bdev.otherend}/port is not a decimal number: "
                                 f"{ascii(text)}")


@pytest.mark.parametrize("text", ["4294967296", "9" * 2000])
def test_beyond_32_bits_is_refused(nodes, text: str) -> None:
    bdev, write = nodes
    write("ring-ref", text)
    with pytest.raises(ValueError) as caught:
        bdev.read_otherend_u32("ring-ref")
    assert str(caught.value) == (f"frontend node {bdev.otherend}/ring-ref is out of range: "
                                 f"{text[:32]}")


def test_a_missing_node_is_refused_unless_there_is_a_default(nodes) -> None:
    """Missing is not wrong (EINVAL): ENOENT, naming the node's path, as
    Linux's backends report a node they cannot read."""
    bdev, _ = nodes
    with pytest.raises(FileNotFoundError) as caught:
        bdev.read_otherend_u32("ring-page-order")
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == f"{bdev.otherend}/ring-page-order"
    assert bdev.read_otherend_u32("ring-page-order", 0) == 0


def test_a_missing_node_is_still_a_value_error_for_callers_catching_that(nodes) -> None:
    """Before it was ENOENT, a missing node was the ValueError of a bad
    value: a driver that catches ValueError around the read (to give a
    default, or to fail the device its own way) must still catch it."""
    bdev, _ = nodes
    with pytest.raises(ValueError) as caught:
        bdev.read_otherend_u32("ring-page-order")
    assert isinstance(caught.value, FileNotFoundError)


def _error_node_after_connect(driver, fe, dom0_xs, key: str) -> str | None:
    """The device's error node once connect() has read ``key`` with
    read_otherend_u32 and so failed the device."""
    driver.connect_hook = lambda dev: dev.read_otherend_u32(key)
    fe.publish()
    fe.wait_backend(S.CLOSING)
    (bdev,) = [d for d in driver.devices() if d.frontend_id == fe.guest.domid]
    return dom0_xs.read(bdev.error_path)


def test_a_missing_node_fails_the_device_with_enoent_naming_its_path(
        guest_nodes, driver, dom0_xs) -> None:
    bdev, _, fe = guest_nodes
    error = _error_node_after_connect(driver, fe, dom0_xs, "ring-page-order")
    assert error == (f"{errno.ENOENT} connecting: frontend node is missing: "
                     f"{bdev.otherend}/ring-page-order")


def test_a_bad_value_fails_the_device_with_einval_naming_path_and_value(
        guest_nodes, driver, dom0_xs) -> None:
    bdev, write, fe = guest_nodes
    write("ring-page-order", "\x1b1")
    error = _error_node_after_connect(driver, fe, dom0_xs, "ring-page-order")
    assert error == (f"{errno.EINVAL} connecting: frontend node {bdev.otherend}/ring-page-order "
                     f"is not a decimal number: '\\x1b1'")


def test_what_is_quoted_of_the_guest_is_short_and_printable(nodes) -> None:
    bdev, write = nodes
    write("port", b"\x1b[2J" + b"x" * 1900)
    with pytest.raises(ValueError) as caught:
        bdev.read_otherend_u32("port")
    message = str(caught.value)
    assert message.isprintable() and "\x1b" not in message and len(message) < 200


def test_the_default_is_checked(nodes) -> None:
    bdev, _ = nodes
    with pytest.raises(ValueError, match="default must be a 32-bit unsigned integer, not -1"):
        bdev.read_otherend_u32("x", -1)
    with pytest.raises(TypeError, match="default must be an int, not str"):
        bdev.read_otherend_u32("x", "0")  # type: ignore[arg-type]
    with pytest.raises(ValueError,
                       match="default must be a 32-bit unsigned integer, not 4294967296"):
        bdev.read_otherend_u32("x", 1 << 32)
    with pytest.raises(TypeError, match="default must be an int, not bool"):
        bdev.read_otherend_u32("x", True)


@pytest.mark.parametrize("text, value", [("9" * 2000, None), ("0" * 2000 + "7", 7)])
def test_a_long_value_is_read_by_its_digits_whatever_int_s_limit(
        nodes, text: str, value: int | None) -> None:
    """A program may lower int()'s limit on digits (down to 640): a value
    longer than that is still out of range, or the number its leading
    zeros pad, never int()'s refusal."""
    bdev, write = nodes
    write("ring-ref", text)
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        if value is None:
            with pytest.raises(ValueError, match=r"/ring-ref is out of range: \d{1,64}$"):
                bdev.read_otherend_u32("ring-ref")
        else:
            assert bdev.read_otherend_u32("ring-ref") == value
    finally:
        sys.set_int_max_str_digits(limit)
