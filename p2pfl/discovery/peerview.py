"""Membership: one view of the live peers, fed by mDNS, MQTT presence and static config.

Every discovery source calls :meth:`PeerView.upsert` when it sees a peer and
:meth:`PeerView.remove` when a peer says goodbye (or its MQTT will reports it offline); the
node calls :meth:`PeerView.expire` periodically to drop peers nobody has seen for ``ttl``
seconds. Schedules read :meth:`PeerView.live`, the sorted trainer ids. Changes are signalled by
:attr:`PeerView.version`, a counter the node polls, so the view needs no event loop.

Joining is bounded (DESIGN.md, Trust): under ``tofu`` anyone can make a key and a verified
presence record, so a node tracks at most ``max_peers`` peers, and ids it has not seen join
through a token bucket (:class:`NewPeerBucket`); peers the user configured bypass both. A refused
id is told to ``on_refuse`` and simply joins on a later heartbeat. ``on_leave`` hears of every
peer that leaves, so per-peer state elsewhere can go with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("trainer", "monitor")
SOURCES = ("static", "presence", "mdns")

# New peers a view takes at once, then per second. A network of hundreds starting together
# still fills every view within minutes (256 peers: 32 at once, the rest in under 8 minutes,
# each refused one retrying on its next heartbeat), while a flood of hundreds of Sybil records
# (self-made keys verify under tofu) does not take the view in seconds: 32, then one per 2 s.
NEW_PEER_BURST = 32
NEW_PEER_RATE = 0.5


@dataclass(frozen=True)
class PeerInfo:
    """What we know about one peer.

    ``role`` is ``trainer`` or ``monitor``; ``source`` is ``static``, ``presence`` or ``mdns``
    (strings as they arrive from the wire: an unknown role simply never counts as a trainer).
    ``version`` is the protocol version the peer speaks; ``meta`` holds extra announced fields
    such as a key fingerprint. ``broker`` is where we reach the peer; ``brokers`` every
    address the peer announced for it, in its order (a discovery source fills it, membership
    picks ``broker`` among them).
    """

    id: str
    role: str
    broker: str
    source: str
    last_seen: float = 0.0
    version: int = 1
    round: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    brokers: tuple[str, ...] = ()

    @property
    def candidates(self) -> tuple[str, ...]:
        """The broker URIs to try, in order."""
        return self.brokers or ((self.broker,) if self.broker else ())

    @property
    def paused(self) -> str | None:
        """Why the peer does not train now (its presence says so), or None."""
        reason = self.meta.get("paused")
        return reason if isinstance(reason, str) else None


class NewPeerBucket:
    """A token bucket for ids a view has not seen: ``burst`` at once, then ``rate`` per second."""

    def __init__(
        self,
        burst: int = NEW_PEER_BURST,
        rate: float = NEW_PEER_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def ready(self) -> bool:
        """Whether a new peer would be taken now (takes nothing)."""
        self._refill()
        return self._tokens >= 1

    def take(self) -> bool:
        """Take one token for a new peer; False when none is left."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now


