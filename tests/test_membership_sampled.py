"""Sampled views (view_size): a network larger than any node's view, on one memory bus.

Each node is a real `Membership` with its own transport and trust; the harness only carries
inbox messages (shuffles) to `on_shuffle` after checking their signature, as the node's inbox
does. What is measured is what DESIGN.md promises: bounded views and subscriptions, every node
finding its true ring neighbours, and membership traffic per node that does not grow with N.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.config import NodeConfig
from p2pfl.discovery import sampling
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView
from p2pfl.discovery.presence import encode_presence
from p2pfl.discovery.shuffle import encode_shuffle, parse_shuffle
from p2pfl.identity import Identity
from p2pfl.inbox import reason_label
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.simulation.engine import node_ids
from p2pfl.topology.base import stable_seed
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.trust import Trust
from tests.helpers import small_scenario

NET = "sampled"
HOME = "memory://sampled"

pytestmark = pytest.mark.timeout(120)


class Peer:
    """One node's membership of a sampled network, and what it received."""

    def __init__(self, bus: MemoryBus, node_id: str, **config: Any) -> None:
        self.id = node_id
        self.config = NodeConfig(
            network=NET, id=node_id, discovery=("presence",), presence_ttl=30.0,
            shuffle_interval=0.1, **config,
        )  # fmt: skip
        self.transport = MemoryTransport(bus, node_id)
        self.view = PeerView(node_id, ttl=self.config.presence_ttl)
        self.identity = Identity.generate()
        self.trust = Trust("tofu")
        self.trust.own(node_id, self.identity.public_raw)
        self.rejected: Counter[str] = Counter()
        self.received = 0
        self._seq = time.time_ns()
        self.membership = Membership(
            self.config, self.transport, self.view, node_id=node_id, home_broker=HOME,
            next_seq=self._next, current_round=lambda: 0, reject=self._reject,
            clock=time.monotonic, signer=self.identity, trust=self.trust,
        )  # fmt: skip

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _reject(self, src: str, reason: str) -> None:
        self.rejected[reason_label(reason)] += 1

    async def receive(self) -> None:
        inbox = topics.inbox(NET, self.id)
        async for message in self.transport.messages():
            self.received += 1
            if message.topic != inbox:
                await self.membership.on_message(message)
                continue
            try:
                self.trust.check(message.payload)
                env = unpack_envelope(message.payload, max_size=1 << 20)
                await self.membership.on_shuffle(env)
            except ProtocolError as exc:
                self._reject("?", exc.reason)

    def near(self, schedule: str) -> list[str]:
        return sampling.near(self.id, self.view.live(), sampling.ring_keys(schedule), 1)


@contextlib.asynccontextmanager
async def network(n: int, **config: Any) -> AsyncIterator[list[Peer]]:
    bus = MemoryBus()
    peers = [Peer(bus, f"s{i:03d}", **config) for i in range(n)]
    tasks: list[asyncio.Task[None]] = []
    try:
        for peer in peers:
            await peer.transport.connect(will=peer.membership.will())
            await peer.transport.subscribe(topics.inbox(NET, peer.id))
            await peer.membership.start()
            for loop in (
                peer.receive,
                peer.membership.heartbeat_loop,
                peer.membership.shuffle_loop,
            ):
                tasks.append(asyncio.create_task(loop()))
        yield peers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def settled(peers: list[Peer], schedule: str, within: float) -> bool:
    ids = [p.id for p in peers]
    truth = {p.id: sampling.near(p.id, ids, sampling.ring_keys(schedule), 1) for p in peers}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(p.near(schedule) == truth[p.id] for p in peers):
            return True
        await asyncio.sleep(0.2)
    wrong = [
        (p.id, p.near(schedule), truth[p.id]) for p in peers if p.near(schedule) != truth[p.id]
    ]
    print("not settled:", wrong[:5], len(wrong))
    return False


