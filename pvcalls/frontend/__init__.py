"""The guest side of PV Calls: a frontend and a socket-like class on top of it.

:class:`Frontend` plays the part of Linux's ``pvcalls-front`` for one guest
domain: it adds the ``pvcalls`` device as a toolstack would, does the xenbus
handshake, owns the one-page command ring, and hands out :class:`PVSocket`
objects that behave like ``socket.socket(AF_INET, SOCK_STREAM)``::

    with pvcalls.Frontend(guest) as fe:
        with fe.socket() as s:
            s.connect(("127.0.0.1", port))
            s.sendall(b"hello")
            reply = s.recv(4096)

On the wire it speaks exactly as Linux's frontend does, so that a backend
tested against this class works with real guests:

* ``req_id`` is the command ring slot index (``req_prod_pvt & (RING_SIZE-1)``)
  and one response table entry per slot waits for the answer (unless that
  entry still waits for an earlier request's, a CONNECT left in flight by a
  non-blocking connect() say: then the next free one, where Linux would
  wait or fail with -EAGAIN);
* socket ids are unique pointer-sized values, never reused by one frontend;
* every active socket gets a data ring of ``ring_order`` 4
  (``FRONTEND_RING_ORDER``: 16 pages, 32 KiB each way) plus its indexes page,
  and an event channel of its own (the ``ring_order`` option asks for larger
  rings, up to the backend's ``max-page-order``: not what Linux does, but
  allowed by the protocol and fewer notifications per megabyte);
* CONNECT and BIND carry ``len`` = 16 (``sizeof(struct sockaddr)``);
* accept() first sends POLL and waits for a pending connection, then sends
  ACCEPT, as a Linux program calling ``poll()`` then ``accept()`` does; at most
  one POLL or ACCEPT is in flight per listening socket (Linux's backend
  answers a second one with -EINTR);
* after RELEASE of an active socket it writes -EBADF into ``in_error``.

Unlike Linux, ``close()`` does not wait for RELEASE's answer (the requests
on the wire are the same; the ring is reused only once the answer came).

Where Linux would return -EAGAIN because every ring slot is busy, this class
waits for a free slot instead (a non-blocking connect() fails with ENOBUFS).
A CONNECT, ACCEPT or POLL, which the network may keep in flight, never takes
the last free slot: the RELEASE of a close() can always go out.  What does
not wait for room (a listener's fileno(), keeping a POLL in flight; a
non-blocking accept()'s ACCEPT) is sent or made ready by the event thread
once answers make room, and meanwhile the listener does not poll readable.

Threads: one event thread per frontend reads the frontend's event channel
handle and wakes whoever waits for command responses.  Each data ring has an
event channel handle of its own (as a Linux process may open
``/dev/xen/evtchn`` once per socket), and a thread blocked in ``recv`` or
``send`` waits on that handle's descriptor itself: a notification from the
backend wakes the thread that needs it, with no relay through the event
thread (one thread switch less per wake-up; the event thread is no
bottleneck for many sockets).  Only if the handle cannot be opened (the
host's limit on handles) does the ring share the frontend's handle, and its
wake-ups go through the event thread.  Sockets the program dropped without
closing them are released by a short-lived thread, which the event thread
starts when there are some.  Several
threads may use different sockets of one frontend at the same time; one
socket may have one thread receiving while another sends.  Should the event
thread fail (a bug of ours, or its event channel handle), or the watch on
the backend's state, nobody would hand over the backend's answers any
more: every call then fails with :class:`OSError` EIO saying that the
frontend failed, the blocked ones at once, and :meth:`Frontend.close`
still closes the device with the backend.

What a :class:`PVSocket` cannot do as a ``socket.socket`` does, because
PV Calls cannot carry it, fails with an error that says so (EOPNOTSUPP
unless said otherwise); the rest of ``socket.socket`` is there, down to
its argument checks and its errors:

* ``shutdown()`` of a connected or listening socket: the protocol only
  releases whole sockets (no half-close; the peer sees the end of the
  stream only at ``close()``).
* Socket options: ``getsockopt`` knows only ``SO_ERROR``, ``SO_TYPE``,
  ``SO_DOMAIN`` and ``SO_ACCEPTCONN``; ``setsockopt`` fails with
  ENOPROTOOPT (turning ``SO_REUSEADDR`` on is accepted: the backend binds
  with it already).
* Out-of-band data (``MSG_OOB``) and any flag but ``MSG_PEEK``,
  ``MSG_DONTWAIT`` and ``MSG_WAITALL`` (``recv``), ``MSG_DONTWAIT``,
  ``MSG_NOSIGNAL`` and ``MSG_MORE`` (``send``); ancillary data in
  ``sendmsg``.
* Addresses the backend does not report: ``getsockname()`` is what
  ``bind()`` was given (port 0 stays 0; ``("0.0.0.0", 0)`` when
  connected), ``accept()`` gives ``("0.0.0.0", 0)`` as the peer's.
* ``listen()`` before ``bind()`` (Linux's binds to a port of its
  choosing, which PV Calls would not tell), and ``connect()`` after it
  (EINVAL: a bound socket is a passive one);
  ``send()`` on a socket never connected says ENOTCONN (a TCP socket's
  EPIPE), as Linux's frontend does.
* ``dup()``, ``detach()`` and ``set_inheritable(True)``: the socket has
  no descriptor of its own (``fileno()`` is for waiting only, see below).

A few calls differ with no error of their own:

* ``shutdown()`` of a socket not connected fails with ENOTCONN, as a TCP
  socket's, but leaves it as it was, where Linux shuts it down all the
  same (its ``recv()`` returns ``b""``, its ``send()`` after ``connect()``
  fails with EPIPE).
* A connection the peer reset stays the socket's until ``close()``:
  ``bind()`` fails with EINVAL (Linux lets go of the port), and so does
  ``connect()`` with EISCONN (Linux's may connect anew), but for the one
  that completes a non-blocking or timed ``connect()``, which reports
  the reset as Linux's does.
* ``sendfile()`` reads a file that is not a regular one (a pipe, a
  ``/proc`` file) and sends what it holds, where CPython's sends nothing
  of one whose size ``fstat()`` says is 0 (it takes it for an empty
  file).  On a closed socket it fails with EBADF, where CPython's says
  ValueError "Invalid file descriptor: -1" for a regular file (an empty
  one sends nothing on both).  A failure before any byte went leaves
  the file's position where it was, where CPython's, for a file that is
  not a regular one, leaves it after what it read.
* ``accept()`` of a socket that is not listening fails with EINVAL at
  once, also with a timeout, where CPython's waits for a connected
  socket to poll readable first.
* A ``connect()`` whose timeout passed (or that a KeyboardInterrupt cut
  short before the backend answered) leaves the socket good only for
  ``close()``: its CONNECT stays in flight, as a TCP handshake goes on,
  but the socket does not follow it.  ``connect()`` fails with EISCONN
  from then on where Linux's says EALREADY until the handshake ends
  (also a blocking one of another thread that waited meanwhile, where
  Linux's goes on waiting for the handshake), ``recv()`` and ``send()``
  with ENOTCONN where Linux's wait for the handshake, and ``fileno()``
  polls writable.
* A blocking ``connect()`` made while another thread's waits for its
  answer waits too, as Linux's for the handshake, and returns once
  connected; if the connect failed, the thread whose ``connect()`` sent
  it gets the error and the other EPIPE.  Linux's gives the error to
  whichever thread wakes first (the later one, measured on 6.18) and
  EPIPE to the other.  If the first one had a timeout and its handshake
  failed (refused, no answer), the other fails with ECONNABORTED, as the
  ``connect()`` after any such one; Linux's gives the error to the
  blocking one, and the timed one, finding ``SO_ERROR`` taken, returns
  as if connected (6.18, measured).  If the first sent nothing (no room
  on the command ring in time, or a KeyboardInterrupt before its CONNECT
  went out), the other sets out itself, as Linux's on the socket left
  unconnected.
* A non-blocking ``connect()`` that finds another thread's ``connect()``
  holding the socket's locks, setting out or putting the socket back
  after a failure, fails with EALREADY (a ``BlockingIOError``) at once,
  as no non-blocking call here waits for a lock of the socket.  Linux's
  waits for its socket lock whatever ``O_NONBLOCK`` says, and then says
  EALREADY (the other's handshake on) or, in the second case, sets out
  itself (EINPROGRESS): the next ``connect()`` here does.
* After a non-blocking or timed ``connect()`` whose handshake failed
  (refused, no answer), ``recv()`` fails with ENOTCONN, where Linux's
  returns ``b""`` until the next ``connect()`` (which fails with
  ECONNABORTED on both, then starts over).  Meanwhile ``bind()``
  succeeds and ``listen()`` fails with EINVAL on both, as on a socket
  still connecting.  After that report, and after any refused blocking
  ``connect()``, the socket listens once bound, where Linux's (6.18,
  measured) fails ``listen()`` with EINVAL for good: a program written
  for it makes a new socket to listen on.

What the peer sees is the backend's doing.  A ``close()`` with received
data unread resets a TCP connection; the backend (as Linux's) closes its
host socket, which sees nothing of what the ring holds: the peer gets a
reset only if unread data was still in that socket, else a FIN (a reset
would drop what the backend still had to send for this socket).  A reset
the peer sends after its FIN is seen as a TCP socket sees it, once the
backend has told (``out_error``): ``recv()`` stays at the end of the
stream, ``getpeername()`` fails with ENOTCONN, ``SO_ERROR`` says EPIPE
once, and ``send()`` fails with EPIPE.

Signals: a call blocked in the main thread looks again at least every half
second, so that a signal handler (Ctrl-C's) runs soon even when the kernel
gave the signal to another thread, which a plain ``socket.socket`` blocked
in the main thread would not notice until it woke.  A Ctrl-C that cuts
short the report of a command the backend refused leaves nothing of it
behind: the next ``accept()`` reports a refused ACCEPT or POLL (the
socket the ACCEPT offered is dropped), a refused ``connect()`` leaves
the socket unconnected (to be tried again), and a non-blocking
``connect()`` whose CONNECT went out completes on its answer, as if it
had said EINPROGRESS.

Waiting on sockets: :meth:`PVSocket.fileno` returns a descriptor that is
readable while ``recv`` or ``accept`` would not block (data, end of
stream, an error, or a pending connection) and writable while ``send``
would not (room in the out ring, or an error; a socket neither connected
nor listening is both, as a TCP socket: its calls fail at once; one whose
``connect()`` waits for the backend's answer, in any thread, is neither,
as a TCP socket in its handshake), so that
selectors loops and asyncio sleep while the peer is slow to read.  It is
*not* the connection (one end of a Unix socket pair the socket keeps, shut
down for writing); pass it only to ``select``/``poll``/``selectors``.
A descriptor that cannot be brought up to date (the program closed it:
EBADF; the kernel short of memory: ENOBUFS) fails none of the socket's
calls that did their job: it is logged on the ``pvcalls.frontend``
logger, once while it lasts (a closed one, for good; ENOBUFS again if it
comes back, at most once a minute), and :meth:`PVSocket.fileno` raises
it, as ``close()`` does a descriptor the program closed.

asyncio: on the default (selector) event loop a non-blocking socket works
with ``loop.sock_connect`` (connect() fails with EINPROGRESS, the answer
makes fileno() writable and ``getsockopt(SO_ERROR)`` says how it went, as
for a TCP socket), ``sock_recv``, ``sock_recv_into``, ``sock_sendall``,
``sock_accept`` and ``sock_sendfile`` (which falls back to ``send``), and
as the ``sock`` of ``open_connection``, ``start_server``,
``create_connection`` and ``connect_accepted_socket``.  What PV Calls
cannot do shows there too:

* A transport's ``write_eof()`` (and ``StreamWriter.write_eof()``) raises
  ``OSError`` EOPNOTSUPP, though ``can_write_eof()`` says True: there is
  no shutdown.  With data still buffered it returns, the data is sent,
  and then the event loop logs the error ("Exception in callback").
  Close the transport instead.
* There are no socket options: the socket of ``get_extra_info("socket")``
  answers ``getsockopt`` only for what the frontend knows itself
  (``SO_ERROR``, ``SO_TYPE``, ``SO_DOMAIN``, ``SO_ACCEPTCONN``) and
  ``setsockopt`` with ENOPROTOOPT (asyncio itself sets ``TCP_NODELAY``
  only on sockets whose ``proto`` is ``IPPROTO_TCP``, which a PVSocket's
  is not).  The addresses in ``get_extra_info`` are those
  :meth:`PVSocket.getsockname` and :meth:`PVSocket.getpeername` give.
* ``asyncio.wait_for`` around ``sock_connect`` stops waiting at its
  timeout, but the CONNECT stays in flight (as a TCP handshake would go
  on): close the socket.
"""

from ._common import FRONTEND_RING_ORDER
from ._frontend import Frontend
from ._socket import PVSocket

__all__ = ["Frontend", "PVSocket", "FRONTEND_RING_ORDER"]
