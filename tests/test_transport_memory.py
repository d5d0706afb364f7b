"""MemoryTransport: what only the simulator's bus does (its trie, shared payloads, the delay
hook). What every transport does is in test_transport_contract.py."""

from __future__ import annotations

import asyncio

import pytest

from p2pfl.transport.base import Message, Transport, TransportError
from p2pfl.transport.memory import MemoryBus, MemoryTransport

pytestmark = pytest.mark.timeout(10)


async def client(bus: MemoryBus, cid: str) -> MemoryTransport:
    t = MemoryTransport(bus, cid)
    await t.connect()
    return t


def drain(t: MemoryTransport) -> list[Message]:
    """Everything queued for `t` right now (delivery is synchronous without a delay hook)."""
    out, queue = [], t._inbox._queue
    while not queue.empty():
        item = queue.get_nowait()
        assert isinstance(item, Message)
        out.append(item)
    return out


async def test_implements_the_transport_seam() -> None:
    assert isinstance(MemoryTransport(MemoryBus(), "x"), Transport)


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


async def test_duplicate_client_id_is_refused() -> None:
    bus = MemoryBus()
    await client(bus, "same")
    with pytest.raises(TransportError, match="already connected"):
        await client(bus, "same")


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


async def test_a_link_keeps_its_order_whatever_the_delays() -> None:
    """A hook that delays a later message less must not let it overtake (TCP does not)."""
    delays = iter([0.08, 0.01, 0.0, 0.03])
    bus = MemoryBus(delay=lambda src, dst, size: next(delays) if src == "pub" else 0.0)
    pub, sub = [await client(bus, n) for n in ("pub", "sub")]
    await sub.subscribe("x")
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(4):
        await pub.publish("x", bytes([i]))
    got = []
    async with asyncio.timeout(2):
        async for message in sub.messages():
            got.append((message.payload, loop.time() - start))
            if len(got) == 4:
                break
    assert [payload for payload, _ in got] == [b"\x00", b"\x01", b"\x02", b"\x03"]
    assert got[-1][1] >= 0.07  # the last waited for the first, which took 80 ms
    assert bus._in_flight == {}
