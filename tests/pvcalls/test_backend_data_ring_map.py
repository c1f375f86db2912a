"""pvcalls Backend: how a socket's data ring is mapped, and how a ring the
frontend gives again (ours recycles them) is mapped in one request.

The guest's pages are one share: the indexes page, then two sets of data
pages (A and B), so that the indexes page can name either."""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from pvcalls_rawfront import RawFrontend

import pvcalls
from pvcalls import _socket
from pvcalls._socket import CommandError, DataRing
from pvcalls._wire import (
    DEFAULT_MAX_PAGE_ORDER,
    MAX_PAGE_ORDER_LIMIT,
    OUT_PROD_OFFSET,
    PAGE_SIZE,
    REF_OFFSET,
    RING_ORDER_OFFSET,
)
from workqueue import Topology
from xenback.sim import SimHost

ORDER = 2
NPAGES = 1 << ORDER


class Guest:
    """A guest's pages for one ring, granted to dom0, and dom0's grant
    table, which counts its map requests."""

    def __init__(self, host: SimHost) -> None:
        self.domain = host.create_domain("ringer")
        self.gntshr = self.domain.gntshr()
        self.pages = self.gntshr.share_pages(0, 1 + 2 * NPAGES)
        refs = self.pages.refs
        self.indexes, self.a, self.b = refs[0], refs[1 : 1 + NPAGES], refs[1 + NPAGES :]
        self.gnttab = host.dom0.gnttab()
        self.maps: list[tuple[int, ...]] = []
        real_map = self.gnttab.map_grant_refs

        def counted(domid: int, refs: Sequence[int]) -> Any:
            self.maps.append(tuple(refs))
            return real_map(domid, refs)

        self.gnttab.map_grant_refs = counted  # type: ignore[method-assign]

    def lay_out(self, order: int, data: Sequence[int]) -> None:
        """Write ``ring_order`` and ``ref[]`` into the indexes page."""
        page = self.pages.buffer
        struct.pack_into("<I", page, RING_ORDER_OFFSET, order)
        struct.pack_into(f"<{len(data)}I", page, REF_OFFSET, *data)

    def put_out_byte(self, data_set: int, value: bytes) -> None:
        """One byte at the start of the out ring of data set 0 (A) or 1
        (B), published."""
        out_start = (1 + data_set * NPAGES) * PAGE_SIZE + NPAGES * PAGE_SIZE // 2
        self.pages.buffer[out_start : out_start + 1] = value
        struct.pack_into("<I", self.pages.buffer, OUT_PROD_OFFSET, 1)

    def ring(self, hint: tuple[int, ...] | None) -> DataRing:
        return DataRing(self.gnttab, self.domain.domid, self.indexes, ORDER, hint)

    def live_mappings(self) -> int:
        return len(self.gnttab._live)

    @contextlib.contextmanager
    def mapped(self, hint: tuple[int, ...] | None) -> Iterator[DataRing]:
        """The ring, for the block; closed after it, with nothing left mapped."""
        ring = self.ring(hint)
        try:
            yield ring
        finally:
            ring.close()
        assert self.live_mappings() == 0


@pytest.fixture
def guest(host: SimHost) -> Iterator[Guest]:
    g = Guest(host)
    yield g
    g.gnttab.close()
    g.gntshr.close()


def _out_bytes(ring: DataRing) -> bytes:
    return b"".join(bytes(v) for v in ring.out_ring.readable())


def test_without_a_hint_the_ring_is_the_page_s(guest: Guest) -> None:
    guest.lay_out(ORDER, guest.a)
    guest.put_out_byte(0, b"A")
    with guest.mapped(None) as ring:
        assert guest.maps == [(guest.indexes,), (guest.indexes, *guest.a)]
        assert ring.refs == guest.a
        assert guest.live_mappings() == 1  # the first one went
        assert _out_bytes(ring) == b"A"


def test_a_hint_the_page_confirms_maps_the_ring_in_one_request(guest: Guest) -> None:
    guest.lay_out(ORDER, guest.a)
    guest.put_out_byte(0, b"A")
    with guest.mapped(guest.a) as ring:
        assert guest.maps == [(guest.indexes, *guest.a)]
        assert ring.refs == guest.a and guest.live_mappings() == 1
        assert _out_bytes(ring) == b"A"


