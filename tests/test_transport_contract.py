"""The transport contract: the same behaviour tests over every `Transport` a node can have.

Each test runs on `MemoryTransport` (the simulator's bus), on that bus behind the simulator's
network model (latency, jitter, bandwidth), and on `MqttTransport` through a real Mosquitto and
through the embedded amqtt broker, both on free 127.0.0.1 ports.
What only one transport does (the bus's delay hook, remote-broker links, TLS) is tested in
test_transport_memory.py and test_transport_mqtt.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from p2pfl.simulation.network import LinkDelay, NetworkModel
from p2pfl.transport.base import (
    MAX_INBOX,
    MAX_INBOX_BYTES,
    MAX_PAYLOAD,
    LocalBroker,
    Message,
    Transport,
    TransportError,
)
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.transport.mqtt import MqttOptions, MqttTransport
from tests.receiving import collect, nothing_arrives, receive

pytestmark = pytest.mark.timeout(30)

KINDS = ("memory", "memory-net", "mosquitto", "embedded")
# Delays of a few milliseconds that differ per message: deliveries overlap in time.
LAN = NetworkModel(latency_ms=3.0, jitter_ms=3.0, bandwidth_mbps=2000.0)
# Short keepalive and backoff keep reconnects quick; generous connect and drain bounds let a
# loaded machine be slow without failing a test.
FAST = MqttOptions(
    backoff_min=0.05, backoff_max=0.3, keepalive=5, connect_timeout=10.0, drain_timeout=10.0
)
WaitUntil = Callable[..., Awaitable[None]]


class Bench:
    """One broker of a kind (`memory`: a `MemoryBus`) and the transports connected to it."""

    def __init__(self, kind: str, broker: LocalBroker | None, bus: MemoryBus) -> None:
        self.kind = kind
        self.broker = broker
        self.bus = bus
        self.made: list[Transport] = []

    async def client(
        self,
        cid: str,
        will: Message | None = None,
        *,
        max_payload: int = MAX_PAYLOAD,
        max_inbox: int = MAX_INBOX,
        max_inbox_bytes: int = MAX_INBOX_BYTES,
    ) -> Transport:
        """A connected transport with these limits; closed after the test."""
        t: Transport
        if self.broker is None:
            t = MemoryTransport(
                self.bus,
                cid,
                max_payload=max_payload,
                max_inbox=max_inbox,
                max_inbox_bytes=max_inbox_bytes,
            )
        else:
            limits = replace(
                FAST, max_payload=max_payload, max_inbox=max_inbox, max_inbox_bytes=max_inbox_bytes
            )
            t = MqttTransport(self.broker.uri, cid, limits)
        self.made.append(t)
        await t.connect(will)
        return t

    def real_broker(self) -> LocalBroker:
        """The MQTT broker; skips the test on the bus, which is in-process and never goes down."""
        if self.broker is None:
            pytest.skip("the in-memory bus lives in the nodes' process: it cannot go down")
        return self.broker


@pytest.fixture(params=KINDS)
async def bench(request: pytest.FixtureRequest, make_broker) -> AsyncIterator[Bench]:
    kind = request.param
    bus = MemoryBus()
    if kind == "memory-net":
        clock = asyncio.get_running_loop().time
        bus = MemoryBus(delay=LinkDelay(LAN, node_of=lambda c: c, clock=clock, seed=7))
    broker = None if kind.startswith("memory") else make_broker(kind)
    bench = Bench(kind, broker, bus)
    yield bench
    for t in bench.made:
        await t.close()


async def test_messages_reach_matching_subscriptions_at_qos_0_and_1(bench: Bench) -> None:
    pub = await bench.client("pub")
    plus = await bench.client("plus")
    hash_ = await bench.client("hash")
    await plus.subscribe("net/node/+/inbox")
    await hash_.subscribe("net/#")
    await pub.publish("net/node/b/inbox", b"q1", qos=1)
    await pub.publish("net/presence/a", b"q0", qos=0)
    await pub.publish("other/x", b"nobody's")
    await pub.publish("net/node/c/inbox", b"q1 again")
    assert [(m.topic, m.payload) for m in await receive(plus, 2)] == [
        ("net/node/b/inbox", b"q1"),
        ("net/node/c/inbox", b"q1 again"),
    ]
    assert [m.payload for m in await receive(hash_, 3)] == [b"q1", b"q0", b"q1 again"]
    assert await nothing_arrives(plus) and await nothing_arrives(hash_)
    async with asyncio.timeout(10):
        await pub.flush()
    assert pub.stats.published_messages == 4
    assert plus.stats.received_messages == 2
    assert plus.stats.received_bytes == len(b"q1") + len(b"q1 again")
    with pytest.raises(ValueError, match="QoS"):
        await pub.publish("net/x", b"", qos=3)


async def test_unsubscribe_stops_delivery(bench: Bench) -> None:
    t = await bench.client("t")
    await t.subscribe("a/+")
    await t.publish("a/b", b"1")
    assert [m.payload for m in await receive(t)] == [b"1"]
    await t.unsubscribe("a/+")
    await t.publish("a/b", b"2")
    assert await nothing_arrives(t)


async def test_a_message_matching_two_filters_arrives_once_except_on_amqtt(bench: Bench) -> None:
    """MQTT 3.1.1 leaves this to the broker: Mosquitto and the bus send one copy, amqtt one per
    matching filter. Nodes subscribe to disjoint filters, so they never see the difference."""
    t = await bench.client("t")
    await t.subscribe("a/#")
    await t.subscribe("a/+")
    await t.publish("a/b", b"1")
    got = await receive(t) + await collect(t)
    assert [m.payload for m in got] == [b"1"] * (2 if bench.kind == "embedded" else 1)


async def test_payload_up_to_max_payload_arrives_intact_and_above_it_is_refused(
    bench: Bench,
) -> None:
    limit = 64 * 1024
    pub = await bench.client("pub", max_payload=limit)
    sub = await bench.client("sub")
    await sub.subscribe("big")
    at_limit = hashlib.sha256(b"seed").digest() * (limit // 32)
    await pub.publish("big", at_limit)
    with pytest.raises(ValueError, match="chunk it"):
        await pub.publish("big", at_limit + b"!")
    (got,) = await receive(sub)
    assert got.payload == at_limit
    assert await nothing_arrives(sub)
    await pub.flush()
    assert pub.stats.published_messages == 1 and pub.stats.dropped == 0


async def test_five_megabyte_payload_arrives_intact(bench: Bench) -> None:
    a = await bench.client("a")
    b = await bench.client("b")
    await b.subscribe("big")
    payload = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    await a.publish("big", payload)
    (got,) = await receive(b, within=15)
    assert got.payload == payload


def test_every_transport_has_the_same_default_limits() -> None:
    memory = MemoryTransport(MemoryBus(), "m")
    options = MqttOptions()
    assert memory.max_payload == options.max_payload == MAX_PAYLOAD
    assert (options.max_inbox, options.max_inbox_bytes) == (MAX_INBOX, MAX_INBOX_BYTES)


async def test_retained_message_reaches_late_subscribers_and_empty_payload_deletes(
    bench: Bench,
) -> None:
    a = await bench.client("a")
    await a.subscribe("net/presence/+")
    await a.publish("net/presence/a", b"online", retain=True)
    await a.publish("net/presence/gone", b"online", retain=True)
    await a.publish("net/presence/gone", b"", retain=True)  # an empty retained payload deletes
    # Live messages arrive with retain=False, as MQTT 3.1.1 brokers forward them; our own echo
    # also proves the broker has processed (and stored) all three.
    assert await receive(a, 3) == [
        Message("net/presence/a", b"online"),
        Message("net/presence/gone", b"online"),
        Message("net/presence/gone", b""),
    ]
    late = await bench.client("late")
    await late.subscribe("net/presence/+")
    got = await receive(late) + await collect(late)  # the first may take a while, then the rest
    assert set(got) == {Message("net/presence/a", b"online", retain=True)}
    # amqtt may send it twice (see p2pfl.transport.embedded); the others send it once.
    assert len(got) == 1 or bench.kind == "embedded"


async def test_will_is_published_on_abort_not_on_close(bench: Bench) -> None:
    watcher = await bench.client("watcher")
    await watcher.subscribe("net/presence/+")
    will = Message("net/presence/x", b"offline", retain=True)

    polite = await bench.client("x", will)
    await polite.close()
    assert await nothing_arrives(watcher)

    crashing = await bench.client("x", will)  # the id is free again after close
    await crashing.abort()
    assert await receive(watcher) == [Message("net/presence/x", b"offline")]
    # The will was retained, so a newcomer learns that x is offline.
    late = await bench.client("late")
    await late.subscribe("net/presence/x")
    assert await receive(late) == [Message("net/presence/x", b"offline", retain=True)]


async def test_a_crashed_client_rejoins_under_its_id(bench: Bench) -> None:
    """What the simulator's crash and rejoin rely on: a new client takes the id over."""
    will = Message("net/presence/x", b"offline", retain=True)
    first = await bench.client("x", will)
    await first.subscribe("net/node/x/inbox")
    await first.abort()
    again = await bench.client("x", will)
    await again.subscribe("net/presence/x")
    assert await receive(again) == [Message("net/presence/x", b"offline", retain=True)]
    await again.publish("net/presence/x", b"online", retain=True)
    await again.subscribe("net/node/x/inbox")
    peer = await bench.client("peer")
    await peer.publish("net/node/x/inbox", b"model")
    got = await receive(again, 2)
    assert got == [Message("net/presence/x", b"online"), Message("net/node/x/inbox", b"model")]


