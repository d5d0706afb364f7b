"""The simulated network: latency, jitter, bandwidth, loss and partitions of `LinkDelay`."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from p2pfl.simulation.network import LinkDelay, NetworkModel, Partition, resolve_groups
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.helpers import FakeClock

NODES = ["a", "b", "c", "d"]


def by_name(client_id: str) -> str | None:
    """Clients are named `<node>#<incarnation>`; anything else is not a node."""
    node, sep, _ = client_id.partition("#")
    return node if sep and node in NODES else None


def make(model: NetworkModel, *, seed: int = 0, tick: float = 10.0) -> LinkDelay:
    return LinkDelay(model, by_name, FakeClock(tick=tick), seed, nodes=NODES)


def test_latency_and_jitter_stay_within_bounds_and_are_deterministic() -> None:
    model = NetworkModel(latency_ms=10, jitter_ms=4)
    first = make(model, seed=1)
    delays = [first("a#0", "b#0", 100) for _ in range(2000)]
    assert all(d is not None and 0.006 <= d <= 0.014 for d in delays)
    assert len(set(delays)) > 1000  # jitter really varies
    same, other = make(model, seed=1), make(model, seed=2)
    assert [same("a#0", "b#0", 100) for _ in range(2000)] == delays
    assert [other("a#0", "b#0", 100) for _ in range(2000)] != delays
    # each link has its own draws
    assert [first("b#0", "a#0", 100) for _ in range(2000)] != delays


def test_jitter_never_makes_a_delay_negative() -> None:
    link = make(NetworkModel(latency_ms=1, jitter_ms=5))
    delays = [link("a#0", "b#0", 10) for _ in range(1000)]
    assert all(d is not None and 0 <= d <= 0.006 for d in delays)
    assert delays.count(0.0) > 100  # clamped, not redrawn


def test_bandwidth_delay_is_proportional_to_size() -> None:
    link = make(NetworkModel(latency_ms=2, bandwidth_mbps=1))
    assert link("a#0", "b#0", 125_000) == pytest.approx(1.002)  # 1 Mbit at 1 Mbit/s
    assert link("a#0", "b#0", 250_000) == pytest.approx(2.002)
    assert link("a#0", "b#0", 0) == pytest.approx(0.002)


def test_a_link_sends_one_message_after_another() -> None:
    # The clock stands still: ten 1 Mbit chunks sent at once arrive one second apart.
    link = make(NetworkModel(bandwidth_mbps=1), tick=0.0)
    arrivals = [link("a#0", "b#0", 125_000) for _ in range(10)]
    assert arrivals == pytest.approx([float(i) for i in range(1, 11)])
    # another link is not slowed down by it
    assert link("a#0", "c#0", 125_000) == pytest.approx(1.0)


def test_jitter_does_not_reorder_a_link() -> None:
    link = make(NetworkModel(latency_ms=10, jitter_ms=9), tick=0.0)
    arrivals = [d for _ in range(200) if (d := link("a#0", "b#0", 10)) is not None]
    assert len(arrivals) == 200
    assert arrivals == sorted(arrivals) and len(set(arrivals)) == len(arrivals)


def test_loss_rate_is_statistically_right_and_counted() -> None:
    pairs = [("a#0", "b#0"), ("c#0", "d#0")] * 2500
    link = make(NetworkModel(loss=0.2), seed=7)
    results = [link(src, dst, 10) for src, dst in pairs]
    lost = results.count(None)
    assert 0.2 - 0.02 < lost / len(results) < 0.2 + 0.02
    assert link.stats["loss"] == lost
    assert link.stats["delivered"] == len(results) - lost
    again = make(NetworkModel(loss=0.2), seed=7)
    assert [again(src, dst, 10) for src, dst in pairs] == results


def test_loss_one_drops_everything_and_zero_nothing() -> None:
    dead, perfect = make(NetworkModel(loss=1)), make(NetworkModel(loss=0))
    assert all(dead("a#0", "b#0", 1) is None for _ in range(1000))
    assert all(perfect("a#0", "b#0", 1) is not None for _ in range(1000))


def test_partition_drops_only_across_groups_and_only_in_its_window() -> None:
    clock = FakeClock()
    model = NetworkModel(partitions=(Partition(start=10, end=20, split=0.5),))
    link = LinkDelay(model, by_name, clock, 0, nodes=NODES)
    for t, cross_ok in [(0.0, True), (9.99, True), (10.0, False), (19.99, False), (20.0, True)]:
        clock.now = t
        assert (link("a#0", "c#0", 1) is not None) is cross_ok
        assert (link("d#1", "b#0", 1) is not None) is cross_ok
        assert link("a#0", "b#0", 1) is not None  # same half
        assert link("c#0", "d#0", 1) is not None
    assert link.stats["partition"] == 4


def test_partition_groups_by_id_or_index_and_the_rest_together() -> None:
    part = Partition(start=0, end=1, groups=(("a",), (1,)))
    assert resolve_groups(part, NODES) == {"a": 0, "b": 1, "c": 2, "d": 2}
    split = Partition(start=0, end=1, split=0.25)
    assert resolve_groups(split, ["d", "c", "b", "a"]) == {"a": 0, "b": 1, "c": 1, "d": 1}
    with pytest.raises(ValueError, match="unknown node id 'z'"):
        resolve_groups(Partition(start=0, end=1, groups=(("z",),)), NODES)
    with pytest.raises(ValueError, match="out of range"):
        resolve_groups(Partition(start=0, end=1, groups=((4,),)), NODES)


def test_unknown_clients_get_the_base_latency_only() -> None:
    model = NetworkModel(
        latency_ms=3, jitter_ms=2, loss=1, partitions=(Partition(start=0, end=99, split=0.5),)
    )
    link = make(model)
    assert link("monitor", "a#0", 10_000) == pytest.approx(0.003)
    assert link("a#0", "monitor", 10_000) == pytest.approx(0.003)
    assert link.stats["unknown"] == 2
    assert link("a#0", "a#1", 10) == 0.0  # a node hearing itself


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 5, "end": 5, "split": 0.5},
        {"start": 0, "end": 5},
        {"start": 0, "end": 5, "split": 0.5, "groups": [["a"]]},
        {"start": 0, "end": 5, "groups": [["a"], ["a"]]},
        {"start": 0, "end": 5, "split": 1.0},
    ],
)
def test_bad_partitions_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Partition.model_validate(kwargs)


def test_partitions_need_the_node_list() -> None:
    model = NetworkModel(partitions=(Partition(start=0, end=1, split=0.5),))
    with pytest.raises(ValueError, match="node ids"):
        LinkDelay(model, by_name, FakeClock(), 0)


async def test_the_bus_delays_and_drops_as_the_model_says() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    delay = LinkDelay(
        NetworkModel(latency_ms=50), by_name, lambda: loop.time() - t0, 0, nodes=NODES
    )
    bus = MemoryBus(delay=delay)
    sender, receiver = MemoryTransport(bus, "a#0"), MemoryTransport(bus, "b#0")
    for client in (sender, receiver):
        await client.connect()
    await receiver.subscribe("t/#")
    sent = loop.time()
    await sender.publish("t/x", b"hello")
    inbox = receiver.messages()
    message = await asyncio.wait_for(anext(inbox), 2.0)
    assert message.payload == b"hello"
    assert loop.time() - sent >= 0.045

    lossy = MemoryBus(delay=LinkDelay(NetworkModel(loss=1), by_name, lambda: 0.0, 0))
    sender, receiver = MemoryTransport(lossy, "a#0"), MemoryTransport(lossy, "b#0")
    for client in (sender, receiver):
        await client.connect()
    await receiver.subscribe("t/#")
    await sender.publish("t/x", b"lost")
    assert sender.stats.dropped == 1
    assert receiver.stats.received_messages == 0


def test_a_model_is_active_only_when_links_do_something() -> None:
    assert not NetworkModel().active
    assert NetworkModel(latency_ms=1).active
    assert NetworkModel(bandwidth_mbps=10).active
    assert NetworkModel(partitions=(Partition(start=0, end=1, split=0.5),)).active
