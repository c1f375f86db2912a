"""``with`` support for the many objects whose way out is ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """A mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` on the
    way out, whatever happened inside.  A class whose entry must do more
    (open a connection, start threads) overrides ``__enter__`` only."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
