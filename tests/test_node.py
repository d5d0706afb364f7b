"""Node, in process: sync rings over the memory bus and real brokers, hostile input, presence,
resume from a state dir, graceful stop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.discovery.presence import encode_presence
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import FitResult, Learner
from p2pfl.learning.torch_learner import build_learner
from p2pfl.node import LONELY_ROUNDS, Node, NodeCounters, RoundReport
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.codec import DTYPES, TensorEntry
from p2pfl.protocol.envelope import Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.model import decode_model, encode_model, model_digest
from p2pfl.simulation.faults import DelegatingLearner
from p2pfl.store import StateDir
from p2pfl.topology import make_schedule
from p2pfl.transport.base import LocalBroker, Message, Transport
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.transport.mqtt import MqttOptions, MqttTransport

pytestmark = pytest.mark.timeout(60)

WaitUntil = Callable[..., Awaitable[None]]
Weights = dict[str, np.ndarray]

NET = "nodetest"
# MemoryTransport ignores broker URIs: every node of a test shares one bus, so one home URI.
BUS = "mqtt://127.0.0.1:1"
FAST = MqttOptions(backoff_min=0.05, backoff_max=0.3, connect_timeout=10.0, drain_timeout=10.0)
TRAIN_SIZE = 100
MAX_MESSAGE = 4096  # a logreg model message on mnist1d is about 1.8 kB


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    # The user's dataset cache (P2PFL_CACHE_DIR honoured): generating mnist1d costs seconds.
    return load_dataset("mnist1d", seed=0)


def make_learner(dataset: Dataset, index: int) -> Learner:
    """A logistic regression on its own 100 training samples; same initial weights everywhere."""
    train = np.arange(index * TRAIN_SIZE, (index + 1) * TRAIN_SIZE)
    return build_learner(
        "logreg",
        dataset,
        train,
        test_indices=np.arange(200),
        batch_size=32,
        init_seed=0,
        seed=index,
        local_epochs=1,
    )


def make_config(node_id: str, peers: Mapping[str, str] = {}, **overrides: Any) -> NodeConfig:
    fields: dict[str, Any] = {
        "network": NET,
        "id": node_id,
        "model": "logreg",
        "local_epochs": 1,
        "mode": "sync",
        "discovery": ("static",),
        "round_timeout": 10.0,
        "peers": [{"id": p, "broker": uri} for p, uri in peers.items()],
        **overrides,
    }
    return NodeConfig.model_validate(fields)


class Reports:
    """Collects every node's round reports, by node id."""

    def __init__(self) -> None:
        self.by_node: dict[str, list[RoundReport]] = {}

    def hook(self, node_id: str) -> Callable[[RoundReport], None]:
        rounds = self.by_node.setdefault(node_id, [])
        return rounds.append

    def rounds(self, node_id: str) -> list[int]:
        return [r.round for r in self.by_node.get(node_id, [])]


def make_node(
    dataset: Dataset,
    transport: Transport,
    node_id: str,
    index: int,
    *,
    on_round: Callable[[RoundReport], None] | None = None,
    learner: Learner | None = None,
    state: StateDir | None = None,
    home: str = BUS,
    peers: Mapping[str, str] = {},
    **overrides: Any,
) -> Node:
    config = make_config(node_id, peers, **overrides)
    return Node(
        config,
        learner if learner is not None else make_learner(dataset, index),
        transport,
        node_id=node_id,
        home_broker=home,
        # As the daemon builds it: with walkers the ring keeps hop 1 (a token visits in turn).
        schedule=make_schedule("ring", walkers=config.walkers),
        state=state,
        on_round=on_round,
    )


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[asyncio.Task[NodeCounters]]:
    """Run `node` in the background; on exit stop it and wait (tests await the task to check)."""
    task = asyncio.create_task(node.run(), name=f"node:{node.node_id}")
    try:
        yield task
    finally:
        node.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await asyncio.wait({task})
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: a test that cares awaits the task itself


async def bus_client(bus: MemoryBus, cid: str, *subscriptions: str) -> MemoryTransport:
    client = MemoryTransport(bus, cid)
    await client.connect()
    for pattern in subscriptions:
        await client.subscribe(pattern)
    return client