@pytest.mark.parametrize("schedule", ["ring", "partial-mesh"])
async def test_every_node_finds_its_ring_neighbours_with_a_bounded_view(schedule: str) -> None:
    async with network(64, schedule=schedule, view_size=20) as peers:
        assert await settled(peers, schedule, 60.0)
        for peer in peers:
            assert len(peer.view) <= 20
            assert not peer.rejected, peer.rejected


async def test_membership_traffic_per_node_does_not_grow_with_the_network() -> None:
    """Messages a node receives over a fixed number of shuffle intervals once settled, at two
    sizes: bounded by its view (a full-view node of 96 would hear 3x the 32-node heartbeats)."""
    per_node = {}
    for n in (32, 96):
        async with network(n, schedule="ring", view_size=16) as peers:
            assert await settled(peers, "ring", 60.0)
            before = [p.received for p in peers]
            await asyncio.sleep(3.0)
            per_node[n] = sum(p.received - b for p, b in zip(peers, before, strict=True)) / n
            for peer in peers:
                # the inbox, the view members' presence, and nothing else once settled
                assert len(peer.transport._patterns) <= 1 + 16
    assert per_node[96] < 1.5 * per_node[32], per_node


async def test_a_joining_node_reads_its_seed_bucket_then_its_group_then_everyone() -> None:
    """A sampled node's first contacts: the retained records of its own seed bucket (about
    N / 256 of a network of N), its group's 16 buckets only once its own gave no contact
    within a shuffle interval, every node's presence only when those stay short of contacts
    for a few more. Here no record is a usable contact, so it goes through every stage."""
    bus = MemoryBus()
    seeder = MemoryTransport(bus, "seeder")
    await seeder.connect()
    joiner = Peer(bus, "joiner", schedule="ring", view_size=16)
    membership, sampler = joiner.membership, joiner.membership.sampler
    assert sampler is not None
    now = [0.0]
    membership._clock = lambda: now[0]
    ids = [f"x{i:04d}" for i in range(2048)]
    bucket = {i: stable_seed("seed", i) % topics.SEED_BUCKETS for i in ids}
    for node_id in ids:
        topic = topics.seed(NET, bucket[node_id], node_id)
        await seeder.publish(topic, b"not a record", qos=1, retain=True)
    first = sampler.listen // topics.SEED_GROUP * topics.SEED_GROUP
    group = range(first, first + topics.SEED_GROUP)
    read: Counter[str] = Counter()

    async def receive() -> None:
        async for message in joiner.transport.messages():
            stage = "seed" if "/seed/" in message.topic else message.topic.split("/")[-2]
            read[stage] += message.topic.rsplit("/", 1)[-1] != "joiner"
            await membership.on_message(message)

    await joiner.transport.connect()
    task = asyncio.create_task(receive())
    try:
        await membership.start()
        await asyncio.sleep(0.1)
        own = sum(1 for i in ids if bucket[i] == sampler.listen)
        assert read["seed"] == own < 2048 / 64  # not a sixteenth of the network
        interval = membership.config.shuffle_interval
        now[0] = 0.5 * interval
        await membership._bootstrap(interval)  # not yet: the bucket may still give contacts
        await asyncio.sleep(0.1)
        assert read["seed"] == own
        now[0] = 1.5 * interval
        await membership._bootstrap(interval)  # its own bucket gave nobody: the group's
        await asyncio.sleep(0.1)
        assert read["seed"] == sum(1 for i in ids if bucket[i] in group)
        assert read["presence"] == 0
        now[0] += 3.5 * interval
        await membership._bootstrap(interval)  # still nobody: every node's presence
        await asyncio.sleep(0.1)
        assert membership._listening == (topics.presence_all(NET),)
    finally:
        task.cancel()
        await joiner.transport.close()
        await seeder.close()


# ---- attacks: a shuffle is hostile until each entry proves itself -----------------------------


