"""A request/response ring backend (``xen/io/ring.h``), the classic split driver.

It serves ``backend/uppercase`` devices, a toy device type: the guest shares
one page holding a ``ring.h`` shared ring (``ring-ref``) and an event
channel (``event-channel``), and puts requests of up to 56 bytes on the
ring; each is answered in its slot with the same bytes in upper case, or
with a negative errno as its status.  The slots are the union of the
request and the response, as ``DEFINE_RING_TYPES`` declares them; the
backend copies each request out of the guest's page once and trusts
nothing in the copy, its length least of all.  Run it against a simulated
guest::

    .venv/bin/python examples/ring_backend.py --demo

On a real dom0, ``--serve`` serves the host's guests until SIGINT or
SIGTERM; it exits 2 saying why without Xen, or while another uppercase
backend serves the domain.

blkback and netback follow this pattern, with more fields and rings.
Everything xenbus (discovery, InitWait, Connected, closing, removal, domain
death, error nodes, one backend per domain on a host) is the framework's;
this file only answers requests.
"""

from __future__ import annotations

import argparse
import errno
import logging

import cffi

from workqueue import Workqueue
from xenback import (
    BackendDevice,
    BackendDriver,
    BackRing,
    DeviceWork,
    HostLockHeld,
    PlatformUnavailable,
    RingError,
)

# What a C frontend would find in the device's header, io/uppercase.h.
ffi = cffi.FFI()
ffi.cdef("""
    struct upper_request {
        uint32_t id;            /* echoed in the response */
        uint16_t len;           /* bytes of data[] used */
        uint8_t data[56];
    };
    struct upper_response {
        uint32_t id;
        int16_t status;         /* 0, or a negative errno */
        uint16_t len;
        uint8_t data[56];
    };
    union upper_sring_entry { struct upper_request req; struct upper_response rsp; };
""")
# The slots are as big as the union, which is more than the larger of the
# two structs when their alignments differ (see xenback.ring.BackRing).
SLOT_SIZE = ffi.sizeof("union upper_sring_entry")


def answer(raw: bytes) -> bytes:
    """The response to one request; ``raw`` is our private copy of its slot,
    so the guest can no longer change what we check and then use."""
    req = ffi.cast("struct upper_request *", ffi.from_buffer(raw))
    rsp = ffi.new("struct upper_response *", {"id": req.id})
    if req.len > len(req.data):
        # Believed, it would have us read past the slot we copied, into
        # our own memory (a C backend: into the next slots, or off the
        # page).  Refused rather than truncated: the guest learns why.
        rsp.status = -errno.EMSGSIZE
    else:
        rsp.len = req.len
        rsp.data[0 : req.len] = ffi.buffer(req.data, req.len)[:].upper()
    return ffi.buffer(rsp)[:]


class Upper(DeviceWork):
    """One connected device: a work item that answers what is on its ring.

    Queued by the event channel and once on connect; a Work never runs
    concurrently with itself, so the ring has one user at a time.  A
    DeviceWork: should it raise (a bug of ours), the device fails (error
    node, Closing), and its guest does not wait for an answer for ever.
    """

    def __init__(self, dev: BackendDevice, page: memoryview, workqueue: Workqueue) -> None:
        super().__init__(dev, Upper.run)
        self.workqueue = workqueue
        self.ring = BackRing(page, SLOT_SIZE)
        self.port = 0

    def kick(self) -> None:
        self.workqueue.queue_work(self)

    def run(self) -> None:
        try:
            for raw in self.ring.requests():
                self.ring.push_response(answer(raw))
            if self.ring.push_responses():
                self.dev.notify(self.port)
            # One ring's worth per run, then back in the queue: a guest that
            # keeps its ring full must not keep a worker to itself.
            if self.ring.final_check_for_requests():
                self.kick()
        except RingError as exc:  # the guest broke its indexes: stop serving it
            self.disable()
            self.dev.queue(self.dev.fatal, errno.EPROTO, f"uppercase ring: {exc}")