async def next_message(transport: Transport, within: float = 10.0) -> Message:
    async with asyncio.timeout(within):
        async for message in transport.messages():
            return message
    raise AssertionError("transport closed before a message arrived")


def same_weights(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Peers' keys: a test peer signs what it sends, as a real one does (a refused signature is
# tests/test_trust.py's business; these tests reach the checks behind it).
KEYS: dict[str, Identity] = collections.defaultdict(Identity.generate)
_SEQ = itertools.count(time.time_ns() // 1000)


def model_message(weights: Mapping[str, np.ndarray], src: str, round: int, net: str = NET) -> bytes:
    return bytes(
        encode_model(
            dict(weights), net=net, src=src, seq=next(_SEQ), round=round, age=100.0,
            signer=KEYS[src],
        )
    )  # fmt: skip


def unchecked_model_message(weights: Mapping[str, np.ndarray], src: str, round: int) -> bytes:
    """A well-formed model message with a correct digest, built without encode_model's checks
    (which refuse NaN and infinities)."""
    entries = [
        TensorEntry(name, DTYPES["float32"], tuple(a.shape), ["raw"], a.astype("<f4").tobytes())
        for name, a in weights.items()
    ]
    body = {
        "round": round,
        "age": 100.0,
        "codec": "raw",
        "tensors": [e.to_wire() for e in entries],
        "digest": model_digest(entries),
    }
    env = Envelope.create("model", body, net=NET, src=src, seq=next(_SEQ))
    return bytes(pack_envelope(env, KEYS[src]))


def raw_envelope(kind: str, body: dict[str, Any], *, src: str = "mallory", v: int = 1) -> bytes:
    """An envelope packed by hand, so that it may carry what pack_envelope refuses."""
    fields = {"v": v, "kind": kind, "net": NET, "src": src, "seq": 1, "ts": 0.0, "pk": None}
    return bytes(msgpack.packb({**fields, "sig": None, "body": body}, use_bin_type=True))


# ---- 1. a sync ring over the memory bus ------------------------------------------------------


async def test_sync_ring_over_memory_bus(dataset: Dataset) -> None:
    bus = MemoryBus()
    ids = ["n0", "n1", "n2"]
    peers = dict.fromkeys(ids, BUS)
    reports = Reports()
    nodes = [
        # Presence is the start barrier: with static peers alone a node may send round 1
        # before its successor subscribed (that round would then end on its timeout).
        make_node(
            dataset,
            MemoryTransport(bus, i),
            i,
            k,
            on_round=reports.hook(i),
            peers=peers,
            rounds=3,
            discovery=("static", "presence"),
        )
        for k, i in enumerate(ids)
    ]
    initial = nodes[0].learner.get_weights()
    async with asyncio.timeout(30):
        counters = await asyncio.gather(*(n.run() for n in nodes))

    for node, c in zip(nodes, counters, strict=True):
        assert node.round == c.rounds == 3
        assert reports.rounds(node.node_id) == [1, 2, 3]
        assert all(r.merged >= 1 for r in reports.by_node[node.node_id][1:])
        assert not same_weights(node.learner.get_weights(), initial)
    assert_ring_counters(counters, rounds=3)
    assert bus.clients == [], "every node closed its transport"


def assert_ring_counters(counters: list[NodeCounters], rounds: int) -> None:
    """Each round a node sends to its successor and hears its predecessor.

    A node that finishes first says bye; a peer still in its last round then re-plans and
    sends that round's model to its new successor too, which may already be gone: so one
    extra send is allowed per node, and nothing may be received that was not sent.
    """
    for c in counters:
        assert c.rejected_total == 0
        assert rounds <= c.models_sent <= rounds + 1
        assert rounds <= c.models_received
    assert sum(c.models_received for c in counters) <= sum(c.models_sent for c in counters)


# ---- 2. hostile input to a running node's inbox ----------------------------------------------


def hostile_messages(good: bytes, weights: Weights) -> list[list[bytes]]:
    """Groups of messages a node must drop, each group once, for a different reason.

    `good` is a valid model message and `weights` a model of the right layout.
    """
    rng = np.random.default_rng(7)
    bad_shape = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype) for k, v in weights.items()}
    bad_dtype = {k: v.astype(np.float64) for k, v in weights.items()}
    one_missing = dict(list(weights.items())[1:])
    nan = {k: v.copy() for k, v in weights.items()}
    next(iter(nan.values())).flat[3] = np.nan
    inf = {k: v.copy() for k, v in weights.items()}
    next(iter(inf.values())).flat[0] = -np.inf
    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF  # inside the tensor bytes: the signature catches it
    # Chunks sent by "ghost" (a peer) whose reassembled model says it comes from "mallory".
    spoofed = chunking.split(
        model_message(weights, "mallory", 1), max_chunk=1024, transfer_id="t1", net=NET,
        src="ghost", seq=next(_SEQ), signer=KEYS["ghost"],
    )  # fmt: skip
    assert len(spoofed) > 1
    bad_chunk = {"id": "t2", "index": 5, "count": 2, "total": 10, "digest": b"0" * 16, "data": b""}
    return [
        [rng.bytes(300)],
        [b""],
        [good[: len(good) // 2]],
        [model_message(bad_shape, "ghost", 1)],
        [model_message(bad_dtype, "ghost", 1)],
        [model_message(one_missing, "ghost", 1)],
        [unchecked_model_message(nan, "ghost", 1)],
        [unchecked_model_message(inf, "ghost", 1)],
        [bytes(corrupted)],
        [model_message(weights, "ghost", 1, net="othernet")],
        [raw_envelope("bogus", {})],
        [encode_presence(NET, "mallory", 1, online=True, role="trainer", broker=BUS)],
        [raw_envelope("chunk", bad_chunk)],
        [rng.bytes(MAX_MESSAGE + 1)],
        [bytes(part) for part in spoofed],
    ]


async def test_hostile_inbox_messages_are_counted_and_change_nothing(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    reports: list[RoundReport] = []
    weights_at_report: dict[int, Weights] = {}

    def on_round(report: RoundReport) -> None:
        reports.append(report)
        weights_at_report[report.round] = node.learner.get_weights()  # no fit is running now
        if report.round == 2:
            node.stop()

    # Alone with a static peer that never comes: round 1 waits for it, so nothing valid arrives.
    node = make_node(
        dataset,
        MemoryTransport(bus, "h0"),
        "h0",
        0,
        on_round=on_round,
        peers={"ghost": BUS},
        round_timeout=2.0,
        max_message_size=MAX_MESSAGE,
        max_chunk=MAX_MESSAGE,
    )
    ghost = await bus_client(bus, "ghost", topics.inbox(NET, "ghost"))
    inbox = topics.inbox(NET, "h0")
    async with asyncio.timeout(30), running(node) as task:
        first_model = await next_message(ghost)  # h0 has trained and waits for "ghost"
        # What it sent is its model after the fit (read from the message, not from the learner,
        # which a slow test might catch in round 2's fit).
        after_fit = decode_model(first_model.payload)[1].weights
        groups = hostile_messages(bytes(first_model.payload), after_fit)
        for group in groups:
            for payload in group:
                await ghost.publish(inbox, payload)
        await wait_until(lambda: node.counters.rejected_total >= len(groups), within=5)
        assert node.counters.rejected_total == len(groups)
        assert node.counters.models_received == 0
        assert not task.done(), "the node keeps running"
        rejected = node.counters.rejected
        assert {"oversize", "network", "bad-signature", "non-finite", "layout"} <= set(rejected)
        assert rejected["sender"] == 1

        # Round 1 ends by timeout; in round 2 a valid model from "ghost" is still merged.
        second_model = await next_message(ghost)
        assert unpack_envelope(second_model.payload).body["round"] == 2
        zeros = {k: np.zeros_like(v) for k, v in after_fit.items()}
        await ghost.publish(inbox, model_message(zeros, "ghost", 2))
        counters = await task

    assert [(r.round, r.merged) for r in reports] == [(1, 0), (2, 1)]
    assert same_weights(weights_at_report[1], after_fit), "bad messages left the model alone"
    assert counters.models_received == 1
    assert counters.rejected_total == len(groups)
    await ghost.close()


async def test_rejection_labels_stay_few_whatever_peers_send(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    node = make_node(dataset, MemoryTransport(bus, "h1"), "h1", 0)
    attacker = await bus_client(bus, "mallory")
    inbox = topics.inbox(NET, "h1")
    async with asyncio.timeout(20), running(node):
        await wait_until(lambda: "h1" in bus.clients)
        for i in range(10):
            await attacker.publish(inbox, raw_envelope(f"kind{i}", {}))
            await attacker.publish(inbox, raw_envelope("model", {}, v=100 + i))
            tensor = [f"t{i}", "float32", [1], ["raw"], b""]  # 0 bytes where 4 are due
            body = {
                "round": 1,
                "age": 1.0,
                "codec": "raw",
                "tensors": [tensor],
                "digest": bytes(16),
            }
            await attacker.publish(inbox, raw_envelope("model", body))
        await wait_until(lambda: node.counters.rejected_total == 30)
        assert len(node.counters.rejected) <= 5, sorted(node.counters.rejected)[:8]
    await attacker.close()


async def test_presence_with_a_bad_broker_uri_does_not_kill_the_node(
    dataset: Dataset, embedded_broker: LocalBroker, wait_until: WaitUntil
) -> None:
    uri = embedded_broker.uri
    node = make_node(
        dataset,
        MqttTransport(uri, "b0-test", FAST),
        "b0",
        0,
        home=uri,
        discovery=("static", "presence"),
        mode="async",
        period=0.05,
    )
    attacker = MqttTransport(uri, "mallory-test", FAST)
    await attacker.connect()
    async with asyncio.timeout(20), running(node) as task:
        await wait_until(lambda: node.counters.rounds >= 1, within=10)
        record = encode_presence(NET, "mallory", 1, online=True, role="trainer", broker="junk")
        await attacker.publish(topics.presence(NET, "mallory"), record, retain=True)
        await wait_until(
            lambda: task.done() or "mallory" in node.view or node.counters.rejected_total > 0
        )
        rounds = node.counters.rounds
        await wait_until(lambda: task.done() or node.counters.rounds >= rounds + 3, within=10)
        assert not task.done(), "the node died"
    await attacker.close()


# ---- 3. stale models -------------------------------------------------------------------------


async def test_model_far_behind_is_rejected_as_stale(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    # In async mode without a pause, the node runs rounds as fast as it trains; s1 is a peer.
    node = make_node(
        dataset, MemoryTransport(bus, "s0"), "s0", 0, max_round_lag=2, mode="async",
        peers={"s1": BUS},
    )  # fmt: skip
    peer = await bus_client(bus, "s1")
    weights = node.learner.get_weights()
    inbox = topics.inbox(NET, "s0")
    async with asyncio.timeout(20), running(node) as task:
        await wait_until(lambda: node.round >= 4, within=10)
        await peer.publish(inbox, model_message(weights, "s1", 0))  # 0 < round - 2
        await wait_until(lambda: node.counters.rejected_total == 1)
        current = node.round
        await peer.publish(inbox, model_message(weights, "s1", current))
        await wait_until(lambda: node.counters.models_received == 1)
        assert not task.done()
    stale = {k: v for k, v in node.counters.rejected.items() if "stale" in k}
    assert sum(stale.values()) == 1, dict(node.counters.rejected)
    assert node.counters.rejected_total == 1
    await peer.close()


async def test_one_model_far_ahead_does_not_end_the_run(dataset: Dataset) -> None:
    bus = MemoryBus()
    node = make_node(
        dataset,
        MemoryTransport(bus, "f0"),
        "f0",
        0,
        peers={"ghost": BUS},
        round_timeout=0.5,
        rounds=3,
    )
    ghost = await bus_client(bus, "ghost", topics.inbox(NET, "ghost"))
    async with asyncio.timeout(20), running(node) as task:
        await next_message(ghost)  # f0 waits for round 1 of "ghost"
        claim = model_message(node.learner.get_weights(), "ghost", 10**9)
        await ghost.publish(topics.inbox(NET, "f0"), claim)
        counters = await task
    assert node.round <= counters.rounds + node.config.max_round_lag, node.round
    await ghost.close()


# ---- 4. presence -----------------------------------------------------------------------------


# A bye or a will removes a peer at once; expiry would take the TTL, set far above the bound
# we wait for the removal (which leaves a loaded machine seconds of headroom).
PRESENCE_TTL = 60.0
GONE_WITHIN = 10.0


async def test_bye_and_will_remove_a_peer_at_once(dataset: Dataset, wait_until: WaitUntil) -> None:
    bus = MemoryBus()
    presence = ("static", "presence")
    common: dict[str, Any] = {
        "mode": "async",
        "period": 0.1,
        "discovery": presence,
        "presence_ttl": PRESENCE_TTL,
    }
    a = make_node(dataset, MemoryTransport(bus, "p0"), "p0", 0, **common)
    b = make_node(dataset, MemoryTransport(bus, "p1"), "p1", 1, **common)
    async with asyncio.timeout(30), running(a) as task_a:
        # A peer announced by a bare client, then leaving with a bye record.
        c = await bus_client(bus, "p2")
        record = encode_presence(
            NET, "p2", next(_SEQ), online=True, role="trainer", broker=BUS, signer=KEYS["p2"]
        )
        await c.publish(topics.presence(NET, "p2"), record, retain=True)
        await wait_until(lambda: "p2" in a.view)
        bye = encode_presence(
            NET, "p2", next(_SEQ), online=False, role="trainer", broker=BUS, signer=KEYS["p2"]
        )
        await c.publish(topics.presence(NET, "p2"), bye, retain=True)
        await wait_until(lambda: "p2" not in a.view, within=GONE_WITHIN)
        await c.close()

        # A real node that crashes: its transport's will is the offline record.
        async with running(b) as task_b:
            await wait_until(lambda: "p1" in a.view and "p0" in b.view)
            await b.transport.abort()
            await wait_until(lambda: "p1" not in a.view, within=GONE_WITHIN)
            task_b.cancel()
        assert not task_a.done()
        assert a.counters.rejected_total == 0


async def test_forged_presence_cannot_remove_a_peer_or_steer_the_round(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    """An attacker without the peer's key: a forged bye for a live peer, a forged presence
    for it naming another broker and claiming round 10**6 (signed with the attacker's own
    key), and a replay of the peer's own old record. None of it changes the view."""
    bus = MemoryBus()
    common: dict[str, Any] = {"mode": "async", "period": 0.1, "discovery": ("static", "presence")}
    a = make_node(dataset, MemoryTransport(bus, "v0"), "v0", 0, **common)
    async with asyncio.timeout(30), running(a) as task:
        peer = await bus_client(bus, "v1")
        old = encode_presence(
            NET, "v1", next(_SEQ), online=True, role="trainer", broker=BUS, round=2,
            signer=KEYS["v1"],
        )  # fmt: skip
        await peer.publish(topics.presence(NET, "v1"), old, retain=True)
        await wait_until(lambda: "v1" in a.view)
        attacker = await bus_client(bus, "mallory")
        forged_bye = encode_presence(
            NET, "v1", next(_SEQ), online=False, role="trainer", broker=BUS
        )
        hijack = encode_presence(
            NET, "v1", next(_SEQ), online=True, role="trainer", broker="mqtt://127.0.0.1:9",
            round=10**6, signer=Identity.generate(),
        )  # fmt: skip
        newer = encode_presence(
            NET, "v1", next(_SEQ), online=True, role="trainer", broker=BUS, round=3,
            signer=KEYS["v1"],
        )  # fmt: skip
        await peer.publish(topics.presence(NET, "v1"), newer)
        # Taken before the attacker replays `old`: `old` is then no copy of the record taken
        # last (a copy of that would be dropped as a harmless duplicate, not refused).
        await wait_until(lambda: getattr(a.view.get("v1"), "round", None) == 3)
        for payload in (forged_bye, hijack, old):
            await attacker.publish(topics.presence(NET, "v1"), payload)
        await wait_until(lambda: a.counters.rejected_total >= 3)
        info = a.view.get("v1")
        assert info is not None and info.broker == BUS and info.round == 3
        assert dict(a.counters.rejected) == {"unsigned": 1, "untrusted": 1, "replay": 1}
        assert a.round < 1000 and not task.done()
        await attacker.close()
        await peer.close()


# ---- 5. resume from the state dir ------------------------------------------------------------


class FirstFitWeights(DelegatingLearner):
    """A learner that remembers its weights as its first fit starts."""

    def __init__(self, inner: Learner) -> None:
        super().__init__(inner)
        self.at_first_fit: Weights | None = None

    def fit(self) -> FitResult:
        if self.at_first_fit is None:
            self.at_first_fit = self.inner.get_weights()
        return self.inner.fit()


async def test_restarted_node_resumes_from_its_checkpoint(dataset: Dataset, tmp_path: Path) -> None:
    bus = MemoryBus()
    first: list[RoundReport] = []
    with StateDir(tmp_path / "r0") as state:
        node = make_node(
            dataset,
            MemoryTransport(bus, "r0"),
            "r0",
            0,
            on_round=first.append,
            state=state,
            rounds=3,
        )
        async with asyncio.timeout(20):
            await node.run()
        saved = state.latest_checkpoint()
    assert [r.round for r in first] == [1, 2, 3]
    assert saved is not None and saved.round == 3
    assert same_weights(saved.weights, node.learner.get_weights())

    second: list[RoundReport] = []
    learner = FirstFitWeights(make_learner(dataset, 0))
    assert not same_weights(learner.get_weights(), saved.weights), "a fresh model differs"
    with StateDir(tmp_path / "r0") as state:
        node = make_node(
            dataset,
            MemoryTransport(bus, "r0"),
            "r0",
            0,
            on_round=second.append,
            state=state,
            learner=learner,
            rounds=5,
        )
        async with asyncio.timeout(20):
            await node.run()
        latest = state.latest_checkpoint()
        metrics = state.metrics_path.read_text().splitlines()
    assert learner.at_first_fit is not None
    assert same_weights(learner.at_first_fit, saved.weights)
    assert [r.round for r in second] == [4, 5]
    assert latest is not None and latest.round == 5
    assert len(metrics) == 5


async def test_restarted_node_catches_up_with_peers_ahead(dataset: Dataset, tmp_path: Path) -> None:
    """A node back from a crash adopts the round of the models it merges, not only its own."""
    bus = MemoryBus()
    with StateDir(tmp_path / "c0") as state:
        state.save_checkpoint(3, make_learner(dataset, 0).get_weights())
        reports: list[RoundReport] = []
        node = make_node(
            dataset,
            MemoryTransport(bus, "c0"),
            "c0",
            0,
            peers={"c1": BUS},
            on_round=reports.append,
            state=state,
            rounds=7,
            round_timeout=10.0,  # c1 answers every round: no round may end on a timeout
        )
        peer = await bus_client(bus, "c1", topics.inbox(NET, "c1"))
        async with asyncio.timeout(20), running(node) as task:
            # c0 resumes at round 3, so its first model is round 4's; c1 answers from round 6.
            # Then c0 plays rounds 6 and 7 (5 came from the catch-up); c1 sends each of its
            # rounds once, as a peer does: its round 7 and 8 next.
            for answer in (6, 7, 8):
                await next_message(peer)
                ahead = model_message(node.learner.get_weights(), "c1", answer)
                await peer.publish(topics.inbox(NET, "c0"), ahead)
            await task
        await peer.close()
    rounds = [r.round for r in reports]
    # Round 4 merged c1's round-6 model, so it counts as round 5; then 6 and 7 end the run.
    assert rounds == [5, 6, 7]
    # Round 6 waits for nothing (c1's round-6 model is merged already) and keeps c1's round 7
    # for round 7.
    assert [r.merged for r in reports] == [1, 0, 1]


# ---- 6. a sync ring over a real broker -------------------------------------------------------


async def test_sync_ring_over_real_broker(dataset: Dataset, broker: LocalBroker) -> None:
    ids = ["m0", "m1", "m2"]
    peers = dict.fromkeys(ids, broker.uri)
    reports = Reports()
    nodes = [
        make_node(
            dataset,
            MqttTransport(broker.uri, f"{node_id}-test", FAST),
            node_id,
            k,
            on_round=reports.hook(node_id),
            home=broker.uri,
            peers=peers,
            # Presence is the start barrier: a peer announces itself once it listens.
            discovery=("static", "presence"),
            rounds=3,
        )
        for k, node_id in enumerate(ids)
    ]
    async with asyncio.timeout(40):
        counters = await asyncio.gather(*(n.run() for n in nodes))
    for node in nodes:
        assert reports.rounds(node.node_id) == [1, 2, 3]
        assert all(r.merged >= 1 for r in reports.by_node[node.node_id][1:])
    assert_ring_counters(counters, rounds=3)


# ---- 7. graceful stop ------------------------------------------------------------------------


async def test_stop_checkpoints_says_bye_and_returns_promptly(
    dataset: Dataset, tmp_path: Path, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    peers = {"g0": BUS, "g1": BUS}
    common: dict[str, Any] = {
        "discovery": ("static", "presence"),
        "peers": peers,
        "presence_ttl": PRESENCE_TTL,
    }
    completed: list[tuple[int, Weights]] = []

    def on_round(report: RoundReport) -> None:
        completed.append((report.round, b.learner.get_weights()))  # no fit is running now

    a = make_node(dataset, MemoryTransport(bus, "g0"), "g0", 0, **common)
    with StateDir(tmp_path / "g1") as state:
        b = make_node(
            dataset, MemoryTransport(bus, "g1"), "g1", 1, state=state, on_round=on_round, **common
        )
        async with asyncio.timeout(30), running(a) as task_a, running(b) as task_b:
            await wait_until(lambda: b.round >= 2 and "g1" in a.view, within=15)
            b.stop()
            stopped = time.monotonic()
            await task_b
            took = time.monotonic() - stopped
            # Not the round timeout: a step in progress is abandoned.
            assert took < b.config.round_timeout / 2, f"run() took {took:.1f} s after stop()"
            await wait_until(lambda: "g1" not in a.view, within=GONE_WITHIN)
            retained = bus.retained(topics.presence(NET, "g1"))
            assert retained is not None and unpack_envelope(retained).kind == "bye"
            # The survivor goes on alone.
            rounds = a.round
            await wait_until(lambda: a.round >= rounds + 2, within=10)
            assert not task_a.done()
        checkpoint = state.latest_checkpoint()
    # A step cut short by stop() is abandoned: the checkpoint is the last completed round.
    last_round, last_weights = completed[-1]
    assert checkpoint is not None and checkpoint.round == last_round == b.round
    assert same_weights(checkpoint.weights, last_weights)
    assert "g1" not in bus.clients


async def test_a_node_alone_for_some_rounds_warns_once(
    dataset: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """Training alone must not pass for gossip: a warning with the likely cause, once."""
    bus = MemoryBus()
    node = make_node(
        dataset, MemoryTransport(bus, "solo"), "solo", 0, mode="async", rounds=LONELY_ROUNDS * 3
    )
    with caplog.at_level(logging.WARNING, logger="p2pfl.node"):
        async with asyncio.timeout(60):
            await node.run()
    lonely = [r.getMessage() for r in caplog.records if "training alone" in r.getMessage()]
    assert lonely == [
        f"no live peer for {LONELY_ROUNDS} rounds, training alone: no peer is configured "
        "(--peer ID=mqtt://HOST:PORT) and mDNS is off"
    ]


async def test_a_node_starts_once_its_peers_train_without_it(
    dataset: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """The start wait is for starting together: once peers train (their models come, their
    presence says a round), a node that still misses a peer starts too, instead of waiting
    out the round timeout for one that may have finished its run already."""
    bus = MemoryBus()
    ids = ["s0", "s1", "s2"]
    reports = Reports()
    common: dict[str, Any] = {"rounds": 3, "discovery": ("static", "presence")}
    # s2 also expects a peer that never comes; a wait for it would outlast the test
    late = {**dict.fromkeys(ids, BUS), "ghost": "mqtt://127.0.0.1:1"}
    nodes = [
        make_node(
            dataset,
            MemoryTransport(bus, i),
            i,
            k,
            on_round=reports.hook(i),
            peers=late if i == "s2" else dict.fromkeys(ids, BUS),
            round_timeout=600.0,
            **common,
        )
        for k, i in enumerate(ids)
    ]
    with caplog.at_level(logging.INFO, logger="p2pfl.peer_watch"):
        async with asyncio.timeout(45):
            await asyncio.gather(*(n.run() for n in nodes))
    for node in nodes:
        assert reports.rounds(node.node_id) == [1, 2, 3], node.node_id
    said = [r.getMessage() for r in caplog.records if "starting with" in r.getMessage()]
    assert any(m.startswith("starting with peers=2 wanted=3: peers train already") for m in said)
    assert sum(m.startswith("starting with peers=2 wanted=2") for m in said) == 2, said
