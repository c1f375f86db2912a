"""ring.h rings and XEN_FLEX_RING byte rings on plain and mmap'd buffers."""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenback import ring as ring_module
from xenback.ring import BackRing, FlexRing, FrontRing, RingError, ring_size

SLOT = 64
REQ = struct.Struct("<QI")  # a request: id, payload
HEADER = struct.Struct("<IIII")  # req_prod, req_event, rsp_prod, rsp_event


def _page(n: int = 1) -> memoryview:
    return memoryview(mmap.mmap(-1, 4096 * n))


def _header(buf: memoryview) -> tuple[int, int, int, int]:
    return HEADER.unpack_from(buf, 0)


def _set(buf: memoryview, field: int, value: int) -> None:
    struct.pack_into("<I", buf, 4 * field, value & 0xFFFFFFFF)


def test_ring_size() -> None:
    assert ring_size(4096, 64) == 32  # (4096 - 64) / 64 = 63 -> 32
    assert ring_size(4096, 112) == 32  # pvcalls: 36 -> 32
    assert ring_size(4096 * 4, 64) == 128
    with pytest.raises(ValueError, match="no room"):
        ring_size(100, 64)
    with pytest.raises(ValueError, match="positive"):
        ring_size(4096, 0)
    with pytest.raises(TypeError, match="slot size must be an int, not float"):
        ring_size(4096, 64.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="buffer size must be an int, not str"):
        ring_size("4096", 64)  # type: ignore[arg-type]


def _exchange(front: FrontRing, back: BackRing, count: int, start_id: int) -> list[int]:
    """Push ``count`` requests, answer them all, collect the response ids."""
    for i in range(count):
        front.push_request(REQ.pack(start_id + i, i))
    front.push_requests()
    answered = 0
    while True:
        for req in back.requests():
            rid, _ = REQ.unpack_from(req)
            back.push_response(REQ.pack(rid, 0))
            answered += 1
        back.push_responses()
        if not back.final_check_for_requests():
            break
    assert answered == count
    got = [REQ.unpack_from(r)[0] for r in front.responses()]
    return got


@pytest.mark.parametrize("make", [lambda: bytearray(4096), _page], ids=["bytearray", "mmap"])
def test_requests_and_responses_wrap_around(make) -> None:
    buf = make()
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    assert front.nr_ents == back.nr_ents == 32 and front.free_slots == 32
    next_id = 0
    for batch in [1, 31, 32, 5, 32, 17, 32, 32]:  # crosses the end of the ring many times
        assert _exchange(front, back, batch, next_id) == list(range(next_id, next_id + batch))
        next_id += batch
        assert front.free_slots == 32
    assert back.req_cons == back.rsp_prod_pvt == next_id


def test_32bit_index_wrap() -> None:
    buf = bytearray(4096)
    start = 0xFFFFFFFF - 40
    FrontRing(buf, SLOT)  # initialise, then move every index close to 2**32
    for field in (0, 2):
        _set(memoryview(buf), field, start)
    for field in (1, 3):
        _set(memoryview(buf), field, start + 1)
    front = FrontRing(buf, SLOT, init=False)
    back = BackRing(buf, SLOT, index=start)
    ids = []
    for batch in (32, 32, 32):
        ids += _exchange(front, back, batch, len(ids))
    assert ids == list(range(96))
    assert back.req_cons == (start + 96) & 0xFFFFFFFF < start  # wrapped


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_init_must_be_true_or_false(flag: object) -> None:
    """init="no" is not read for its truth: it would wipe the header of a
    ring the caller meant to join.  TypeError naming the argument, and the
    shared page untouched."""
    buf = bytearray(4096)
    HEADER.pack_into(buf, 0, 7, 8, 5, 6)
    with pytest.raises(TypeError, match=f"init must be True or False, not {type(flag).__name__}"):
        FrontRing(buf, SLOT, init=flag)  # type: ignore[arg-type]
    assert _header(memoryview(buf)) == (7, 8, 5, 6)


