"""Opening the real platform (implementation in progress)."""

from __future__ import annotations

from xenback.platform import PlatformUnavailable


class XenPlatform:
    """A :class:`~xenback.platform.Platform` on a real Xen host."""


def missing_pieces() -> list[str]:
    """What this machine lacks to run a backend on real Xen ([] if nothing)."""
    return ["implementation"]


def open() -> XenPlatform:  # noqa: A001 - the module's public verb, like io.open
    """Open the real Xen platform, or raise :class:`PlatformUnavailable`."""
    raise PlatformUnavailable("xenback.xen is not implemented yet")