class Lone:
    """One sampled node on a bus of its own, fed messages by hand; an attacker with a key."""

    def __init__(self) -> None:
        self.bus = MemoryBus()
        self.peer = Peer(self.bus, "victim", schedule="ring", view_size=16)
        self.attacker = Identity.generate()

    def record(
        self, node_id: str, signer: Identity, *, ts_offset: float = 0.0, role: str = "trainer"
    ) -> bytes:
        payload = encode_presence(
            NET, node_id, time.time_ns(), online=True, role=role, broker=HOME, signer=signer,
            pk=None,
        )  # fmt: skip
        if not ts_offset:
            return payload
        env = unpack_envelope(payload, max_size=1 << 16)
        env = Envelope(env.v, env.kind, env.net, env.src, env.seq, env.ts + ts_offset, env.body)
        return bytes(pack_envelope(env, signer))

    async def shuffle(self, entries: list[bytes], *, op: str = "offer") -> None:
        payload = encode_shuffle(
            op, entries, net=NET, src="mallory", seq=time.time_ns(), signer=self.attacker
        )
        self.peer.trust.check(payload)
        await self.peer.membership.on_shuffle(unpack_envelope(payload, max_size=1 << 20))


@pytest.fixture
async def lone() -> AsyncIterator[Lone]:
    h = Lone()
    await h.peer.transport.connect()
    await h.peer.membership.start()
    yield h
    await h.peer.transport.close()


async def test_a_shuffled_record_signed_by_someone_else_is_refused(lone: Lone) -> None:
    honest = Identity.generate()
    lone.peer.trust.check(lone.record("alice", honest))  # alice's key pinned on first use
    forged = lone.record("alice", lone.attacker)  # mallory speaks for alice
    await lone.shuffle([forged, lone.record("mallory", lone.attacker)])
    assert "alice" not in lone.peer.view
    assert lone.peer.rejected["untrusted"] == 1
    assert "mallory" in lone.peer.view  # its own record is its own: it may join


async def test_tampered_stale_and_non_trainer_records_are_refused_and_counted(lone: Lone) -> None:
    bob = Identity.generate()
    tampered = bytearray(lone.record("bob", bob))
    tampered[-3] ^= 0xFF
    stale = lone.record("carol", Identity.generate(), ts_offset=-3600)
    monitor = lone.record("dave", Identity.generate(), role="monitor")
    unsigned = encode_presence(NET, "erin", 1, online=True, role="trainer", broker=HOME)
    await lone.shuffle([bytes(tampered), stale, monitor, unsigned])
    assert len(lone.peer.view) == 0
    assert lone.peer.rejected == {
        "bad-signature": 1, "stale": 1, "presence": 1, "unsigned": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"op": "steal", "entries": []},
        {"op": "offer"},
        {"op": "offer", "entries": "x"},
        {"op": "offer", "entries": [b"x"] * 100},
        {"op": "offer", "entries": [1, 2]},
        {"op": "offer", "entries": [], "extra": 1},
        [1, 2, 3],
    ],
)
async def test_a_malformed_shuffle_is_a_protocol_error(lone: Lone, body: Any) -> None:
    env = Envelope.create("shuffle", body, net=NET, src="mallory", seq=1)
    with pytest.raises(ProtocolError, match=r"^shuffle"):
        await lone.peer.membership.on_shuffle(env)
    assert reason_label("shuffle: malformed body") == "shuffle"
    assert len(lone.peer.view) == 0


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=40) | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_any_shuffle_body_parses_or_is_a_protocol_error(body: Any) -> None:
    env = Envelope.create("shuffle", body, net=NET, src="x", seq=1)
    try:
        op, entries = parse_shuffle(env)
    except ProtocolError as exc:
        assert exc.reason.startswith("shuffle")
    else:
        assert op in ("offer", "answer") and all(isinstance(e, bytes) for e in entries)


