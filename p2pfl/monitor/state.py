"""What a monitor knows about the network: the latest report of every node, and what follows.

`NetworkState` is pure bookkeeping (no I/O, an injected clock): it is fed presence, telemetry
and log records as they arrive from any broker, and answers with the global metrics and a
JSON-ready snapshot.

Liveness. A node is *stale* when nothing was heard from it for `stale_after` seconds (by
default three of its observed telemetry intervals, at least 5 s, or 15 s before an interval is
known) or at once when its MQTT will says it went offline (a crash); a stale node is forgotten
`forget_after` seconds after it was last heard from. A graceful `bye` removes it at once.

Ordering. The same record may arrive through several brokers, and retained records replay old
news on every (re)connection, so records are ordered by the sender's own timestamp: an older
report never replaces a newer one, a report older than the node's last offline/bye is ignored,
and a retained record counts as heard `now - (wall clock - its timestamp)`.

Exclusion. The global metrics sum the confusion matrices of the nodes that report one; every
other known node is listed in `excluded_from_global` with the reason (`EXCLUDED_REASONS`), so
a reader knows whose data the global accuracy leaves out: a node on `telemetry_detail =
metrics` publishes no confusion matrix, and one on `off` is known from presence only.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pfl.discovery.presence import PresenceRecord
from p2pfl.monitor import metrics
from p2pfl.monitor.records import LogLine, parse_log, parse_telemetry
from p2pfl.protocol.errors import ProtocolError
from p2pfl.status import NodeStatus, unknown_summary

DEFAULT_STALE = 15.0
MIN_STALE = 5.0
_MAX_ENDED = 10_000

EXCLUDED_REASONS = {
    "stale": "not heard from lately, or crashed",
    "no-telemetry": "known from presence only (telemetry off, or none yet)",
    "metrics-only": "telemetry detail metrics: no confusion matrix",
    "not-evaluated": "no evaluation yet",
}
"""Why a known node is not in the global metrics, by the reason's name in the snapshot."""


@dataclass
class KnownNode:
    """One node as the monitor sees it."""

    id: str
    last_seen: float
    """Monitor clock of the last record heard from it."""
    last_ts: float = 0.0
    """The node's own timestamp of its newest record."""
    broker: str = ""
    presence_round: int | None = None
    telemetry: NodeStatus | None = None
    telemetry_ts: float = 0.0
    interval: float | None = None
    """Smoothed seconds between its telemetry reports (by its own clock)."""
    offline: bool = False


