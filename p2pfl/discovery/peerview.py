"""Membership: one view of the live peers, fed by mDNS, MQTT presence and static config.

Every discovery source calls :meth:`PeerView.upsert` when it sees a peer and
:meth:`PeerView.remove` when a peer says goodbye (or its MQTT will reports it offline); the
node calls :meth:`PeerView.expire` periodically to drop peers nobody has seen for ``ttl``
seconds. Schedules read :meth:`PeerView.live`, the sorted trainer ids. Changes are signalled by
:attr:`PeerView.version`, a counter the node polls, so the view needs no event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("trainer", "monitor")
SOURCES = ("static", "presence", "mdns")


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


class PeerView:
    """The live peers as seen by ``own_id``; records of ``own_id`` itself are ignored.

    Static peers (``source="static"``) never expire: nothing refreshes them, and the user said
    they exist. An explicit :meth:`remove` (offline record, bye) removes them like any peer.
    Once a peer is known as static it stays static when another source reports it too, so a
    configured peer does not become expirable because mDNS also saw it.
    """

    def __init__(self, own_id: str, ttl: float, clock: Callable[[], float] = time.monotonic):
        if ttl <= 0:
            raise ValueError(f"peer ttl must be > 0 seconds, got {ttl}")
        self.own_id = own_id
        self.ttl = ttl
        self._clock = clock
        self._peers: dict[str, PeerInfo] = {}
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
        source = "static" if old is not None and old.source == "static" else info.source
        new = replace(info, source=source, last_seen=self._clock())
        self._peers[info.id] = new
        if old is None:
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
        if self._peers.pop(peer_id, None) is None:
            return False
        log.debug("peer removed id=%s reason=%s", peer_id, reason)
        self._version += 1
        return True

    def expire(self) -> list[str]:
        """Drop every non-static peer not seen for more than ``ttl``; return their ids, sorted."""
        deadline = self._clock() - self.ttl
        gone = sorted(
            peer.id
            for peer in self._peers.values()
            if peer.source != "static" and peer.last_seen < deadline
        )
        for peer_id in gone:
            del self._peers[peer_id]
            log.debug("peer expired id=%s", peer_id)
        if gone:
            self._version += 1
        return gone

    def live(self, role: str | None = "trainer") -> list[str]:
        """Sorted ids of the peers with ``role`` (every role when None), never ``own_id``."""
        # Schedules ask on every wake-up; membership changes far less often (cached by version).
        cached = self._live_cache.get(role)
        if cached is None or cached[0] != self._version:
            ids = sorted(p.id for p in self._peers.values() if role is None or p.role == role)
            cached = self._live_cache[role] = (self._version, ids)
        return list(cached[1])

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