async def test_an_answer_is_merged_and_an_offer_answered_with_our_entries(lone: Lone) -> None:
    # a shuffle partner answers with its own record last; the victim learns of it
    friend = Identity.generate()
    await lone.shuffle([lone.record("friend", friend)])
    assert "friend" in lone.peer.view
    assert lone.peer.membership.sampler is not None
    assert "friend" in lone.peer.membership.sampler.records


async def test_only_ring_neighbours_are_watched_and_shuffles_keep_the_rest_alive(
    lone: Lone,
) -> None:
    """A ring node with a full view subscribes to the presence of its near members only (the
    schedule talks to no one else): a view change in its random part costs no subscription
    and no retained record. The rest of the view lives on what shuffles bring: a fresher
    record of a member refreshes it, an older one does not."""
    peer = lone.peer
    keys = {f"p{i:02d}": Identity.generate() for i in range(20)}
    records = [lone.record(name, key) for name, key in keys.items()]

    def watched() -> set[str]:
        return {t.rsplit("/", 1)[-1] for t in peer.transport._patterns if "/presence/" in t}

    await lone.shuffle(records[:10])
    assert watched() == set(peer.view.live())  # not full (a small network): watched whole
    await lone.shuffle(records[10:])
    members = peer.view.live()
    assert len(members) == 16
    near = set(sampling.near(peer.id, members, sampling.ring_keys("ring"), sampling.NEAR))
    assert watched() == near and len(near) == 2 * sampling.NEAR
    far = sorted(set(members) - near)[0]
    seen = peer.view.get(far)
    assert seen is not None
    stale = lone.record(far, keys[far], ts_offset=-5.0)
    await lone.shuffle([stale])
    after_stale = peer.view.get(far)
    assert after_stale is not None and after_stale.last_seen == seen.last_seen
    await asyncio.sleep(0.01)
    await lone.shuffle([lone.record(far, keys[far])])
    refreshed = peer.view.get(far)
    assert refreshed is not None and refreshed.last_seen > seen.last_seen


SAMPLED = small_scenario("sampled", 40, degree=4, view_size=16, shuffle_interval=0.25)


def test_sim_with_sampled_views_runs_every_round_with_true_neighbours(tmp_path: Path) -> None:
    scenario = tmp_path / "sampled.toml"
    scenario.write_text(SAMPLED)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(scenario), "--json", "--no-plots",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ids = node_ids(40)
    expected = {
        "ring": dict.fromkeys(ids, 1),
        "partial-mesh": {p: len(sampling.mesh_neighbours(p, ids, 4)) for p in ids},
    }
    for schedule, neighbours in expected.items():
        mine = [r for r in records if r["schedule"] == schedule]
        assert len(mine) == 40 * 2
        assert all(r["rejected"] == 0 for r in mine), schedule
        # each node merged exactly its neighbours' models of the overlay a full view gives:
        # its own partial view found them, and theirs found it
        merged = {(r["node"], r["round"]): r["merged"] for r in mine}
        assert merged == {(p, r): neighbours[p] for p in ids for r in (1, 2)}, schedule


async def test_an_oversize_shuffle_is_refused_before_its_signature_is_checked() -> None:
    from p2pfl.inbox import Inbox, NodeCounters

    counters = NodeCounters()
    inbox = Inbox(NodeConfig(network=NET, id="victim"), counters, clock=time.monotonic)
    taken: list[Envelope] = []

    async def take(env: Envelope) -> None:
        taken.append(env)

    inbox.on_shuffle = take
    inbox.trust = Trust("tofu")
    big = encode_shuffle(
        "offer", [b"x" * 60_000] * 12, net=NET, src="mallory", seq=1, signer=Identity.generate()
    )
    await inbox.accept(big + b"\0" * 200_000, lowest=0, highest=10)  # padded past the bound
    assert not taken
    assert counters.rejected == {"oversize": 1}
    assert counters.membership_received == 0