async def test_reconnects_resubscribes_and_delivers_what_was_queued(
    bench: Bench, wait_until: WaitUntil
) -> None:
    broker = bench.real_broker()
    t = await bench.client("t")
    assert isinstance(t, MqttTransport)
    await t.subscribe("net/node/t/inbox")
    broker.stop()
    await wait_until(lambda: not t.connected)
    await t.publish("net/node/t/inbox", b"queued while down")  # waits in the outbox
    await t.subscribe("late/x")  # recorded; the broker hears of it after the reconnect
    await asyncio.to_thread(broker.start)  # same port
    assert await receive(t, within=10) == [Message("net/node/t/inbox", b"queued while down")]
    other = await bench.client("other")
    await other.publish("late/x", b"now")
    assert await receive(t) == [Message("late/x", b"now")]
    assert t.stats.reconnects >= 1
    assert t.stats.dropped == 0


async def test_each_senders_messages_arrive_in_the_order_sent_per_qos(bench: Bench) -> None:
    """MQTT orders one sender's messages per QoS level only: on Mosquitto a QoS 0 message
    overtakes QoS 1 ones that paho or the broker holds back while its in-flight window is full.
    The bus keeps a total order, which satisfies this too."""
    sink = await bench.client("sink")
    await sink.subscribe("net/node/sink/+")
    senders = [await bench.client(f"s{i}") for i in range(2)]
    count = 150
    for seq in range(count):
        for i, s in enumerate(senders):
            size = 1 + (seq * 7919) % 20_000  # sizes vary: a small one must not overtake
            body = f"s{i}:{seq % 2}:{seq}:".encode().ljust(size, b".")
            await s.publish(f"net/node/sink/{'ab'[seq % 3 % 2]}", body, qos=seq % 2)
    got = await receive(sink, 2 * count, within=20)
    for i in range(2):
        for qos in (0, 1):
            head = f"s{i}:{qos}:".encode()
            seqs = [int(m.payload.split(b":")[2]) for m in got if m.payload.startswith(head)]
            assert seqs == list(range(qos, count, 2))


