"""Pausing (`--when`, `Node.pause`): a paused node of a sync ring trains and sends nothing, its
peers keep training without waiting for it, and after `resume()` it catches up with them.

Three real `Node`s on the in-memory bus (MQTT semantics: retained presence, wills)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from p2pfl.discovery.peerview import PeerInfo
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.gossip import SKIPPED_GRACE
from p2pfl.inbox import NodeCounters
from p2pfl.learning.datasets import Dataset
from p2pfl.node import Node
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import encode_model
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.conftest import WaitUntil
from tests.test_node import BUS, NET, Reports, bus_client, dataset, make_node, running

__all__ = ["dataset"]  # the module-scoped fixture, shared with test_node

pytestmark = pytest.mark.timeout(90)


def window_excluding_now() -> str:
    """A one-hour window starting two hours from now: now is outside it."""
    start = datetime.now() + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"window={start:%H:%M}-{end:%H:%M}"


# ---- presence carries the reason -------------------------------------------------------------


def test_presence_round_trips_the_paused_reason() -> None:
    data = encode_presence(NET, "a", 1, online=True, role="trainer", broker=BUS, paused="window")
    assert parse_presence(unpack_envelope(data)).paused == "window"
    plain = encode_presence(NET, "a", 2, online=True, role="trainer", broker=BUS)
    assert parse_presence(unpack_envelope(plain)).paused is None


@pytest.mark.parametrize("bad", ["x" * 33, "", "tab\there", "é", 7, b"window", ["window"]])
def test_presence_with_a_hostile_paused_field_is_refused(bad: object) -> None:
    data = encode_presence(NET, "a", 1, online=True, role="trainer", broker=BUS, paused=bad)
    with pytest.raises(ProtocolError, match="paused"):
        parse_presence(unpack_envelope(data))


async def test_a_hostile_paused_field_is_dropped_and_counted(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    node = make_node(dataset, MemoryTransport(bus, "n0"), "n0", 0, discovery=("presence",),
                     trust="open")  # fmt: skip
    async with running(node):
        await wait_until(lambda: bus.clients != [])
        mallory = await bus_client(bus, "mallory")
        for seq, paused in enumerate(("x" * 500, 12), start=1):
            record = encode_presence(NET, "mallory", seq, online=True, role="trainer",
                                     broker=BUS, paused=paused)  # fmt: skip
            await mallory.publish(topics.presence(NET, "mallory"), record, qos=1)
        await wait_until(lambda: node.counters.rejected.get("presence", 0) == 2)
        assert "mallory" not in node.view
        await mallory.close()


# ---- a paused node of a sync ring ------------------------------------------------------------


async def test_a_paused_node_is_routed_around_and_catches_up_on_resume(
    dataset: Dataset, wait_until: WaitUntil, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfl")
    bus = MemoryBus()
    ids = ["n0", "n1", "n2"]
    reports = Reports()
    # A round timeout far beyond the test's: a peer that waited for the paused node (or the
    # node back from its pause for a peer) would stall it.
    common: dict[str, Any] = dict(peers=dict.fromkeys(ids, BUS), trust="open",
        discovery=("static", "presence"), round_timeout=600.0, presence_ttl=3.0)  # fmt: skip
    nodes = [
        make_node(
            dataset,
            MemoryTransport(bus, i),
            i,
            k,
            on_round=reports.hook(i),
            when=[window_excluding_now()] if i == "n2" else [],
            **common,
        )
        for k, i in enumerate(ids)
    ]
    paused = nodes[2]
    paused.pausing.interval = 0.2
    async with contextlib.AsyncExitStack() as stack:
        tasks: list[asyncio.Task[NodeCounters]] = [
            await stack.enter_async_context(running(n)) for n in nodes
        ]
        # The other two train on, a ring of two, without waiting for the third.
        await wait_until(lambda: min(len(reports.rounds(i)) for i in ("n0", "n1")) >= 4, within=40)
        assert paused.paused == "window" and paused.pausing.active == "window"
        assert paused.counters.models_sent == 0 and reports.rounds("n2") == []
        seen = nodes[0].view.get("n2")
        assert seen is not None and seen.paused == "window"  # in the view, as paused
        assert "n2" in nodes[0].view.live() and "n2" not in nodes[0].view.training()
        assert "paused: window (next check in 0.2 s)" in caplog.text
        assert "missing=n2" not in caplog.text, "a peer waited for the paused node"

        # A model that reaches it while paused is not kept: dropped and counted.
        model = encode_model(nodes[0].learner.get_weights(), net=NET, src="n0", seq=2**62,
                             round=nodes[0].round, age=1.0, signer=None)  # fmt: skip
        sender = await bus_client(bus, "probe")
        await sender.publish(topics.inbox(NET, "n2"), bytes(model), qos=1)
        await wait_until(lambda: paused.counters.rejected.get("paused", 0) == 1)
        await sender.close()

        known = max(p.round or 0 for p in paused.view.peers())  # peers' rounds, as it heard
        paused.resume()
        await wait_until(lambda: len(reports.rounds("n2")) >= 3, within=40)
        assert paused.paused is None and "resumed" in caplog.text
        assert paused.counters.models_sent > 0
        # It adopted the round its peers were at instead of starting again from round 1,
        # and merges their models again.
        assert reports.rounds("n2")[0] > max(known, 1)
        assert any(r.merged for r in reports.by_node["n2"])
        await wait_until(lambda: (s := nodes[0].view.get("n2")) is not None and s.paused is None)
        assert all(not t.done() for t in tasks)


async def test_resume_by_hand_overrides_eligibility_until_it_turns_eligible() -> None:
    from p2pfl.pausing import Pausing

    reading: list[str | None] = ["window"]
    pausing = Pausing(lambda: reading[0])
    assert await pausing.check() == "window"
    pausing.resume()  # by hand, while outside the window
    assert await pausing.check() is None
    reading[0] = None  # the window opens: the override lapses...
    assert await pausing.check() is None
    reading[0] = "window"  # ...and the window closing pauses the node again
    assert await pausing.check() == "window"
    pausing.pause("manual")
    assert await pausing.check() == "manual"
    pausing.resume()
    assert await pausing.check() is None


def test_the_round_line_ends_with_why_the_node_pauses(caplog: pytest.LogCaptureFixture) -> None:
    from p2pfl.daemon import report_round
    from p2pfl.status import RoundReport

    caplog.set_level(logging.INFO, logger="p2pfl")
    counters = NodeCounters().as_dict()
    for paused in ("window", None):
        report_round(RoundReport("a", 3, 0.5, 0.6, 0.7, 2, 1, 0.1, counters, paused=paused))
    first, second = (r.getMessage() for r in caplog.records[-2:])
    assert first.startswith("round 3 ") and first.endswith(" paused: window")
    assert "paused" not in second


# ---- who a sync round waits for, as peers pause and resume ------------------------------------


def peer(peer_id: str, round: int, paused: str | None = None) -> PeerInfo:
    meta = {} if paused is None else {"paused": paused}
    return PeerInfo(id=peer_id, role="trainer", broker=BUS, source="presence",
                    last_seen=time.monotonic(), round=round, meta=meta)  # fmt: skip


def sync_node(dataset: Dataset, *peers: PeerInfo) -> Node:
    """n0 of a sync ring (not running) whose view holds `peers`; a round timeout far beyond
    the tests' own, so a wait that ends proves it did not run into it."""
    node = make_node(dataset, MemoryTransport(MemoryBus(), "n0"), "n0", 0, trust="open",
                     round_timeout=600.0)  # fmt: skip
    for info in peers:
        node.view.upsert(info)
    return node


