"""Peer sampling on the wire: shuffle messages, and the state a sampled node keeps.

A shuffle (kind ``shuffle``, on the partner's inbox topic, signed like every message) is
``{op, entries}``: ``op`` is ``offer`` (the initiator's) or ``answer`` (the partner's reply),
``entries`` a list of at most :data:`p2pfl.discovery.sampling.LENGTH` presence records, each
exactly as its subject signed and published it. An entry therefore proves itself: a receiver
checks each one under its trust policy like a presence record heard directly (only its replay
window is not applied: a relayed record is old news by design; it must be younger than the
presence TTL instead). Nobody can add a peer to another's view that the peer did not announce
itself, and a shuffle is small and bounded before anything in it is decoded.

Which entries go out and which are kept is :mod:`p2pfl.discovery.sampling`; the membership
(:mod:`p2pfl.discovery.membership`) does the sending and the subscribing.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence

from p2pfl.config import NodeConfig
from p2pfl.discovery import sampling
from p2pfl.discovery.presence import MAX_PRESENCE, PresenceRecord
from p2pfl.protocol.envelope import Envelope, Signer, pack_envelope, peek
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import SEED_BUCKETS
from p2pfl.topology.base import stable_seed

OPS = ("offer", "answer")
MAX_SHUFFLE = (sampling.LENGTH + 1) * (MAX_PRESENCE + 16) + 256
"""The largest shuffle message taken: a full list of the largest presence records."""
SEEDS = 4
"""Contacts a joining node looks for on a seed bucket before it stops listening there."""
SETTLED = 8
"""A node's ring neighbours are taken as found once unchanged over this many of its shuffles
(shuffles find them in about log N rounds; the last few changes come far apart)."""
SETTLED_SLOWDOWN = 4
"""A view whose ring neighbours have settled shuffles this many times less often: it only
keeps its random part mixed."""
MAX_HINTS = 8
"""Senders not in the view whose models suggest they are ring neighbours, shuffled with next."""
_MAX_OFFERS = 8  # offers awaiting an answer (a partner that never answers is forgotten)
_MAX_VERIFIED = 512  # shuffled records known to verify, by digest


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def encode_shuffle(
    op: str, entries: Sequence[bytes], *, net: str, src: str, seq: int, signer: Signer | None
) -> bytes:
    """A shuffle message carrying ``entries`` (presence records, as published)."""
    body = {"op": op, "entries": [bytes(e) for e in entries]}
    return bytes(pack_envelope(Envelope.create("shuffle", body, net=net, src=src, seq=seq), signer))


def parse_shuffle(env: Envelope) -> tuple[str, list[bytes]]:
    """``(op, entries)`` of a shuffle; ProtocolError (text starting ``shuffle``) otherwise."""
    body = env.body
    if not isinstance(body, dict) or set(body) != {"op", "entries"}:
        raise ProtocolError("shuffle: malformed body")
    op, entries = body["op"], body["entries"]
    if op not in OPS:
        raise ProtocolError("shuffle: unknown op")
    if (
        not isinstance(entries, list)
        or len(entries) > sampling.LENGTH
        or not all(isinstance(e, bytes) and 0 < len(e) <= MAX_PRESENCE for e in entries)
    ):
        raise ProtocolError(f"shuffle: entries must be up to {sampling.LENGTH} presence records")
    return op, entries


class Sampler:
    """What a node of a sampled network keeps besides its view: the records it may pass on,
    its rings, the offers awaiting an answer, and when its near part last changed."""

    def __init__(self, config: NodeConfig, node_id: str) -> None:
        self.node_id = node_id
        self.size = config.view_size
        self.rings = sampling.ring_keys(config.schedule, degree=config.degree, seed=config.seed)
        self.rng = random.Random(stable_seed("sampling", config.seed, node_id))
        self.ttl = config.presence_ttl
        # view members' latest presence records, and when their subjects made them (ts)
        self.records: dict[str, tuple[bytes, float]] = {}
        self._seqs: dict[str, int] = {}  # and their seqs
        self.offered: OrderedDict[str, list[str]] = OrderedDict()
        self.ticks = 0
        self.bucket = stable_seed("seed", node_id) % SEED_BUCKETS  # where our record is kept
        self.listen = self.rng.randrange(SEED_BUCKETS)  # where we look for contacts
        self._near: tuple[str, ...] = ()
        self._near_tick = 0  # our shuffle count when the ring neighbours last changed
        self.hints: dict[str, None] = {}
        # digests of shuffled records that verified: the same record comes round many times
        self._verified: OrderedDict[bytes, tuple[str, float, PresenceRecord]] = OrderedDict()

    def choose(self, view: Sequence[str], received: Sequence[str], sent: Sequence[str]) -> set[str]:
        """The view to keep after learning of ``received`` (having handed over ``sent``)."""
        kept = sampling.merged(
            self.node_id, view, sent=sent, received=received, size=self.size,
            rings=self.rings, count=sampling.NEAR, rng=self.rng,
        )  # fmt: skip
        return set(kept)

    def partner(self, view: Sequence[str]) -> str | None:
        """Whom to shuffle with now."""
        self.ticks += 1
        return sampling.partner(
            self.node_id, view, rings=self.rings, count=sampling.NEAR, tick=self.ticks,
            rng=self.rng,
        )  # fmt: skip

    def entries_for(self, view: Sequence[str], peer: str, now: float) -> list[str]:
        """The view members to send ``peer``, room left for ours: those with a record young
        enough (half the TTL) to be taken on arrival."""
        known = [p for p in view if p in self.records and now - self.records[p][1] < self.ttl / 2]
        return sampling.entries_for(
            known, peer, rings=self.rings, count=sampling.NEAR, length=sampling.LENGTH - 1,
            rng=self.rng,
        )  # fmt: skip

    def offer(self, peer: str, sent: list[str]) -> None:
        """Remember what we offered ``peer``, to merge its answer (the oldest go beyond a few)."""
        self.offered.pop(peer, None)
        self.offered[peer] = sent
        while len(self.offered) > _MAX_OFFERS:
            self.offered.popitem(last=False)

    @property
    def settled(self) -> bool:
        """Whether the ring neighbours have not changed over the last :data:`SETTLED`
        shuffles."""
        return self.ticks - self._near_tick >= SETTLED

    def interval(self, base: float) -> float:
        """The pause before the next shuffle: ``base`` while the ring neighbours still change,
        :data:`SETTLED_SLOWDOWN` times longer once settled (jittered either way)."""
        return base * (SETTLED_SLOWDOWN if self.settled else 1) * (0.5 + self.rng.random())

    def observe(self, view: Sequence[str]) -> None:
        """Note when the near part (the true ring neighbours, once settled) changes."""
        near = tuple(sampling.near(self.node_id, view, self.rings, 1))
        if near != self._near:
            self._near, self._near_tick = near, self.ticks

    def verified(self, data: bytes) -> tuple[str, float, PresenceRecord] | None:
        """``(src, ts, record)`` of a record whose exact bytes verified before, or None."""
        return self._verified.get(_digest(data))

    def remember(self, data: bytes, src: str, ts: float, record: PresenceRecord) -> None:
        """Note that ``data`` verified (the oldest notes go beyond a few views' worth)."""
        self._verified[_digest(data)] = (src, ts, record)
        while len(self._verified) > _MAX_VERIFIED:
            self._verified.popitem(last=False)

    def hint(self, peer: str) -> bool:
        """A sender not in the view: shuffle with it next (False: enough hints pending)."""
        if peer in self.hints or len(self.hints) >= MAX_HINTS:
            return False
        self.hints[peer] = None
        return True

    def keep(self, peer: str, record: bytes) -> None:
        """Keep a view member's latest presence record (verified) to pass on, with its age."""
        self.records[peer] = (record, peek(record).ts)

    def fresher(self, peer: str, record: bytes) -> bool:
        """Whether ``record`` (verified) was made after the one kept of ``peer``."""
        kept = self.records.get(peer)
        return kept is None or peek(record).ts > kept[1]

    def newer(self, peer: str, seq: int) -> bool:
        """Whether a record of ``peer`` with ``seq`` is newer than the last one taken (and
        take it); kept for view members only."""
        if seq <= self._seqs.get(peer, -1):
            return False
        self._seqs[peer] = seq
        return True

    def forget(self, keep: set[str]) -> None:
        """Drop the records (and seqs) of peers no longer in the view."""
        for peer in [p for p in self.records if p not in keep]:
            del self.records[peer]
        for peer in [p for p in self._seqs if p not in keep]:
            del self._seqs[peer]
