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
from p2pfl.identity import Identity
from p2pfl.inbox import reason_label
from p2pfl.protocol import topics
from p2pfl.transport.base import Message
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.trust import Trust
from tests.conftest import WaitUntil
from tests.helpers import FakeClock
from tests.nodeproc import free_ports

NET = "memb"
OURS = "mqtt://10.77.0.1:1883"


class Harness:
    """One node's `Membership` on a memory bus, with its refusals counted by label."""

    def __init__(
        self, own: OwnBroker | None = None, *, trust: Trust | None = None, **config: Any
    ) -> None:
        self.config = NodeConfig(network=NET, id="me", **config)
        self.transport = MemoryTransport(MemoryBus(), "me")
        self.clock = FakeClock(100.0)  # the view's: when a peer was last heard
        self.view = PeerView("me", ttl=15.0, clock=self.clock)
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
            trust=trust,
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


async def test_a_reachable_peer_that_never_announces_back_points_at_our_address(
    wait_until: WaitUntil,
) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    theirs = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    h = Harness(own=OwnBroker("0.0.0.0", 1883, [OURS]), discovery=("mdns", "presence"))
    async with server, started(h):
        h.membership.discovered(
            PeerInfo(id="m3", role="trainer", broker=theirs, source="mdns", brokers=(theirs,))
        )
        await wait_until(lambda: "m3" in h.membership._introduced)  # the loop took it in
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


# -- only peers of the view: pending dials, byes, and the brokers we announce to -------------


async def bye(h: Harness, peer_id: str, round: int) -> None:
    payload = encode_presence(
        NET, peer_id, 2, online=False, role="trainer", broker=f"mqtt://{peer_id}:1883", round=round
    )
    await h.membership.on_message(Message(topics.presence(NET, peer_id), payload, True))


async def test_a_peer_whose_addresses_are_being_probed_counts_as_pending(
    wait_until: WaitUntil,
) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    good = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    h = Harness(discovery=("static", "presence"))
    async with server:
        await h.presence("m5", ["mqtt://10.77.0.9:1883", good])  # queued for the probe
        assert h.membership.pending("m5") and "m5" not in h.view
        async with started(h):
            await wait_until(lambda: "m5" in h.view, within=10)
            await wait_until(lambda: not h.membership.pending("m5"))


async def test_only_a_bounded_number_of_records_wait_for_a_probe() -> None:
    h = Harness(discovery=("static", "presence"))
    for i in range(200):
        await h.presence(f"s{i}", [f"mqtt://10.77.1.{i}:1883", f"mqtt://10.77.2.{i}:1883"])
    pending = [i for i in range(200) if h.membership.pending(f"s{i}")]
    assert pending == list(range(64))


async def test_a_bye_is_remembered_only_for_peers_of_the_view_and_boundedly() -> None:
    h = Harness(discovery=("static", "presence"), max_peers=2)
    async with started(h):
        await bye(h, "stranger", 5)
        assert h.membership.finished == {}  # it never shaped our rounds
        for peer_id in ("a", "b", "c"):
            await h.presence(peer_id, [f"mqtt://{peer_id}:1883"])
            await bye(h, peer_id, 5)
        assert h.membership.finished == {"b": 5, "c": 5}


async def test_brokers_of_peers_that_left_are_no_longer_announced_to() -> None:
    h = Harness(
        peers=[{"id": "cfg", "broker": "mqtt://10.77.0.5:1883"}], discovery=("static", "presence")
    )
    h.view.on_leave = h.membership.forget
    async with started(h):
        await h.membership.start()
        await h.presence("a", ["mqtt://10.77.0.6:1883"])
        await h.presence("b", ["mqtt://10.77.0.7:1883"])
        await h.presence("c", ["mqtt://10.77.0.7:1883"])  # shares b's broker
        await h.presence("cfg", ["mqtt://10.77.0.5:1883"])
        announced = set(h.membership._announced)
        assert {"mqtt://10.77.0.5:1883", "mqtt://10.77.0.6:1883", "mqtt://10.77.0.7:1883"} <= (
            announced
        )
        for peer_id in ("a", "b", "cfg"):
            await bye(h, peer_id, 1)
        # a's broker goes; c still lives at b's; a configured peer's broker always stays
        assert h.membership._announced == announced - {"mqtt://10.77.0.6:1883"}


async def test_a_peer_the_view_refuses_is_not_announced_to() -> None:
    h = Harness(discovery=("static", "presence"))
    h.view.max_peers = 1
    h.view.on_refuse = lambda src, reason: h.rejected.update([reason_label(reason)])
    async with started(h):
        await h.presence("a", ["mqtt://10.77.0.6:1883"])
        await h.presence("b", ["mqtt://10.77.0.8:1883"])
    assert "b" not in h.view and h.rejected == {"max-peers": 1}
    assert "mqtt://10.77.0.8:1883" not in h.membership._announced


# -- the same record twice: MQTT delivers at least once ---------------------------------------


async def test_a_presence_record_delivered_twice_is_taken_once_and_refuses_nothing() -> None:
    """A broker's retained copy and the live publish (or one record announced on two brokers)
    reach a node twice: the copy is dropped unremarked, and refreshes nothing either (an
    attacker re-sending a peer's latest record cannot keep it alive). A different record under
    a seq already taken, or an older record, is still a replay."""
    key = Identity.generate()
    h = Harness(trust=Trust("tofu"), discovery=("static", "presence"))

    def record(seq: int, round: int) -> Message:
        payload = encode_presence(
            NET, "a", seq, online=True, role="trainer", broker="mqtt://10.77.0.6:1883",
            round=round, signer=key,
        )  # fmt: skip
        return Message(topics.presence(NET, "a"), payload, True)

    first = record(10, round=1)
    async with started(h):
        await h.membership.on_message(first)
        heard = h.view.get("a")
        assert heard is not None and heard.last_seen == 100.0
        h.clock.now += 5
        await h.membership.on_message(first)
        assert h.view.get("a") == heard and not h.rejected

        await h.membership.on_message(record(10, round=2))  # the seq again, another body
        assert h.rejected == {"replay": 1}
        await h.membership.on_message(record(11, round=2))  # its next heartbeat
        refreshed = h.view.get("a")
        assert refreshed is not None and refreshed.last_seen == 105.0 and refreshed.round == 2
        await h.membership.on_message(first)  # an old record replayed
        assert h.rejected == {"replay": 2} and h.view.get("a") == refreshed