def test_a_notify_lost_is_asked_for_again_since_the_last_one_sent() -> None:
    """push_requests(since=...): the check spans every push after the
    last notify, so that a notify the first push asked for, and its
    caller never sent, is asked for again by the next push (which by
    itself needs none: the other end still waits for the first)."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    assert front.push_requests(0) is True  # req_event 1: notify... lost
    front.push_request(REQ.pack(2, 0))
    assert front.push_requests(0) is True  # still owed
    front.push_request(REQ.pack(3, 0))
    assert front.push_requests(2) is False  # notified up to 2 since
    assert front.push_requests(3) is False  # nothing new
    assert _header(memoryview(buf))[0] == 3  # all published


@pytest.mark.parametrize(
    "since, error, text",
    [("0", TypeError, "since must be an int, not str"),
     (0.0, TypeError, "since must be an int, not float"),
     (False, TypeError, "since must be an int, not bool"),
     (-1, ValueError, "since -1 is not a RING_IDX"),
     (1 << 32, ValueError, "since 4294967296 is not a RING_IDX")],
)
def test_a_since_that_is_no_ring_index_is_refused_before_anything_is_published(
    since: object, error: type[Exception], text: str
) -> None:
    """A wrong ``since`` failed in the notify check, after req_prod was
    published: the caller got an exception and could not tell that the
    requests had gone and the other end might wait for a notify (or, out
    of range, was silently told a wrong answer)."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    with pytest.raises(error, match=text):
        front.push_requests(since)  # type: ignore[arg-type]
    assert _header(memoryview(buf))[0] == 0  # nothing published
    assert front.push_requests(0) is True  # the ring still works


def test_since_may_be_any_ring_index_the_last_too() -> None:
    """A caller's ``since`` wraps with the ring's indexes: 2**32 - 1 is
    the one before 0, a notify owed for the request pushed since."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    assert front.push_requests((1 << 32) - 1) is True
    assert _header(memoryview(buf))[0] == 1


def test_notification_rules() -> None:
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    # SHARED_RING_INIT asks for an event on the first request and response.
    front.push_request(REQ.pack(1, 0))
    assert front.push_requests() is True
    front.push_request(REQ.pack(2, 0))
    assert front.push_requests() is False  # req_event is still 1: backend is awake
    reqs = list(back.requests())
    assert len(reqs) == 2
    # Nothing more: the final check arms req_event for the next request.
    assert back.final_check_for_requests() is False
    assert _header(memoryview(buf))[1] == 3
    front.push_request(REQ.pack(3, 0))
    assert front.push_requests() is True
    assert back.final_check_for_requests() is True  # pending work found, no sleep
    for _ in range(2):
        back.push_response(REQ.pack(0, 0))
    assert back.push_responses() is True  # rsp_event was 1
    assert len(list(front.responses())) == 2
    assert front.final_check_for_responses() is False
    assert _header(memoryview(buf))[3] == 3  # rsp_event armed for the next one
    (req,) = back.requests()
    back.push_response(req)
    assert back.push_responses() is True


def _ring_at(start: int, rsp_event: int | None = None) -> tuple[bytearray, FrontRing, BackRing]:
    """A ring whose four indexes were moved to ``start`` (``rsp_event`` to
    that, or start + 1), both ends attached to it."""
    buf = bytearray(4096)
    FrontRing(buf, SLOT)
    view = memoryview(buf)
    for field in (0, 2):
        _set(view, field, start)
    _set(view, 1, start + 1)
    _set(view, 3, start + 1 if rsp_event is None else rsp_event)
    return buf, FrontRing(buf, SLOT, init=False), BackRing(buf, SLOT, index=start)


def _two_requests_taken() -> tuple[bytearray, FrontRing, BackRing, bytes, bytes]:
    """A fresh ring whose frontend pushed two requests, both taken by the
    backend: the page, both ends and the two requests."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    for i in range(2):
        front.push_request(REQ.pack(i, 0))
    front.push_requests()
    first, second = back.requests()
    return buf, front, back, first, second


def test_responses_notify_only_for_what_the_frontend_waits_for() -> None:
    buf, front, back, first, second = _two_requests_taken()
    back.push_response(first)
    assert back.push_responses() is True  # rsp_event was 1
    assert back.push_responses() is False  # nothing new
    back.push_response(second)
    # rsp_event is still 1: the frontend was told, and has not asked again.
    assert back.push_responses() is False


def test_the_notify_check_compares_with_the_rsp_prod_we_published() -> None:
    """push_responses() takes the old ``rsp_prod`` from what it last
    published, not from the page: a frontend that rewrites ``rsp_prod``
    there cannot sway whether it is notified."""
    buf, front, back, first, second = _two_requests_taken()
    back.push_response(first)
    assert back.push_responses() is True  # rsp_event was 1
    view = memoryview(buf)
    _set(view, 3, 2)  # the frontend asks to hear of the next response...
    _set(view, 2, 2)  # ...and claims it was published already
    back.push_response(second)
    assert back.push_responses() is True  # asked for: 1 -> 2 crosses rsp_event 2
    assert _header(view)[2] == 2