async def test_inbox_bounds_drop_and_count_what_a_slow_reader_cannot_hold(
    bench: Bench, wait_until: WaitUntil
) -> None:
    slow = await bench.client("slow", max_inbox=4, max_inbox_bytes=1_000_000)
    await slow.subscribe("net/node/slow/inbox")
    flooder = await bench.client("flooder")
    for i in range(8):  # 1.6 MB: the bytes bound stops it after 5 messages
        await flooder.publish("net/node/slow/inbox", bytes([i]) * 200_000)
    for i in range(3):  # small: the message bound stops these
        await flooder.publish("net/node/slow/inbox", f"small {i}".encode())

    def all_arrived() -> bool:
        return slow.stats.received_messages + slow.stats.dropped == 11

    await wait_until(all_arrived, within=20)
    assert slow.stats.received_messages == 4 and slow.stats.dropped == 7
    got = await receive(slow, 4)
    assert [m.payload[:1] for m in got] == [bytes([i]) for i in range(4)]
    await flooder.publish("net/node/slow/inbox", b"room again")
    assert [m.payload for m in await receive(slow)] == [b"room again"]


async def test_messages_yield_what_arrived_then_end_on_close(
    bench: Bench, wait_until: WaitUntil
) -> None:
    t = await bench.client("t")
    await t.subscribe("a")
    await t.publish("a", b"1")
    await t.publish("a", b"2")
    await wait_until(lambda: t.stats.received_messages == 2)
    await t.close()
    assert [m.payload async for m in t.messages()] == [b"1", b"2"]
    assert [m async for m in t.messages()] == []  # a later reader ends at once too


async def test_close_delivers_what_was_published(bench: Bench) -> None:
    sink = await bench.client("sink")
    await sink.subscribe("x/+")
    a = await bench.client("a")
    for i in range(50):
        await a.publish(f"x/{i}", bytes(10_000))
    await a.close()  # without flush() first: close() itself flushes
    assert a.stats.published_messages == 50
    assert a.stats.dropped == 0
    got = await receive(sink, 50)
    assert {m.topic for m in got} == {f"x/{i}" for i in range(50)}


async def test_unconnected_or_closed_transport_refuses_work(bench: Bench) -> None:
    t = await bench.client("t")
    await t.close()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("x", b"")
    with pytest.raises(TransportError, match="closed"):
        await t.subscribe("x")
    assert [m async for m in t.messages()] == []
    fresh: Transport = (
        MemoryTransport(bench.bus, "fresh")
        if bench.broker is None
        else MqttTransport(bench.broker.uri, "fresh", FAST)
    )
    with pytest.raises(TransportError, match="not connected"):
        await fresh.publish("x", b"")


async def test_invalid_topics_and_filters_are_caller_errors(bench: Bench) -> None:
    t = await bench.client("t")
    with pytest.raises(ValueError, match="wildcards"):
        await t.publish("x/#", b"")
    with pytest.raises(ValueError, match="wildcards"):
        await t.publish("a/+", b"")
    with pytest.raises(ValueError, match="'#'"):
        await t.subscribe("a/#/b")
