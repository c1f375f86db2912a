"""A XenStore server for the simulated Xen host.

It speaks the wire protocol of xs_wire.h over Unix sockets, so unmodified
clients (pyxs, libxenstore's xenstore-* tools, Xen's own test-xenstore) work
against it.  Connections on the main socket are dom0; each introduced domain
gets a socket of its own whose connections are that domain, unprivileged.

    with XenStored(run_dir) as xsd:
        os.environ["XENSTORED_PATH"] = str(xsd.path)
        guest_socket = xsd.introduce_domain(1)
"""

from ._client import RawClient
from ._ops import Quota
from ._server import XenStored
from ._wire import Op, XsError

__all__ = ["XenStored", "Quota", "RawClient", "Op", "XsError"]