def test_the_request_notify_check_compares_with_the_req_prod_we_published() -> None:
    """push_requests() too: a backend that rewrites ``req_prod`` on the
    page cannot sway whether it is notified."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    assert front.push_requests() is True  # req_event was 1
    view = memoryview(buf)
    _set(view, 1, 2)  # the backend asks to hear of the next request...
    _set(view, 0, 2)  # ...and claims it was published already
    front.push_request(REQ.pack(2, 0))
    assert front.push_requests() is True  # asked for: 1 -> 2 crosses req_event 2
    assert _header(view)[0] == 2


def test_the_final_check_sees_a_request_published_as_req_event_was_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """final_check_for_requests() reads req_prod again after it armed
    req_event: a request the frontend published just before it saw the
    new req_event (and so notified nobody) is found, not slept on."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    front.push_requests()
    assert len(list(back.requests())) == 1

    def frontend_publishes() -> None:
        # At the barrier between arming req_event and the second look.
        if _header(memoryview(buf))[1] == 2 and _header(memoryview(buf))[0] == 1:
            front.push_request(REQ.pack(2, 0))
            front.push_requests()

    monkeypatch.setattr(ring_module, "_mb", frontend_publishes)
    assert back.final_check_for_requests() is True
    assert back.unconsumed_requests() == 1


def test_the_final_check_sees_a_response_published_as_rsp_event_was_armed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """final_check_for_responses() too, for the frontend's end."""
    buf, front, back, first, second = _two_requests_taken()
    back.push_response(first)
    back.push_responses()
    assert len(list(front.responses())) == 1

    def backend_publishes() -> None:
        # At the barrier between arming rsp_event and the second look.
        if _header(memoryview(buf))[3] == 2 and _header(memoryview(buf))[2] == 1:
            back.push_response(second)
            back.push_responses()

    monkeypatch.setattr(ring_module, "_mb", backend_publishes)
    assert front.final_check_for_responses() is True
    assert front.unconsumed_responses() == 1


def test_the_final_check_leaves_req_event_alone_while_requests_wait() -> None:
    """As RING_FINAL_CHECK_FOR_REQUESTS: with requests still to take,
    req_event is not armed (the frontend need not notify a backend that
    is about to look anyway)."""
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    front.push_requests()
    assert len(list(back.requests())) == 1
    front.push_request(REQ.pack(2, 0))
    front.push_requests()
    assert back.final_check_for_requests() is True
    assert _header(memoryview(buf))[1] == 1  # as SHARED_RING_INIT left it


def test_the_final_check_leaves_rsp_event_alone_while_responses_wait() -> None:
    """RING_FINAL_CHECK_FOR_RESPONSES likewise, at the frontend's end."""
    buf, front, back, first, second = _two_requests_taken()
    back.push_response(first)
    back.push_responses()
    assert len(list(front.responses())) == 1
    back.push_response(second)
    back.push_responses()
    assert front.final_check_for_responses() is True
    assert _header(memoryview(buf))[3] == 1  # as SHARED_RING_INIT left it


def test_notification_across_the_32bit_wrap() -> None:
    # The frontend consumed everything up to 2**32 - 1 and asked to hear
    # of the next response, at index 0: two responses that straddle the
    # wrap must wake it.
    buf, front, back = _ring_at(0xFFFFFFFF)
    for i in range(2):
        front.push_request(REQ.pack(i, 0))
    assert front.push_requests() is True
    for req in back.requests():
        back.push_response(req)
    assert back.push_responses() is True
    assert _header(memoryview(buf))[2] == 1


def test_ring_full_and_unconsumed_across_the_32bit_wrap() -> None:
    buf, front, back = _ring_at(0xFFFFFFFF - 5)
    for i in range(32):
        front.push_request(REQ.pack(i, 0))
    front.push_requests()
    assert front.free_slots == 0
    with pytest.raises(RingError, match="full"):
        front.push_request(REQ.pack(32, 0))
    assert back.unconsumed_requests() == 32
    assert len(list(back.requests())) == 32
    assert back.unconsumed_requests() == 0


