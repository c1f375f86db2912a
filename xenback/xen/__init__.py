"""The real-Xen platform: a dom0 (or driver domain) through Linux's Xen
devices and Xen's own libraries.

``xenback.xen.open()`` returns a :class:`~xenback.platform.Platform` whose
XenStore connection is :mod:`pyxs` on the xenstored Unix socket, whose grant
handles drive ``/dev/xen/gntdev`` and ``/dev/xen/gntalloc`` directly, and
whose event-channel handles are cffi (ABI mode) bindings to
``libxenevtchn.so.1``.  On a machine without Xen it raises one
:class:`~xenback.platform.PlatformUnavailable` naming every missing piece.
"""

from xenback.xen._platform import XenPlatform, missing_pieces, open

__all__ = ["XenPlatform", "missing_pieces", "open"]
