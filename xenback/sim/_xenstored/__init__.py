"""A XenStore server for the simulated Xen host.

It speaks the wire protocol of xs_wire.h over Unix sockets, so unmodified
clients (pyxs, libxenstore's xenstore-* tools, Xen's own test-xenstore) work
against it.  Connections on the main socket are dom0; each introduced domain
gets a socket of its own whose connections are that domain, unprivileged.

    with XenStored(run_dir) as xsd:
        os.environ["XENSTORED_PATH"] = str(xsd.path)
        guest_socket = xsd.introduce_domain(1)

Semantics are those of Xen 4.17's cxenstored.  Modules, one concern each:
_wire (header, op numbers, error names), _tree (nodes, paths, permissions,
the live store), _transaction (generation-checked private views), _watch
(watch index), _connection (per-domain and per-connection state), _ops (one
handler per operation), _server (sockets and the single loop thread that
owns all of the above), _client (a raw wire client for tests and tools).
"""

from ._client import RawClient
from ._ops import Quota
from ._server import XenStored
from ._wire import Op, XsError

__all__ = ["XenStored", "Quota", "RawClient", "Op", "XsError"]