def test_a_reattached_ring_counts_responses_from_its_index() -> None:
    # BACK_RING_ATTACH at 100: responses up to 100 were pushed by the
    # backend before it, and the frontend, told of them, has not asked
    # for more (rsp_event 100): one more response does not notify.
    buf, front, back = _ring_at(100, rsp_event=100)
    front.push_request(REQ.pack(1, 0))
    front.push_requests()
    (req,) = back.requests()
    back.push_response(req)
    assert back.push_responses() is False
    assert len(list(front.responses())) == 1
    assert front.final_check_for_responses() is False  # asks for 102
    front.push_request(REQ.pack(2, 0))
    front.push_requests()
    (req,) = back.requests()
    back.push_response(req)
    assert back.push_responses() is True


@pytest.mark.parametrize(("index", "error", "text"), [
    (1.5, TypeError, "index must be an int, not float"),
    (None, TypeError, "index must be an int, not NoneType"),
    (True, TypeError, "index must be an int, not bool"),
    (-1, ValueError, "index -1 is not a RING_IDX"),
    (2**32, ValueError, "index 4294967296 is not a RING_IDX"),
])
def test_an_attach_index_must_be_a_ring_idx(index, error, text) -> None:
    """BACK_RING_ATTACH takes a RING_IDX (u32): a float failed in the
    masking with an unrelated message, and -1 or 2**32 were masked into
    another index without a word."""
    with pytest.raises(error, match=text):
        BackRing(bytearray(4096), SLOT, index=index)
    assert BackRing(bytearray(4096), SLOT, index=2**32 - 1).req_cons == 2**32 - 1


def test_hostile_request_producer_is_rejected() -> None:
    buf = memoryview(bytearray(4096))
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    _set(buf, 0, back.nr_ents + 1)  # more requests than slots
    with pytest.raises(RingError, match="more than 32 slots ahead"):
        list(back.requests())
    _set(buf, 0, 0xFFFFFFF0)  # "behind" us: as far ahead as a huge number
    with pytest.raises(RingError):
        list(back.requests())
    assert back.req_cons == 0  # nothing was taken
    # A well-formed ring works again afterwards.
    _set(buf, 0, 0)
    front.push_request(REQ.pack(7, 0))
    front.push_requests()
    assert [REQ.unpack_from(r)[0] for r in back.requests()] == [7]


def _requests_taken(n: int) -> tuple[memoryview, BackRing]:
    """A ring on which the backend took ``n`` requests, answering none."""
    buf = memoryview(bytearray(4096))
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    for i in range(n):
        front.push_request(REQ.pack(i, 0))
    front.push_requests()
    assert len(list(back.requests())) == n
    return buf, back


def test_backend_never_takes_requests_it_cannot_answer() -> None:
    buf, back = _requests_taken(32)
    # The frontend claims 1 more while all 32 are unanswered: overflow.
    _set(buf, 0, 33)
    with pytest.raises(RingError):
        list(back.requests())


def test_req_prod_moved_back_behind_requests_taken_is_rejected() -> None:
    """req_prod moved back between the responses produced and the requests
    taken: "ahead" by the first check, but behind req_cons.  Followed, it
    would make the backend take almost 2**32 requests from a 32-slot ring."""
    buf, back = _requests_taken(3)
    _set(buf, 0, 1)
    with pytest.raises(RingError, match="went backwards"):
        list(itertools.islice(back.requests(), back.nr_ents + 1))
    assert back.req_cons == 3  # nothing more was taken
    # Answering what was taken still works.
    for _ in range(3):
        back.push_response(REQ.pack(0, 0))
    back.push_responses()


def test_request_copies_are_private() -> None:
    buf = memoryview(bytearray(4096))
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    front.push_request(b"A" * SLOT)
    front.push_requests()
    (req,) = back.requests()
    buf[64:128] = b"B" * 64  # the guest rewrites the slot after we took it
    assert req == b"A" * SLOT and isinstance(req, bytes)


def test_misuse_is_reported() -> None:
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    back = BackRing(buf, SLOT)
    with pytest.raises(RingError, match="no request"):
        back.push_response(b"x")
    for _ in range(32):
        front.push_request(b"r")
    with pytest.raises(RingError, match="full"):
        front.push_request(b"r")
    with pytest.raises(ValueError, match="does not fit"):
        FrontRing(bytearray(4096), SLOT).push_request(b"x" * (SLOT + 1))
    with pytest.raises(ValueError, match="writable"):
        BackRing(memoryview(bytes(4096)), SLOT)
    front.push_requests()
    _set(memoryview(buf), 2, 40)  # responses nobody asked for
    with pytest.raises(RingError, match="ahead of the requests"):
        list(front.responses())