def test_a_hint_the_page_contradicts_maps_what_the_page_says(guest: Guest) -> None:
    """The frontend gave the indexes page again with other data pages:
    they are the ring, and the mapping made on the hint's word goes."""
    guest.lay_out(ORDER, guest.b)
    guest.put_out_byte(1, b"B")
    with guest.mapped(guest.a) as ring:
        assert guest.maps == [(guest.indexes, *guest.a), (guest.indexes, *guest.b)]
        assert ring.refs == guest.b and guest.live_mappings() == 1
        assert _out_bytes(ring) == b"B"



@pytest.mark.parametrize("hint", ["none", "confirmed", "contradicted"])
def test_a_ring_s_pages_are_its_one_mapping_until_closed(guest: Guest, hint: str) -> None:
    """``_maps`` (the fuzzer's look at what a ring holds) holds the one
    mapping the ring keeps, the indexes page and the data pages the page
    names, whichever way it was mapped; nothing once closed."""
    guest.lay_out(ORDER, guest.a)
    ring = guest.ring({"none": None, "confirmed": guest.a, "contradicted": guest.b}[hint])
    try:
        assert [pages.refs for pages in ring._maps] == [(guest.indexes, *guest.a)]
        assert guest.live_mappings() == 1
    finally:
        ring.close()
    assert ring._maps == [] and guest.live_mappings() == 0


def test_a_hint_the_hypervisor_refuses_takes_the_long_way(guest: Guest) -> None:
    """The hint's grants ended (or were never ours): the ring is mapped
    from the indexes page alone, as without a hint."""
    guest.lay_out(ORDER, guest.a)
    stale = tuple(ref + 10_000 for ref in guest.a)
    with guest.mapped(stale) as ring:
        assert guest.maps == [(guest.indexes, *stale), (guest.indexes,),
                              (guest.indexes, *guest.a)]
        assert ring.refs == guest.a and guest.live_mappings() == 1


def test_a_closed_ring_keeps_no_view_of_the_pages(guest: Guest) -> None:
    """close() releases the in and out rings' views before it unmaps:
    a use of a closed ring fails loudly, rather than read or write the
    zero pages the mapping's place holds once the grants are gone."""
    guest.lay_out(ORDER, guest.a)
    guest.put_out_byte(0, b"A")
    ring = guest.ring(None)
    in_ring, out_ring = ring.in_ring, ring.out_ring
    ring.close()
    assert guest.live_mappings() == 0
    with pytest.raises(ValueError, match="released"):
        out_ring.readable()
    with pytest.raises(ValueError, match="released"):
        in_ring.writable()


@pytest.mark.parametrize("hint", [False, True])
def test_a_bad_ring_order_maps_nothing_whatever_the_hint(guest: Guest, hint: bool) -> None:
    guest.lay_out(ORDER + 1, guest.a + guest.b)  # beyond max_page_order
    with pytest.raises(CommandError, match="ring_order"):
        guest.ring(guest.a + guest.b if hint else None)
    assert guest.live_mappings() == 0


