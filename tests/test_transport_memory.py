"""MemoryTransport: the simulator's bus must behave like an MQTT broker."""

from __future__ import annotations

import asyncio

import pytest

from p2pfl.transport.base import Message, Transport, TransportError
from p2pfl.transport.memory import MemoryBus, MemoryTransport

pytestmark = pytest.mark.timeout(10)


async def client(bus: MemoryBus, cid: str, will: Message | None = None) -> MemoryTransport:
    t = MemoryTransport(bus, cid)
    await t.connect(will)
    return t


def drain(t: MemoryTransport) -> list[Message]:
    """Everything queued for `t` right now (delivery is synchronous without a delay hook)."""
    out = []
    while not t._inbox.empty():
        item = t._inbox.get_nowait()
        assert isinstance(item, Message)
        out.append(item)
    return out


async def test_implements_the_transport_seam() -> None:
    assert isinstance(MemoryTransport(MemoryBus(), "x"), Transport)


async def test_wildcard_subscriptions_route_by_topic() -> None:
    bus = MemoryBus()
    pub, plus, hash_, exact = [await client(bus, n) for n in ("pub", "plus", "hash", "exact")]
    await plus.subscribe("net/presence/+")
    await hash_.subscribe("net/#")
    await exact.subscribe("net/node/b/inbox")

    await pub.publish("net/presence/a", b"p")
    await pub.publish("net/node/b/inbox", b"m")
    await pub.publish("other/x", b"o")

    assert [m.topic for m in drain(plus)] == ["net/presence/a"]
    assert [m.topic for m in drain(hash_)] == ["net/presence/a", "net/node/b/inbox"]
    assert [(m.topic, m.payload) for m in drain(exact)] == [("net/node/b/inbox", b"m")]


async def test_overlapping_subscriptions_deliver_once_and_unsubscribe_stops() -> None:
    bus = MemoryBus()
    t = await client(bus, "t")
    await t.subscribe("a/#")
    await t.subscribe("a/+")
    await t.publish("a/b", b"1")
    assert len(drain(t)) == 1
    await t.unsubscribe("a/#")
    await t.unsubscribe("a/+")
    await t.publish("a/b", b"2")
    assert drain(t) == []


async def test_dollar_topics_are_not_matched_by_leading_wildcards() -> None:
    bus = MemoryBus()
    t = await client(bus, "t")
    await t.subscribe("#")
    await t.subscribe("+/stats")
    await t.publish("$SYS/stats", b"x")
    assert drain(t) == []
    await t.subscribe("$SYS/#")
    await t.publish("$SYS/stats", b"y")
    assert [m.payload for m in drain(t)] == [b"y"]


async def test_retained_messages_reach_late_subscribers_and_empty_payload_deletes() -> None:
    bus = MemoryBus()
    pub = await client(bus, "pub")
    await pub.publish("presence/a", b"online", retain=True)
    await pub.publish("presence/b", b"online", retain=True)
    await pub.publish("presence/b", b"", retain=True)  # deletes b's retained record

    late = await client(bus, "late")
    await late.subscribe("presence/+")
    got = drain(late)
    assert got == [Message("presence/a", b"online", retain=True)]
    assert bus.retained("presence/b") is None

    # Live messages arrive with retain=False, as MQTT 3.1.1 brokers forward them.
    await pub.publish("presence/a", b"busy", retain=True)
    assert drain(late) == [Message("presence/a", b"busy", retain=False)]
    assert bus.retained("presence/a") == b"busy"


async def test_will_is_published_on_abort_not_on_close() -> None:
    bus = MemoryBus()
    watcher = await client(bus, "w")
    await watcher.subscribe("presence/+")
    will = Message("presence/x", b"offline", retain=True)

    polite = await client(bus, "x", will)
    await polite.close()
    assert drain(watcher) == []
    assert bus.retained("presence/x") is None

    crashed = await client(bus, "x", will)  # the id is free again after close
    await crashed.abort()
    assert drain(watcher) == [Message("presence/x", b"offline")]
    assert bus.retained("presence/x") == b"offline"
    assert "x" not in bus.clients


async def test_many_subscribers_share_one_payload_object() -> None:
    bus = MemoryBus()
    nodes = [await client(bus, f"n{i}") for i in range(300)]
    for n in nodes:
        await n.subscribe("net/telemetry/+")
    payload = bytes(1 << 16)
    await nodes[0].publish("net/telemetry/n0", payload)
    got = [drain(n) for n in nodes]
    assert all(len(g) == 1 for g in got)
    # No copies: every subscriber holds the very same bytes object.
    assert all(g[0].payload is payload for g in got)
    assert nodes[0].stats.published_bytes == len(payload)
    assert sum(n.stats.received_messages for n in nodes) == 300


async def test_closed_or_unconnected_transport_raises() -> None:
    bus = MemoryBus()
    t = MemoryTransport(bus, "t")
    with pytest.raises(TransportError, match="not connected"):
        await t.publish("a", b"x")
    await t.connect()
    await t.close()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("a", b"x")
    with pytest.raises(TransportError, match="closed"):
        await t.subscribe("a")


async def test_duplicate_client_id_is_refused() -> None:
    bus = MemoryBus()
    await client(bus, "same")
    with pytest.raises(TransportError, match="already connected"):
        await client(bus, "same")


async def test_messages_iterator_yields_then_ends_on_close() -> None:
    bus = MemoryBus()
    t = await client(bus, "t")
    await t.subscribe("a")
    await t.publish("a", b"1")
    await t.publish("a", b"2")
    await t.close()
    got = [m.payload async for m in t.messages()]
    assert got == [b"1", b"2"]


async def test_invalid_topics_and_filters_raise_value_error() -> None:
    t = await client(MemoryBus(), "t")
    with pytest.raises(ValueError):
        await t.publish("a/+", b"x")
    with pytest.raises(ValueError):
        await t.subscribe("a/#/b")


async def test_delay_hook_delays_and_drops() -> None:
    calls: list[tuple[str, str, int]] = []

    def delay(src: str, dst: str, size: int) -> float | None:
        calls.append((src, dst, size))
        return None if dst == "lost" else 0.05

    bus = MemoryBus(delay=delay)
    pub, far, lost = [await client(bus, n) for n in ("pub", "far", "lost")]
    await far.subscribe("x")
    await lost.subscribe("x")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await pub.publish("x", b"abc")
    assert drain(far) == []  # not yet: it is in flight
    async with asyncio.timeout(2):
        msg = await anext(far.messages())
    assert msg.payload == b"abc"
    assert loop.time() - start >= 0.04
    assert drain(lost) == []
    assert pub.stats.dropped == 1
    assert sorted(calls) == [("pub", "far", 3), ("pub", "lost", 3)]


async def test_inbox_limit_counts_drops() -> None:
    bus = MemoryBus()
    pub = await client(bus, "pub")
    slow = MemoryTransport(bus, "slow", max_inbox=2)
    await slow.connect()
    await slow.subscribe("x")
    for _ in range(5):
        await pub.publish("x", b".")
    assert len(drain(slow)) == 2
    assert slow.stats.dropped == 3