def test_front_ring_rejects_responses_to_requests_not_pushed() -> None:
    """A backend's rsp_prod may not run ahead of the requests the frontend
    has pushed, even by less than the ring's size: a request written but
    not yet pushed has no response, and neither has an empty slot."""
    buf = memoryview(bytearray(4096))
    front = FrontRing(buf, SLOT)
    front.push_request(REQ.pack(1, 0))
    front.push_requests()
    front.push_request(REQ.pack(2, 0))  # written, not pushed
    _set(buf, 2, 2)
    with pytest.raises(RingError, match="ahead of the requests pushed"):
        list(front.responses())
    assert front.rsp_cons == 0
    _set(buf, 2, 1)
    assert len(list(front.responses())) == 1


@settings(max_examples=300, deadline=None)
@given(st.tuples(*[st.integers(0, 2**32 - 1)] * 4), st.integers(0, 2**32 - 1))
def test_any_header_is_rejected_or_bounded(header, start) -> None:
    """Whatever the guest writes into the indexes, the back ring yields at
    most nr_ents requests, all copied from inside the slots, or raises."""
    buf = bytearray(4096)
    HEADER.pack_into(buf, 0, *header)
    back = BackRing(buf, SLOT, index=start)
    try:
        reqs = list(back.requests())
    except RingError:
        return
    assert len(reqs) <= back.nr_ents
    assert all(len(r) == SLOT for r in reqs)
    back.final_check_for_requests()


# XEN_FLEX_RING


def _flex(size: int = 16) -> tuple[bytearray, bytearray]:
    return bytearray(size), bytearray(8)  # data; indexes: prod @0, cons @4


def _rings(data, idx) -> tuple[FlexRing, FlexRing]:
    return (FlexRing(data, idx, prod_offset=0, cons_offset=4),
            FlexRing(data, idx, prod_offset=0, cons_offset=4))


def _write(ring: FlexRing, payload: bytes) -> int:
    done = 0
    for view in ring.writable():
        n = min(len(view), len(payload) - done)
        view[:n] = payload[done : done + n]
        done += n
    ring.produce(done)
    return done


def _read(ring: FlexRing, limit: int | None = None) -> bytes:
    chunks = b"".join(bytes(v) for v in ring.readable())
    if limit is not None:
        chunks = chunks[:limit]
    ring.consume(len(chunks))
    return chunks


def test_flex_ring_two_piece_copies() -> None:
    data, idx = _flex(16)
    producer, consumer = _rings(data, idx)
    assert _write(producer, b"0123456789") == 10
    assert _read(consumer, 8) == b"01234567"
    # 2 bytes left at 8..9; 14 free, wrapping: views 10..15 and 0..7.
    assert [len(v) for v in producer.writable()] == [6, 8]
    assert _write(producer, b"abcdefghijklmnop") == 14
    assert [len(v) for v in consumer.readable()] == [8, 8]
    assert _read(consumer) == b"89abcdefghijklmn"
    assert consumer.readable() == ()
    assert [len(v) for v in producer.writable()] == [8, 8]  # prod 24 -> 8


def test_flex_ring_32bit_wrap() -> None:
    data, idx = _flex(16)
    struct.pack_into("<II", idx, 0, 2**32 - 5, 2**32 - 5)
    producer, consumer = _rings(data, idx)
    stream = bytes(range(200))
    out = b""
    for i in range(0, 200, 7):
        _write(producer, stream[i : i + 7])
        out += _read(consumer)
    assert out == stream
    prod, cons = struct.unpack_from("<II", idx)
    assert prod == cons == (2**32 - 5 + 200) & 0xFFFFFFFF