@dataclass(frozen=True)
class GlobalMetrics:
    """The network's joint evaluation over the nodes that are not stale."""

    accuracy: float | None
    macro_f1: float | None
    divergence: float | None
    nodes: int
    stale: int
    samples: int
    included: int
    """Nodes whose confusion matrix is in the sum."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "divergence": self.divergence,
            "nodes": self.nodes,
            "stale": self.stale,
            "samples": self.samples,
            "included": self.included,
        }


class NetworkState:
    """Latest telemetry per node, liveness, recent logs, and the global metrics."""

    def __init__(
        self,
        network: str,
        *,
        stale_after: float | None = None,
        forget_after: float = 60.0,
        keep_logs: int = 200,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if stale_after is not None and stale_after <= 0:
            raise ValueError(f"stale_after must be > 0, got {stale_after}")
        if forget_after <= 0:
            raise ValueError(f"forget_after must be > 0, got {forget_after}")
        self.network = network
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.clock = clock
        self.wall = wall
        self.rejected: Counter[str] = Counter()
        self._nodes: dict[str, KnownNode] = {}
        self._logs: deque[LogLine] = deque(maxlen=keep_logs)
        # node id -> its timestamp when it left or crashed: only later news brings it back
        self._ended: dict[str, float] = {}

    # ---- feeding ----------------------------------------------------------------------------

    def reject(self, reason: str) -> None:
        """Count a record that could not be used (undecodable, wrong network, bad fields)."""
        self.rejected[reason] += 1

    def on_telemetry(
        self, node_id: str, body: Mapping[str, Any], *, sent_at: float, retained: bool = False
    ) -> bool:
        """A telemetry body; True when it became the node's latest report."""
        try:
            report = parse_telemetry(node_id, body)
        except ProtocolError:
            self.reject("telemetry")
            return False
        if report.role != "trainer":
            return False
        ended = self._ended.get(node_id)
        if ended is not None and sent_at <= ended:
            return False  # from before it left
        heard = self._heard_at(sent_at, retained)
        if heard is None:
            return False
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = KnownNode(node_id, last_seen=heard)
        elif sent_at <= node.telemetry_ts:
            return False  # a duplicate through another broker, or an older retained copy
        if node.telemetry is not None:
            gap = sent_at - node.telemetry_ts
            node.interval = gap if node.interval is None else 0.7 * node.interval + 0.3 * gap
        node.telemetry = report
        node.telemetry_ts = sent_at
        node.broker = report.broker or node.broker
        self._touch(node, heard, sent_at)
        return True

    def on_presence(
        self, record: PresenceRecord, *, sent_at: float, retained: bool = False
    ) -> bool:
        """A presence, offline (will) or bye record; True when it says a live trainer."""
        if record.role != "trainer":
            return False
        node_id = record.node_id
        node = self._nodes.get(node_id)
        if not record.online:
            # A bye (graceful) removes the node at once; a will (the node crashed) marks it
            # down, and it is forgotten later. A will was written when the node connected, so
            # it is older than the node's latest news.
            if node is None:
                self._end(node_id, sent_at)
            elif record.graceful and sent_at >= node.last_ts:
                del self._nodes[node_id]
                self._end(node_id, sent_at)
            else:
                node.offline = True
                self._end(node_id, node.last_ts)
            return False
        ended = self._ended.get(node_id)
        if ended is not None and sent_at <= ended:
            return False
        heard = self._heard_at(sent_at, retained)
        if heard is None:
            return False
        if node is None:
            node = self._nodes[node_id] = KnownNode(node_id, last_seen=heard)
        node.broker = record.broker or node.broker
        if record.round is not None and sent_at >= node.last_ts:
            node.presence_round = record.round
        self._touch(node, heard, sent_at)
        return True

    def on_log(self, node_id: str, body: Mapping[str, Any], *, sent_at: float) -> None:
        """A forwarded warning or error."""
        try:
            line = parse_log(node_id, body)
        except ProtocolError:
            self.reject("log")
            return
        self._logs.append(line)
        node = self._nodes.get(node_id)
        if node is not None and not node.offline:
            self._touch(node, self.clock(), sent_at)

    def expire(self) -> list[str]:
        """Forget the nodes not heard from for `forget_after` seconds; their ids."""
        now = self.clock()
        gone = [n.id for n in self._nodes.values() if now - n.last_seen > self.forget_after]
        for node_id in gone:
            del self._nodes[node_id]
        return gone

    # ---- reading ----------------------------------------------------------------------------

    def nodes(self) -> list[KnownNode]:
        """Every node known now, sorted by id."""
        return [self._nodes[k] for k in sorted(self._nodes)]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def get(self, node_id: str) -> KnownNode | None:
        return self._nodes.get(node_id)

    def stale_after_for(self, node: KnownNode) -> float:
        """Seconds of silence after which `node` counts as stale."""
        if self.stale_after is not None:
            return self.stale_after
        if node.interval is None:
            return DEFAULT_STALE
        return max(MIN_STALE, 3 * node.interval)

    def is_stale(self, node: KnownNode) -> bool:
        return node.offline or self.clock() - node.last_seen > self.stale_after_for(node)

    def logs(self, n: int | None = None) -> list[LogLine]:
        """The latest `n` log lines (all kept when None), oldest first."""
        lines = list(self._logs)
        return lines if n is None else lines[-n:] if n > 0 else []

    def exclusion(self, node: KnownNode) -> str | None:
        """Why `node` is not in the global metrics (a key of `EXCLUDED_REASONS`); None if it is."""
        if self.is_stale(node):
            return "stale"
        if node.telemetry is None:
            return "no-telemetry"
        if node.telemetry.detail == "metrics":
            return "metrics-only"
        if node.telemetry.confusion is None:
            return "not-evaluated"
        return None

    def excluded_from_global(self) -> list[dict[str, str]]:
        """`{id, reason}` for every known node the global metrics leave out, sorted by id."""
        reasons = ((n.id, self.exclusion(n)) for n in self.nodes())
        return [{"id": node_id, "reason": why} for node_id, why in reasons if why is not None]

    def global_metrics(self) -> GlobalMetrics:
        """Accuracy and macro-F1 of the summed confusion matrices, and the divergence, over the
        nodes that are not stale."""
        fresh = [n for n in self._nodes.values() if not self.is_stale(n)]
        reports = [n.telemetry for n in fresh if n.telemetry is not None]
        confusions = [m for r in reports if (m := r.confusion_matrix()) is not None]
        total = metrics.sum_confusions(confusions)
        projections = [r.projection for r in reports if r.projection is not None]
        if projections:
            # Only comparable sketches: a node on another projection size is left out.
            size = Counter(len(p) for p in projections).most_common(1)[0][0]
            projections = [p for p in projections if len(p) == size]
        return GlobalMetrics(
            accuracy=None if total is None else metrics.accuracy(total),
            macro_f1=None if total is None else metrics.macro_f1(total),
            divergence=metrics.divergence(projections),
            nodes=len(fresh),
            stale=len(self._nodes) - len(fresh),
            samples=0 if total is None else int(total.sum()),
            included=len(confusions),
        )

    def overlay(self) -> list[list[str]]:
        """Sorted `[src, dst]` edges: whom each node sent its model to in its last round."""
        edges = {
            (n.id, dst)
            for n in self._nodes.values()
            if n.telemetry is not None
            for dst in n.telemetry.sent_to
        }
        return [list(edge) for edge in sorted(edges)]

    def configs(self) -> dict[str, dict[str, Any]]:
        """The learning configurations the nodes report, once each: config hash -> config."""
        return {
            t.config_hash: dict(t.config)
            for n in self.nodes()
            if (t := n.telemetry) is not None and t.config_hash and t.config
        }

    def snapshot(self, *, log_lines: int = 20) -> dict[str, Any]:
        """The whole picture as plain JSON-ready data; forgets expired nodes first."""
        self.expire()
        now = self.clock()
        return {
            "time": self.wall(),
            "network": self.network,
            "nodes": [self._node_dict(n, now) for n in self.nodes()],
            "global": self.global_metrics().as_dict(),
            "excluded_from_global": self.excluded_from_global(),
            "overlay": self.overlay(),
            "configs": self.configs(),
            "logs": [line.as_dict() for line in self.logs(log_lines)],
            "rejected": dict(sorted(self.rejected.items())),
        }

    # ---- internals --------------------------------------------------------------------------

    def _heard_at(self, sent_at: float, retained: bool) -> float | None:
        """Monitor-clock time a record was current; None when too old to matter."""
        # Live records are "now" whatever the sender's clock says; only retained ones are aged.
        age = max(0.0, self.wall() - sent_at) if retained else 0.0
        return None if age > self.forget_after else self.clock() - age

    def _touch(self, node: KnownNode, heard: float, sent_at: float) -> None:
        node.last_seen = max(node.last_seen, heard)
        if sent_at > node.last_ts:
            node.last_ts = sent_at
        ended = self._ended.get(node.id)
        if ended is None or sent_at > ended:
            node.offline = False
            self._ended.pop(node.id, None)

    def _end(self, node_id: str, sent_at: float) -> None:
        self._ended.pop(node_id, None)
        self._ended[node_id] = sent_at
        while len(self._ended) > _MAX_ENDED:
            del self._ended[next(iter(self._ended))]

    def _node_dict(self, node: KnownNode, now: float) -> dict[str, Any]:
        t = node.telemetry
        return {
            "id": node.id,
            **(unknown_summary() if t is None else t.summary()),
            "in_global": self.exclusion(node) is None,
            "round": node.presence_round if t is None else t.round,
            "broker": node.broker,
            "last_seen_s": round(max(0.0, now - node.last_seen), 2),
            "stale": self.is_stale(node),
            "offline": node.offline,
        }