def _counted_maps(backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The refs of each grant mapping ``backend`` asks for from now on,
    one number per request, in a list kept up to date."""
    maps: list[int] = []
    real_map = backend.gnttab.map_grant_refs

    def counted(domid: int, refs: Sequence[int], **kwargs: Any) -> Any:
        maps.append(len(refs))
        return real_map(domid, refs, **kwargs)

    monkeypatch.setattr(backend.gnttab, "map_grant_refs", counted)
    return maps


def test_a_recycled_ring_is_mapped_in_one_request(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Our frontend gives a released socket's ring to its next socket:
    the backend maps it, indexes page and data pages, with one request."""
    maps = _counted_maps(backend, monkeypatch)
    ring = raw.new_ring()
    for word in (b"first", b"again"):
        maps.clear()
        sock_id, _ = raw.socket()
        assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
        raw.echo(ring, word)
        assert raw.release(sock_id).ret == 0
    assert maps == [1 + 16]
    # The hint used is counted out of the refs kept, as it is taken out.
    fe = backend._frontends[(raw.guest.domid, 0)]
    assert fe.ring_hint_refs == sum(map(len, fe.ring_hints.values())) == 16


def test_the_hints_a_frontend_leaves_hold_a_bounded_number_of_refs(
        host: SimHost, make_frontend: Callable[..., RawFrontend], echo_server: Any) -> None:
    """A hostile frontend gives ring after ring of the largest order, each
    with an indexes page of its own (one set of data pages will do for
    all): the refs the backend keeps as hints are bounded in number, as
    if the rings were of the default order, not 256 rings of 512 refs,
    megabytes of the backend's memory for a few hundred grants of the
    guest.  The newest is kept."""
    order = MAX_PAGE_ORDER_LIMIT
    bound = _socket.RING_HINTS << DEFAULT_MAX_PAGE_ORDER
    with pvcalls.Backend(host.dom0, max_page_order=order, topology=Topology(2)) as backend:
        raw = make_frontend("hinter")
        data = raw.gntshr.share_pages(0, 1 << order)
        rings = [raw.new_ring(1, refs=list(data.refs), ring_order=order)
                 for _ in range(bound // (1 << order) + 2)]
        for ring in rings:
            sock_id, _ = raw.socket()
            assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
            assert raw.release(sock_id).ret == 0
        fe = backend._frontends[(raw.guest.domid, 0)]
        hints = fe.ring_hints
        kept = sum(map(len, hints.values()))
        assert kept <= bound
        assert fe.ring_hint_refs == kept
        assert hints[rings[-1].ref] == data.refs


def test_the_hints_kept_are_those_of_the_rings_given_last(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend's hints are bounded, and the one that goes to make room
    is that of the ring given least recently: a ring given again is the
    newest, however early it was first given."""
    monkeypatch.setattr(_socket, "RING_HINTS", 2)
    maps = _counted_maps(backend, monkeypatch)

    def give(ring: Any) -> list[int]:
        """Connect a socket with ``ring``, release it: its map requests."""
        maps.clear()
        sock_id, _ = raw.socket()
        assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
        assert raw.release(sock_id).ret == 0
        return list(maps)

    a, b, c = raw.new_ring(), raw.new_ring(), raw.new_ring()
    for ring in (a, b, a, c):  # b given least recently, then a, then c
        give(ring)
    assert give(a) == [1 + 16]
    assert give(c) == [1 + 16]
    assert give(b) == [1, 1 + 16]  # its hint went


@pytest.mark.parametrize("hint", ["none", "confirmed", "contradicted"])
def test_a_ring_s_making_interrupted_anywhere_leaves_nothing_mapped(
        guest: Guest, hint: str) -> None:
    """A Ctrl-C landing at any place of pvcalls' code as a data ring is
    made, whichever way it is mapped: nothing stays mapped.  A mapping
    assigned from what the map call returned was lost to an interrupt as
    that call returned, the first mapping of the long way to one as its
    unmapping started: held for the life of the backend."""
    from stolensignal import interrupted_at

    guest.lay_out(ORDER, guest.a)
    given = {"none": None, "confirmed": guest.a, "contradicted": guest.b}[hint]
    landed = []
    for n in itertools.count():
        made: list[DataRing] = []
        where = interrupted_at(n, os.path.dirname(pvcalls.__file__),
                               lambda made=made: made.append(guest.ring(given)))
        for ring in made:
            ring.close()
        assert guest.live_mappings() == 0, where
        if not where:
            break
        landed.append(where)
    assert any("_map_ring" in where for where in landed) or hint == "confirmed", landed


def test_a_ring_s_close_interrupted_anywhere_leaves_nothing_mapped_once_done_again(
        guest: Guest) -> None:
    """A Ctrl-C landing at any place of pvcalls' code as a data ring is
    closed: the close done again (the socket's next teardown) unmaps the
    pages.  The record of the mapping dropped before its unmapping, an
    interrupt as that started held the pages for the life of the backend
    (an unmapping done twice is harmless: unmap() is idempotent)."""
    from stolensignal import interrupted_at

    guest.lay_out(ORDER, guest.a)
    for n in itertools.count():
        ring = guest.ring(None)
        where = interrupted_at(n, os.path.dirname(pvcalls.__file__), ring.close)
        ring.close()
        assert guest.live_mappings() == 0, where
        if not where:
            break