def test_flex_ring_hostile_indexes() -> None:
    data, idx = _flex(16)
    producer, consumer = _rings(data, idx)
    struct.pack_into("<II", idx, 0, 17, 0)  # 17 bytes in a 16-byte ring
    with pytest.raises(RingError, match="17 bytes in a 16-byte ring"):
        consumer.readable()
    with pytest.raises(RingError):
        producer.writable()
    struct.pack_into("<II", idx, 0, 0, 1)  # cons ahead of prod
    with pytest.raises(RingError):
        consumer.readable()
    struct.pack_into("<II", idx, 0, 3, 0)
    consumer.readable()
    with pytest.raises(ValueError, match="3 were readable"):
        consumer.consume(4)
    with pytest.raises(ValueError, match="power of two"):
        FlexRing(bytearray(12), idx, prod_offset=0, cons_offset=4)
    with pytest.raises(ValueError, match="aligned u32"):
        FlexRing(data, idx, prod_offset=6, cons_offset=4)


@pytest.mark.parametrize(("prod_offset", "cons_offset"),
                         [(2, 4), (0, 5), (8, 4), (0, 8), (-4, 4), (0, 6), (0, 100)])
def test_flex_ring_index_offsets_are_aligned_u32s_inside_the_indexes(
        prod_offset: int, cons_offset: int) -> None:
    """An index misaligned, or partly or wholly past the end of the indexes
    memory, is refused when the ring is made, not met at its first use."""
    data, idx = _flex(16)  # 8 bytes of indexes: u32s at 0 and 4 only
    with pytest.raises(ValueError, match="aligned u32"):
        FlexRing(data, idx, prod_offset=prod_offset, cons_offset=cons_offset)
    FlexRing(data, idx, prod_offset=4, cons_offset=0).release()  # the last u32 is fine


def test_flex_ring_indexes_must_be_two_words() -> None:
    """prod and cons at the same offset would be one word that both ends
    write: every readable() would find the ring empty and every
    writable() find it empty too, and data would be overwritten unseen."""
    data, idx = _flex(16)
    with pytest.raises(ValueError, match="prod_offset and cons_offset are both 4"):
        FlexRing(data, idx, prod_offset=4, cons_offset=4)


@pytest.mark.parametrize("offset", [4.0, "4", True, None])
def test_flex_ring_index_offsets_must_be_ints(offset: object) -> None:
    data, idx = _flex(16)
    with pytest.raises(TypeError, match="cons_offset must be an int"):
        FlexRing(data, idx, prod_offset=0, cons_offset=offset)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1.0, "1", True, None])
def test_flex_ring_moves_only_whole_bytes(n: object) -> None:
    """A count that is not an int is refused by name, and moves nothing
    (a float failed deep in the index arithmetic, True moved one byte)."""
    data, idx = _flex(16)
    producer, consumer = _rings(data, idx)
    producer.writable()
    with pytest.raises(TypeError, match="byte count must be an int"):
        producer.produce(n)  # type: ignore[arg-type]
    assert consumer.readable() == ()
    producer.produce(1)
    consumer.readable()
    with pytest.raises(TypeError, match="byte count must be an int"):
        consumer.consume(n)  # type: ignore[arg-type]
    assert sum(len(p) for p in consumer.readable()) == 1


def test_flex_ring_moves_only_what_the_last_look_allowed() -> None:
    """produce() and consume() are bounded by the last writable() /
    readable(), less what was already moved since: a caller's arithmetic
    error cannot publish bytes never written or free bytes never read."""
    data, idx = _flex(16)
    producer, consumer = _rings(data, idx)
    assert sum(len(v) for v in producer.writable()) == 16
    with pytest.raises(ValueError, match="16 were free"):
        producer.produce(17)
    producer.produce(10)
    with pytest.raises(ValueError, match="6 were free"):
        producer.produce(7)
    producer.produce(6)
    assert sum(len(v) for v in consumer.readable()) == 16
    consumer.consume(10)
    with pytest.raises(ValueError, match="6 were readable"):
        consumer.consume(7)
    consumer.consume(6)
    assert struct.unpack_from("<II", idx) == (16, 16)


def test_flex_ring_indexes_moved_by_the_guest_do_not_move_ours() -> None:
    data, idx = _flex(16)
    _producer, consumer = _rings(data, idx)
    struct.pack_into("<II", idx, 0, 4, 0)
    consumer.readable()
    struct.pack_into("<I", idx, 4, 3)  # the guest scribbles on our cons
    consumer.consume(4)
    assert struct.unpack_from("<II", idx) == (4, 4)