class UpperBackend(BackendDriver):
    """Serves ``backend/uppercase`` devices."""

    device_type = "uppercase"

    def connect(self, dev: BackendDevice) -> None:
        ref, port = dev.read_otherend_u32("ring-ref"), dev.read_otherend_u32("event-channel")
        upper = Upper(dev, dev.map_grant_refs([ref]).buffer, self.workqueue)
        dev.driver_data = upper
        # Not run until it knows its port: the guest may notify as soon as
        # we bind, and answers notified on port 0 would go nowhere, the
        # guest waiting for them for ever.
        upper.disable()
        upper.port = dev.bind_evtchn(port, lambda _port: upper.kick())
        upper.enable()
        upper.kick()  # requests put on the ring before now

    def disconnect(self, dev: BackendDevice) -> None:
        # The frontend is Closing or Closed, or its domain is gone: the
        # framework unbinds and unmaps after this returns.
        upper: Upper | None = dev.driver_data
        if upper is not None:
            upper.disable_sync()  # not running, never again: now unmap
            upper.ring.release()
            dev.driver_data = None


def _demo() -> None:
    """A simulated guest sends three requests, the last claiming more bytes
    than its slot holds, and prints the answers."""
    from xenback import FrontRing, XenbusState
    from xenback.sim import FrontendDevice, SimHost

    def request(req_id: int, data: bytes, length: int | None = None) -> bytes:
        fields = {"id": req_id, "len": len(data) if length is None else length, "data": data}
        return ffi.buffer(ffi.new("struct upper_request *", fields))[:]

    with SimHost() as host, UpperBackend(host.dom0):
        guest = host.create_domain("demo")
        with FrontendDevice.add(guest, "uppercase") as fe:  # removes the device at the end
            page, port = fe.share(), fe.bind_port()
            ring = FrontRing(page.buffer, SLOT_SIZE)
            fe.publish({"ring-ref": page.refs[0], "event-channel": port})
            fe.wait_backend(XenbusState.CONNECTED)
            for req in (request(0, b"hello from the guest"), request(1, b"xen split drivers"),
                        request(2, b"", length=1000)):
                ring.push_request(req)
            if ring.push_requests():
                fe.evtchn.notify(port)
            answered = 0
            while answered < 3:
                for raw in ring.responses():
                    rsp = ffi.cast("struct upper_response *", ffi.from_buffer(raw))
                    if rsp.status:
                        print(f"request {rsp.id}: error {errno.errorcode.get(-rsp.status)}")
                    else:  # bounded by data[] too: a frontend trusts no more than we do
                        print(f"request {rsp.id}: {ffi.buffer(rsp.data)[: rsp.len]!r}")
                    answered += 1
                if answered < 3 and not ring.final_check_for_responses():
                    fired = fe.evtchn.wait(10)
                    if fired is None:
                        raise SystemExit("ring_backend: the backend did not answer within 10 s")
                    fe.evtchn.unmask(fired)
            ring.release()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true",
                      help="run against a simulated guest (the default)")
    mode.add_argument("--serve", action="store_true",
                      help="serve the real dom0 (xenback.xen) until SIGINT or SIGTERM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if not args.serve:
        _demo()
    else:
        import signal

        import xenback.xen

        # sigwait() needs the signals blocked, here before any thread starts
        # (threads inherit the mask): unblocked, SIGTERM would kill the
        # process before the backend closed its devices.
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            platform = xenback.xen.open()
        except PlatformUnavailable as exc:
            parser.error(f"cannot open the Xen platform: {exc}")
        backend = UpperBackend(platform)
        try:
            backend.start()
        except HostLockHeld as exc:
            holder = "?" if exc.pid is None else exc.pid
            parser.error(f"another uppercase backend (pid {holder}) serves this host already; "
                         f"it holds {exc.path}")
        try:
            signal.sigwait(stop)
        finally:
            backend.stop()
