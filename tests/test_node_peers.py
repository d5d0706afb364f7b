"""Only peers of the view steer a node: whose models are taken and merged, which rounds bound
the round ceiling, what a flood of Sybil presence records gets, and what goes when a peer leaves.

Under tofu anyone can make a key, so these attackers sign with keys of their own: their
messages verify, and what stops them is membership, not the signature.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from p2pfl.discovery.presence import encode_presence
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.node import Node
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.model import layout
from p2pfl.topology import make_schedule
from p2pfl.transport.base import Message
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.conftest import WaitUntil
from tests.helpers import FakeClock
from tests.test_node import (
    _SEQ,
    BUS,
    KEYS,
    NET,
    bus_client,
    make_config,
    make_learner,
    make_node,
    model_message,
    running,
)

pytestmark = pytest.mark.timeout(60)

TTL = 15.0  # a peer is established after a heartbeat interval, TTL / 3


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_dataset("mnist1d", seed=0)


def idle_node(dataset: Dataset, clock: FakeClock, **overrides: Any) -> Node:
    """A node that is not running: its parts are driven by hand, on a fake clock."""
    fields: dict[str, Any] = {"discovery": ("static", "presence"), **overrides}
    config = make_config("me", mode="async", presence_ttl=TTL, **fields)
    node = Node(
        config, make_learner(dataset, 0), MemoryTransport(MemoryBus(), "me"), node_id="me",
        home_broker=BUS, schedule=make_schedule("ring"), clock=clock,
    )  # fmt: skip
    node.inbox.layout = layout(node.learner.get_weights())
    return node


async def presence(node: Node, peer_id: str, *, online: bool = True, **fields: Any) -> None:
    """A verified presence record of `peer_id` reaching the node's membership."""
    payload = encode_presence(
        NET, peer_id, next(_SEQ), online=online, broker=BUS, signer=KEYS[peer_id],
        **{"role": "trainer", **fields},
    )  # fmt: skip
    await node.membership.on_message(Message(topics.presence(NET, peer_id), payload, True))


def weights(node: Node) -> Mapping[str, np.ndarray]:
    return node.learner.get_weights()


async def test_fresh_peers_do_not_move_the_round_ceiling(dataset: Dataset) -> None:
    clock = FakeClock(100.0)
    node = idle_node(dataset, clock)
    lag = node.config.max_round_lag
    node.round = 3
    for sybil in ("s1", "s2"):
        await presence(node, sybil, round=10**6)
    assert node.gossip.round_ceiling() == 3 + lag + 1  # one node and two fresh records: no jump
    clock.now += TTL / 3
    # Established ones count, with this node: two against one move it (tofu's limit; see the
    # README), as two honest peers ahead would.
    assert node.gossip.round_ceiling() == 10**6 + lag + 1


async def test_a_restarted_node_still_catches_up_with_its_one_established_peer(
    dataset: Dataset,
) -> None:
    clock = FakeClock(100.0)
    node = idle_node(dataset, clock)
    lag = node.config.max_round_lag
    await presence(node, "ahead", round=50)
    assert node.gossip.round_ceiling() == lag + 1
    clock.now += TTL / 3
    assert node.gossip.round_ceiling() == 50 + lag + 1
    # Honest peers that are established outweigh fresh Sybils.
    await presence(node, "also-ahead", round=50)
    clock.now += TTL / 3
    for i in range(5):
        await presence(node, f"sybil{i}", round=10**6)
    assert node.gossip.round_ceiling() == 50 + lag + 1


async def test_only_trainers_of_the_view_and_pending_peers_are_admitted(dataset: Dataset) -> None:
    node = idle_node(dataset, FakeClock(100.0))
    await presence(node, "peer")
    await presence(node, "watcher", role="monitor")
    node.membership._pending.add("dialling")  # its presence verified; its addresses probed
    assert [node.admission.admits(p) for p in ("peer", "watcher", "dialling", "stranger")] == [
        True,
        False,
        True,
        False,
    ]


async def test_a_peer_whose_models_keep_coming_stays_in_the_view_past_its_presence_ttl(
    dataset: Dataset,
) -> None:
    # A busy peer's heartbeats may come late (its loop training, a loaded machine): its
    # signed models prove it alive as well as its presence does.
    clock = FakeClock(100.0)
    node = idle_node(dataset, clock)
    await presence(node, "busy")
    await presence(node, "quiet")
    own = dict(weights(node))
    for r in (1, 2, 3):
        clock.now += TTL / 2
        await node.inbox.accept(model_message(own, "busy", r), lowest=0, highest=20)
    assert node.view.expire() == ["quiet"]
    assert "busy" in node.view
    assert node.counters.rejected_total == 0


async def test_a_model_from_outside_the_view_is_never_merged(dataset: Dataset) -> None:
    node = idle_node(dataset, FakeClock(100.0))
    node.membership._pending.add("dialled")  # admitted while its dial runs, then refused
    own = dict(weights(node))
    await node.inbox.accept(model_message(own, "dialled", 1), lowest=0, highest=20)
    assert node.counters.models_received == 1
    node.membership._pending.discard("dialled")
    assert await node._merge_received(own, 1, 100.0) == 0
    assert node.round == 0