def test_flex_ring_position_is_the_index_looked_at_not_the_page_word() -> None:
    """position is this end's index as readable()/writable() read it and
    consume()/produce() moved it: what a caller decides on (was the ring
    full before this consume?) is the value the ring acts on, whatever the
    other end wrote to the word since."""
    data, idx = _flex(16)
    producer, consumer = _rings(data, idx)
    struct.pack_into("<II", idx, 0, 2**32 - 2, 2**32 - 14)  # 12 bytes, wrapping
    consumer.readable()
    struct.pack_into("<I", idx, 4, 7)  # the other end scribbles on our cons
    assert consumer.position == 2**32 - 14
    consumer.consume(12)
    assert consumer.position == 2**32 - 2
    producer.writable()
    struct.pack_into("<I", idx, 0, 9)  # and on the producer's prod
    assert producer.position == 2**32 - 2
    producer.produce(3)
    assert producer.position == 1 == struct.unpack_from("<I", idx)[0]


def test_flex_ring_threads_on_shared_memory() -> None:
    """A producer and a consumer thread move 2 MiB through a 4 KiB ring on
    an mmap'd page, checking every byte (exercises the barriers' placement)."""
    page = mmap.mmap(-1, 4096 + 64)
    view = memoryview(page)
    producer, consumer = _rings(view[:4096], view[4096:4104])
    payload = os.urandom(2 * 1024 * 1024)
    received = bytearray()
    progress = threading.Condition()

    def produce() -> None:
        sent = 0
        while sent < len(payload):
            with progress:
                n = _write(producer, payload[sent : sent + 1500])
                if n == 0:
                    progress.wait(1)
                progress.notify_all()
            sent += n

    def consume() -> None:
        while len(received) < len(payload):
            with progress:
                chunk = _read(consumer)
                if not chunk:
                    progress.wait(1)
                progress.notify_all()
            received.extend(chunk)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert bytes(received) == payload
    producer.release()
    consumer.release()


def test_a_message_shorter_than_its_slot_leaves_the_rest_of_the_slot_alone() -> None:
    """As a C end writing only some fields of the union: a short response
    leaves the request's bytes after it, and each request and response
    read back is the whole slot."""
    page = _page()
    front, back = FrontRing(page, SLOT), BackRing(page, SLOT)
    request = bytes(range(SLOT))
    front.push_request(request)
    front.push_requests()
    assert list(back.requests()) == [request]
    back.push_response(b"\xff\xfe")
    back.push_responses()
    assert list(front.responses()) == [b"\xff\xfe" + request[2:]]


def _released_calls(kind: str):
    """A released ring of ``kind`` and each of its calls that reads or
    writes the pages."""
    if kind == "flex":
        data, idx = _flex(16)
        producer, consumer = _rings(data, idx)
        assert _write(producer, b"abc") == 3 and consumer.readable()
        producer.writable()
        producer.release()
        consumer.release()
        return [producer.writable, lambda: producer.produce(1),
                consumer.readable, lambda: consumer.consume(1)]
    buf = bytearray(4096)
    front, back = FrontRing(buf, SLOT), BackRing(buf, SLOT)
    front.push_request(REQ.pack(1, 1))
    front.push_requests()
    assert list(back.requests())
    front.release()
    back.release()
    return [back.unconsumed_requests, lambda: list(back.requests()),
            lambda: back.push_response(b"r"), back.push_responses,
            back.final_check_for_requests,
            lambda: front.push_request(b"q"), front.push_requests,
            front.unconsumed_responses, lambda: list(front.responses()),
            front.final_check_for_responses]


@pytest.mark.parametrize("kind", ["flex", "sring"])
def test_a_ring_used_after_release_says_so(kind: str) -> None:
    """memoryview's own "operation forbidden on released memoryview
    object" named neither the ring nor the release: a ValueError still
    (as a closed file's), which says which ring and why."""
    calls = _released_calls(kind)
    for call in calls:
        with pytest.raises(ValueError, match=r"^this \w+Ring was released \(release\(\)\): "
                                             r"it cannot be used any more$"):
            call()


def test_a_ring_is_released_twice_quietly_and_its_own_errors_stay() -> None:
    data, idx = _flex(16)
    producer, _consumer = _rings(data, idx)
    producer.writable()
    with pytest.raises(ValueError, match="cannot produce 17 bytes: 16 were free"):
        producer.produce(17)
    buf = bytearray(4096)
    front = FrontRing(buf, SLOT)
    with pytest.raises(ValueError, match="65-byte message does not fit a 64-byte slot"):
        front.push_request(bytes(65))
    producer.release()
    producer.release()
    front.release()
    front.release()
