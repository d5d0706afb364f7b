"""Fixtures for tests that emulate separate LAN hosts with Linux network namespaces.

Every test here skips, with the reason, where namespaces cannot be made (not root, no `ip`,
`ip netns add` refused). Traffic only ever goes to loopback or to namespaces the test made.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lan.netns import Lan, unavailable

HOSTS = 4


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"LAN emulation needs network namespaces: {reason}")


@pytest.fixture
def lan() -> Iterator[Lan]:
    """A switch namespace with a bridge, and 4 host namespaces 10.77.0.1 .. 10.77.0.4
    (`lan.hosts[i].ns`, `.ip`, `.hostname`); all of it deleted afterwards, also on failure."""
    net = Lan(HOSTS)
    try:
        net.create()
        yield net
    finally:
        net.close()