async def test_what_is_kept_for_a_peer_goes_when_it_leaves(dataset: Dataset) -> None:
    clock = FakeClock(100.0)
    node = idle_node(dataset, clock)
    own = dict(weights(node))
    for peer in ("gone", "done", "silent"):
        await presence(node, peer, round=1)
        await node.inbox.accept(model_message(own, peer, 1), lowest=0, highest=20)
    parts = chunking.split(
        model_message(own, "gone", 2), max_chunk=1024, transfer_id="t", net=NET, src="gone",
        seq=next(_SEQ), signer=KEYS["gone"],
    )  # fmt: skip
    await node.inbox.accept(bytes(parts[0]), lowest=0, highest=20)  # a transfer under way
    node.inbox.reject("gone", "stale round: 0 < 1")
    assert node.inbox._reassembler.pending_bytes("gone") > 0
    assert {"gone", "done", "silent"} <= set(node.trust._windows)

    await presence(node, "gone", online=False, graceful=False)  # its will: it crashed
    await presence(node, "done", online=False, round=1)  # a bye after its last round
    clock.now += TTL + 1
    assert node.view.expire() == ["silent"]

    assert node.view.live() == []
    assert node.inbox._reassembler.pending_bytes("gone") == 0
    assert not any(src == "gone" for src, _ in node.inbox._logged)
    # Replay windows stay (bounded, least recent dropped first): a departed peer's captured
    # records must still be refused as replays.
    assert {"gone", "done", "silent"} <= set(node.trust._windows)
    assert node.membership.finished == {"done": 1}
    # Only the finished peer's model stays: the sync rounds up to its last count on it.
    assert [m.src for m in node.inbox.take(1)] == ["done"]


async def test_a_sybil_flood_gets_a_bounded_view_no_round_and_no_merge(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    """100 presence records signed with 100 self-made keys, all claiming round 10**6, then a
    model from each: the view takes them only at the new-peer rate, and nothing of theirs
    moves the round or is merged."""
    bus = MemoryBus()
    node = make_node(
        dataset, MemoryTransport(bus, "v0"), "v0", 0, mode="async", period=0.1,
        discovery=("static", "presence"), presence_ttl=60.0,  # established after 20 s
    )  # fmt: skip
    sybils = {f"sybil{i:03d}": Identity.generate() for i in range(100)}
    attacker = await bus_client(bus, "sybils")
    async with asyncio.timeout(40), running(node) as task:
        await wait_until(lambda: node.counters.rounds >= 1, within=10)
        started = time.monotonic()
        for sybil, key in sybils.items():
            record = encode_presence(
                NET, sybil, next(_SEQ), online=True, role="trainer", broker=BUS, round=10**6,
                signer=key,
            )  # fmt: skip
            await attacker.publish(topics.presence(NET, sybil), record, retain=True)
        await wait_until(
            lambda: len(node.view) + node.counters.rejected["new-peer-rate"] == 100, within=10
        )
        elapsed = time.monotonic() - started
        admitted = set(node.view.live())
        assert 32 <= len(admitted) <= 32 + elapsed / 2 + 1, (len(admitted), elapsed)
        weights_now = dict(weights(node))
        for sybil, key in sybils.items():
            KEYS[sybil] = key
            await attacker.publish(
                topics.inbox(NET, "v0"), model_message(weights_now, sybil, 10**6)
            )
        rejected = node.counters.rejected
        await wait_until(lambda: rejected["future"] + rejected["unknown-sender"] == 100)
        assert rejected["future"] == len(admitted)  # in the view, but fresh: no ceiling move
        assert rejected["unknown-sender"] == 100 - len(admitted)
        rounds = node.counters.rounds
        await wait_until(lambda: node.counters.rounds >= rounds + 2, within=10)
        assert node.counters.models_received == 0
        assert node.round == node.counters.rounds, "one round per step: none adopted"
        assert not task.done()
    await attacker.close()


async def test_a_model_flood_from_self_made_keys_holds_at_most_max_peers_senders(
    dataset: Dataset,
) -> None:
    """Sampled views admit a model from a sender outside the view (its first model may come
    before its record): 40 senders with keys of their own each send one, and what the node keeps
    stays bounded by `max_peers` senders and a few hints, the oldest dropped first."""
    from p2pfl.discovery.shuffle import MAX_HINTS

    node = idle_node(dataset, FakeClock(100.0), discovery=("presence",), view_size=16, max_peers=8)
    assert node.membership.sampled and node.membership.sampler is not None
    own = dict(weights(node))
    flood = [f"flood{i:02d}" for i in range(40)]
    for src in flood:
        KEYS[src] = Identity.generate()
        await node.inbox.accept(model_message(own, src, 1), lowest=0, highest=20)
    held = {m.src for m in node.inbox.take(1)}
    assert held == set(flood[-8:])  # the newest `max_peers` contacts; the rest forgotten
    assert node.counters.models_received == 40
    assert len(node.admission.contacts) == 8
    assert len(node.membership.sampler.hints) == MAX_HINTS