def test_a_peer_that_paused_after_round_r_stays_in_round_rs_plan(dataset: Dataset) -> None:
    """It sent its round-r model before pausing: a peer still in round r keeps expecting it
    (re-planning without it would have that peer wait for a model nobody sends)."""
    node = sync_node(dataset, peer("n1", 1, paused="window"), peer("n2", 1))
    assert node.gossip.round_view(1) == ["n1", "n2"]
    assert node.gossip.plan_targets(1)[1] == ("n1",)  # n0's predecessor on the ring
    assert node.gossip.round_view(2) == ["n2"]  # from round 2 on it is routed around
    assert node.gossip.plan_targets(2)[1] == ("n2",)


async def test_a_peer_paused_as_the_round_began_is_not_waited_for_when_it_resumes(
    dataset: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """n1 resumes while n0 waits in round 1: n0's ring now has n1 as its predecessor, but n1
    comes back at the round its peers send it, maybe past 1, so n0 does not wait for it (a
    sender a grown view adds to the plan is not waited for; a departure still re-plans)."""
    caplog.set_level(logging.INFO, logger="p2pfl")
    node = sync_node(dataset, peer("n1", 0, paused="window"), peer("n2", 0))
    assert node.gossip.plan_targets(1)[1] == ("n2",)
    weights = node.learner.get_weights()
    payload = node.gossip.encode(weights, 1, 1.0)
    waiting = asyncio.create_task(node.gossip.wait_for_round(1, payload, {"n1", "n2"}))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # n2's model has not come
    node.view.upsert(peer("n1", 0))  # resumed
    assert node.gossip.plan_targets(1)[1] == ("n1",)
    await asyncio.wait_for(waiting, 10)
    assert "round timeout" not in caplog.text


async def test_a_sender_whose_presence_is_past_the_round_is_waited_for_only_a_grace(
    dataset: Dataset,
) -> None:
    """n1's presence says round 3 while n0 waits for its round-2 model: it skipped round 2
    (back from a pause at a later round), so n0 waits only `SKIPPED_GRACE` for it; a sender
    still at round 1 is waited for."""
    node = sync_node(dataset, peer("n1", 3))
    assert node.gossip.plan_targets(2)[1] == ("n1",)
    payload = node.gossip.encode(node.learner.get_weights(), 2, 1.0)
    started = time.monotonic()
    await asyncio.wait_for(node.gossip.wait_for_round(2, payload, {"n1"}), 10)
    assert time.monotonic() - started >= SKIPPED_GRACE  # the grace, for a late delivery

    behind = sync_node(dataset, peer("n1", 1))
    waiting = asyncio.create_task(behind.gossip.wait_for_round(2, payload, {"n1"}))
    await asyncio.sleep(SKIPPED_GRACE + 1.5)
    assert not waiting.done()
    waiting.cancel()
