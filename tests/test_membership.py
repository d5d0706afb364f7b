"""Membership: dialling a peer's addresses, refusing our own broker, and saying why nobody came.

Presence travels on the in-memory bus; broker probes are real TCP connections to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2pfl.config import NodeConfig
from p2pfl.discovery.addresses import OwnBroker
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.discovery.presence import encode_presence
from p2pfl.inbox import reason_label
from p2pfl.protocol import topics
from p2pfl.transport.base import Message
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.conftest import WaitUntil
from tests.nodeproc import free_ports

NET = "memb"
OURS = "mqtt://10.77.0.1:1883"


class Harness:
    """One node's `Membership` on a memory bus, with its refusals counted by label."""

    def __init__(self, own: OwnBroker | None = None, **config: Any) -> None:
        self.config = NodeConfig(network=NET, id="me", **config)
        self.transport = MemoryTransport(MemoryBus(), "me")
        self.view = PeerView("me", ttl=15.0)
        self.rejected: Counter[str] = Counter()
        self.membership = Membership(
            self.config,
            self.transport,
            self.view,
            node_id="me",
            home_broker=OURS,
            next_seq=lambda: 1,
            current_round=lambda: 0,
            reject=lambda src, reason: self.rejected.update([reason_label(reason)]),
            clock=lambda: 0.0,
            advertised=[OURS],
            own_broker=own,
        )

    async def presence(self, peer_id: str, brokers: list[str]) -> None:
        payload = encode_presence(
            NET, peer_id, 1, online=True, role="trainer", broker=brokers[0], brokers=brokers
        )
        await self.membership.on_message(Message(topics.presence(NET, peer_id), payload, True))


@contextlib.asynccontextmanager
async def started(h: Harness) -> AsyncIterator[Harness]:
    await h.transport.connect()
    task = asyncio.create_task(h.membership.discovery_loop())
    try:
        yield h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.transport.close()


async def test_a_peer_naming_our_own_broker_is_refused_and_counted() -> None:
    # The bug this guards: every node of a LAN announced 127.0.0.1:1883 and dialled itself.
    h = Harness(own=OwnBroker("0.0.0.0", 1883, [OURS]), discovery=("static", "presence"))
    async with started(h):
        await h.presence("m2", ["mqtt://127.0.0.1:1883"])
        assert "m2" not in h.view
        assert h.rejected == {"own-broker": 1}
        why = await h.membership.diagnose()
        assert "m2 announces mqtt://127.0.0.1:1883, which is this node's own broker" in why
        assert "--advertise" in why


async def test_a_peer_with_another_port_on_loopback_is_not_us() -> None:
    # Several nodes on one machine share 127.0.0.1 with distinct ports.
    h = Harness(own=OwnBroker("127.0.0.1", 18830), discovery=("static", "presence"))
    async with started(h):
        await h.presence("m2", ["mqtt://127.0.0.1:18831"])
        assert h.view.get("m2") is not None
        assert not h.rejected


async def test_the_first_address_that_answers_is_kept(wait_until: WaitUntil) -> None:
    (closed,) = free_ports(1)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    good = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    dead = f"mqtt://127.0.0.1:{closed}"
    h = Harness(own=OwnBroker("0.0.0.0", 1883, [OURS]), discovery=("static", "presence"))
    async with server, started(h):
        # Our own address among theirs is skipped without a probe; the dead one is probed.
        await h.presence("m2", [OURS, dead, good])
        await wait_until(lambda: h.view.get("m2") is not None, within=10)
        info = h.view.get("m2")
        assert info is not None
        assert info.broker == good
        assert info.candidates == (dead, good)
        assert "connection refused" in h.membership.unreachable[dead]
        # The next heartbeat reuses the route at once (no probe): the view does not change.
        version = h.view.version
        await h.presence("m2", [OURS, dead, good])
        again = h.view.get("m2")
        assert again is not None and again.broker == good
        assert h.view.version == version


async def test_static_peer_at_a_closed_port_is_diagnosed_unreachable() -> None:
    (closed,) = free_ports(1)
    h = Harness(
        own=OwnBroker("127.0.0.1", 1883),
        peers=[{"id": "ghost", "broker": f"mqtt://127.0.0.1:{closed}"}],
        discovery=("static", "presence"),
    )
    async with started(h):
        await h.membership.start()
        why = await h.membership.diagnose()
    assert f"peer ghost: broker unreachable at 127.0.0.1:{closed}" in why
    assert "connection refused" in why


async def test_nobody_found_over_mdns_says_so() -> None:
    h = Harness(own=OwnBroker("0.0.0.0", 1883, [OURS]))
    async with started(h):
        why = await h.membership.diagnose()
    assert "answered over mDNS" in why
    assert "5353" in why
    assert f"p2pfl doctor --network {NET}" in why


async def test_a_reachable_peer_that_never_announces_back_points_at_our_address() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    theirs = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    h = Harness(own=OwnBroker("0.0.0.0", 1883, [OURS]), discovery=("mdns", "presence"))
    async with server, started(h):
        h.membership.discovered(
            PeerInfo(id="m3", role="trainer", broker=theirs, source="mdns", brokers=(theirs,))
        )
        await asyncio.sleep(0.1)
        why = await h.membership.diagnose()
    assert "m3: its broker answers but its presence never arrived" in why
    assert OURS in why


async def test_loopback_only_advertisement_is_named() -> None:
    h = Harness(own=OwnBroker("0.0.0.0", 1883, ["mqtt://127.0.0.1:1883"]))
    h.membership.advertised = ("mqtt://127.0.0.1:1883",)
    assert "a loopback address other machines cannot reach" in await h.membership.diagnose()


@pytest.mark.parametrize("source", ["mdns", "static"])
async def test_without_presence_discovered_peers_join_at_their_working_address(
    source: str, wait_until: WaitUntil
) -> None:
    (closed,) = free_ports(1)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    good = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    dead = f"mqtt://127.0.0.1:{closed}"
    h = Harness(discovery=("mdns", "static"))
    async with server, started(h):
        h.membership.discovered(
            PeerInfo(id="m4", role="trainer", broker=dead, source=source, brokers=(dead, good))
        )
        await wait_until(lambda: h.view.get("m4") is not None, within=10)
        info = h.view.get("m4")
        assert info is not None and info.broker == good