class PeerView:
    """The live peers as seen by ``own_id``; records of ``own_id`` itself are ignored.

    Static peers (``source="static"``) never expire: nothing refreshes them, and the user said
    they exist. An explicit :meth:`remove` (offline record, bye) removes them like any peer.
    Once a peer is known as static it stays static when another source reports it too, so a
    configured peer does not become expirable because mDNS also saw it.

    ``max_peers`` (None: no cap) bounds the peers held; ``new_peers`` (None: no limit) rations
    ids not seen before; ``configured`` are the ids of the user's static peers, which neither
    applies to (nor to ``source="static"`` records).
    """

    on_leave: Callable[[PeerInfo], None] | None = None
    """Told of each peer that leaves (removed or expired), after the view dropped it."""
    on_refuse: Callable[[str, str], None] | None = None
    """Told ``(id, reason)`` of each new peer refused by the cap or the rate limit."""

    def __init__(
        self,
        own_id: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_peers: int | None = None,
        new_peers: NewPeerBucket | None = None,
        configured: Collection[str] = (),
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"peer ttl must be > 0 seconds, got {ttl}")
        self.configured = frozenset(configured)
        self.own_id = own_id
        self.ttl = ttl
        self.max_peers = max_peers
        self.new_peers = new_peers
        self._clock = clock
        self._peers: dict[str, PeerInfo] = {}
        self._joined: dict[str, float] = {}  # when each peer joined the view
        self._version = 0
        self._live_cache: dict[str | None, tuple[int, list[str]]] = {}

    @property
    def version(self) -> int:
        """A counter that increases on every membership change: join, leave, or changed record.

        A record changes when its role, broker, protocol version or meta change; a new round
        number or a refresh alone is not a membership change.
        """
        return self._version

    def upsert(self, info: PeerInfo) -> bool:
        """Add or refresh a peer, stamping ``last_seen`` with the view's clock.

        Returns True when the peer is new or its record changed (and :attr:`version` moved).
        """
        if info.id == self.own_id:
            return False
        old = self._peers.get(info.id)
        if old is None:
            refusal = self._refusal(info)
            if refusal is not None:
                if self.on_refuse is not None:
                    self.on_refuse(info.id, refusal)
                return False
        source = "static" if old is not None and old.source == "static" else info.source
        new = replace(info, source=source, last_seen=self._clock())
        self._peers[info.id] = new
        if old is None:
            self._joined[info.id] = self._clock()
            log.debug("peer added id=%s role=%s source=%s", new.id, new.role, new.source)
            self._version += 1
            return True
        if (old.role, old.broker, old.version, old.meta) != (
            new.role,
            new.broker,
            new.version,
            new.meta,
        ):
            log.debug("peer changed id=%s role=%s broker=%s", new.id, new.role, new.broker)
            self._version += 1
            return True
        return False

    def has_room(self, peer_id: str) -> bool:
        """Whether :meth:`upsert` would take ``peer_id`` now (known already, or room and a
        token for it); takes nothing."""
        if peer_id in self._peers or peer_id in self.configured:
            return True
        if self.max_peers is not None and len(self._peers) >= self.max_peers:
            return False
        return self.new_peers is None or self.new_peers.ready()

    def _refusal(self, info: PeerInfo) -> str | None:
        """Why a new peer may not join now, or None (it takes a token from the bucket)."""
        if info.source == "static" or info.id in self.configured:
            return None  # the user named it
        if self.max_peers is not None and len(self._peers) >= self.max_peers:
            return f"max-peers: already {len(self._peers)} peers in the view"
        if self.new_peers is not None and not self.new_peers.take():
            return "new-peer-rate: too many new peers at once; it joins on a later heartbeat"
        return None

    def touch(self, peer_id: str, round: int | None = None) -> bool:
        """Refresh ``last_seen`` (and the round, when given) of a known peer; False if unknown.

        Any message from a peer proves it alive, not only its presence record.
        """
        old = self._peers.get(peer_id)
        if old is None:
            return False
        self._peers[peer_id] = replace(
            old, last_seen=self._clock(), round=old.round if round is None else round
        )
        return True

    def remove(self, peer_id: str, reason: str) -> bool:
        """Drop a peer at once (``reason``: offline, bye, ...); True if it was in the view."""
        info = self._peers.pop(peer_id, None)
        if info is None:
            return False
        del self._joined[peer_id]
        log.debug("peer removed id=%s reason=%s", peer_id, reason)
        self._version += 1
        if self.on_leave is not None:
            self.on_leave(info)
        return True

    def expire(self) -> list[str]:
        """Drop every non-static peer not seen for more than ``ttl``; return their ids, sorted."""
        deadline = self._clock() - self.ttl
        gone = sorted(
            peer.id
            for peer in self._peers.values()
            if peer.source != "static" and peer.last_seen < deadline
        )
        left = [self._peers.pop(peer_id) for peer_id in gone]
        for peer_id in gone:
            del self._joined[peer_id]
            log.debug("peer expired id=%s", peer_id)
        if gone:
            self._version += 1
        if self.on_leave is not None:
            for info in left:
                self.on_leave(info)
        return gone

    def live(self, role: str | None = "trainer") -> list[str]:
        """Sorted ids of the peers with ``role`` (every role when None), never ``own_id``."""
        # Schedules ask on every wake-up; membership changes far less often (cached by version).
        cached = self._live_cache.get(role)
        if cached is None or cached[0] != self._version:
            ids = sorted(p.id for p in self._peers.values() if role is None or p.role == role)
            cached = self._live_cache[role] = (self._version, ids)
        return list(cached[1])

    def training(self) -> list[str]:
        """Sorted ids of the live trainers that are not paused: the ones rounds are planned
        with (a paused peer stays in the view, but neither sends nor expects a model)."""
        cached = self._live_cache.get("(training)")
        if cached is None or cached[0] != self._version:
            ids = [p for p in self.live() if self._peers[p].paused is None]
            cached = self._live_cache["(training)"] = (self._version, ids)
        return list(cached[1])

    def established(self, age: float, role: str | None = "trainer") -> list[str]:
        """Sorted ids of the peers with ``role`` that joined the view ``age`` seconds ago or
        earlier (a record just heard has not yet shown it keeps up a heartbeat)."""
        since = self._clock() - age
        return [p for p in self.live(role) if self._joined[p] <= since]

    def peers(self) -> list[PeerInfo]:
        """Every record, sorted by id."""
        return [self._peers[peer_id] for peer_id in sorted(self._peers)]

    def get(self, peer_id: str) -> PeerInfo | None:
        """The record of ``peer_id``, or None."""
        return self._peers.get(peer_id)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __len__(self) -> int:
        return len(self._peers)
