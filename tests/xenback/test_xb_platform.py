"""xenback.platform.check_platform: what the driver, the XenStore and the
host lock check their platform argument with."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xenback._flags import check_domain_id, check_xenstore_domid
from xenback.platform import (
    PlatformError,
    check_domid,
    check_grant_refs,
    check_page_count,
    check_platform,
    check_port,
)
from xenback.sim import SimHost


class _Services:
    """The methods of a platform, none of them ever called here."""

    def xenstore(self) -> Any: ...
    def gnttab(self) -> Any: ...
    def gntshr(self) -> Any: ...
    def evtchn(self) -> Any: ...


def test_a_platform_s_properties_are_not_called_to_check_it() -> None:
    # Python 3.11's isinstance() against the Protocol read every property:
    # a platform that learns its domid from xenstored failed the *type*
    # check with xenstored's error, and paid for the look-up.
    read: list[str] = []

    class Lazy(_Services):
        @property
        def domid(self) -> int:
            read.append("domid")
            raise OSError(5, "xenstored is not up yet")

        @property
        def run_dir(self) -> Path:
            read.append("run_dir")
            return Path("/run")

    check_platform(Lazy())
    assert read == []


def test_a_property_s_own_attribute_error_is_not_a_wrong_type() -> None:
    # Read through hasattr(), its own bug made the platform "not a Platform".
    class Buggy(_Services):
        run_dir = Path("/run")

        @property
        def domid(self) -> int:
            return self._domid  # type: ignore[attr-defined, no-any-return]

    check_platform(Buggy())


def test_a_platform_whose_members_are_instance_attributes_or_proxied_is_one(
        tmp_path: Path) -> None:
    class Plain:
        def __init__(self) -> None:
            self.domid = 0
            self.run_dir = Path("/run")
            for name in ("xenstore", "gnttab", "gntshr", "evtchn"):
                setattr(self, name, lambda: None)

    class Proxy:
        def __init__(self, real: object) -> None:
            self._real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    check_platform(Plain())
    with SimHost(tmp_path / "run") as host:
        check_platform(host.dom0)
        check_platform(Proxy(host.dom0))


@pytest.mark.parametrize("missing", ["domid", "run_dir", "xenstore", "evtchn"])
def test_a_platform_missing_a_member_is_refused(missing: str) -> None:
    members: dict[str, Any] = {"domid": 0, "run_dir": Path("/run")}
    members.update({name: getattr(_Services, name) for name in ("xenstore", "gnttab", "gntshr",
                                                                 "evtchn")})
    del members[missing]
    partial = type("Partial", (), members)
    with pytest.raises(TypeError, match="^platform must be a xenback.platform.Platform, "
                                        "not Partial$"):
        check_platform(partial())


def test_a_service_set_to_none_is_missing() -> None:
    # As a Protocol's isinstance() has it: None marks a method not there.
    class NoGrants(_Services):
        domid = 0
        run_dir = Path("/run")
        gntshr = None

    with pytest.raises(TypeError, match="not NoGrants$"):
        check_platform(NoGrants())


def test_a_property_member_set_to_none_is_there() -> None:
    # As a Protocol's isinstance() has it: None marks a *method* not
    # there; a property's value (a run_dir set later) may be anything.
    class Later(_Services):
        domid = 0
        run_dir = None

    check_platform(Later())


def test_too_many_refs_are_told_before_any_is_looked_at() -> None:
    with pytest.raises(PlatformError) as info:
        check_grant_refs([8] * 1024 + [-1])
    assert (info.value.errno, info.value.strerror) == (
        errno.EINVAL, "can map 1..1024 refs at once, not 1025")


class _Index:
    """A numpy-style integer: an index (``__index__``), not an int."""

    def __index__(self) -> int:
        return 1


@pytest.mark.parametrize("check", [
    lambda n: check_domid(PlatformError, n), check_port, check_page_count,
    lambda n: check_grant_refs([n])], ids=["domid", "port", "count", "ref"])
def test_an_index_that_is_no_int_is_refused_by_the_platform_checks(
        check: Callable[[Any], object]) -> None:
    """As a float is: the C library's EINVAL, before anything is called
    (see xenback._flags.is_int for why indexes are not taken)."""
    with pytest.raises(PlatformError) as info:
        check(_Index())
    assert info.value.errno == errno.EINVAL


def test_an_index_that_is_no_int_is_a_type_error_saying_an_int(host: Any) -> None:
    checks = [check_domain_id, check_xenstore_domid, host.domain, host.destroy_domain,
              host.toolstack.devices, host.toolstack.destroy_devices]
    for check in checks:
        with pytest.raises(TypeError, match=r" must be (a Domain or a domain id \()?an int"):
            check(_Index())
