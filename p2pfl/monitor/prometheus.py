"""Prometheus metrics over HTTP (prometheus-client), for a node (`p2pfl run --metrics-port`) and
for a monitor (`p2pfl monitor --metrics-port`).

Every metric is named `p2pfl_*` and labelled `node`. Each server has its own
`CollectorRegistry` with one custom collector, never the process-global registry, so several
nodes in one process (tests, the simulator) do not clash.

The HTTP server answers on its own threads; a node's state belongs to its event loop, so the
node collector reads it *on the loop* (`call_soon_threadsafe`) and the monitor collector reads
a snapshot (plain data) that the monitor's loop replaces as a whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from p2pfl.node import Node

log = logging.getLogger(__name__)

_SAMPLE_TIMEOUT = 2.0


class MetricsServer:
    """A running `/metrics` endpoint; `shutdown()` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        return int(self._server.server_port)

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, collector: Collector, *, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `collector` on http://host:port/metrics in a daemon thread (port 0: any free one).

    OSError when the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics served url=http://%s:%d/metrics", host, server.server_port)
    return MetricsServer(server, thread)


# ---- a node -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSample:
    """A node's numbers at one instant."""

    node_id: str
    rounds: int
    round: int
    models_sent: int
    models_received: int
    bytes_sent: int
    bytes_received: int
    peers: int
    accuracy: float | None
    loss: float | None
    rejected: dict[str, int] = field(default_factory=dict)
    epsilon: float | None = None


def sample_node(node: Node) -> NodeSample:
    """Read `node`'s counters; call on the node's event loop."""
    c = node.counters
    ev = node.last_eval
    return NodeSample(
        node_id=node.node_id,
        rounds=c.rounds,
        round=node.round,
        models_sent=c.models_sent,
        models_received=c.models_received,
        bytes_sent=c.bytes_sent,
        bytes_received=c.bytes_received,
        peers=len(node.view.live()),
        accuracy=None if ev is None else ev.accuracy,
        loss=None if ev is None else ev.loss,
        rejected=dict(c.rejected),
        epsilon=node.epsilon,
    )


def serve_node_metrics(node: Node, port: int, *, host: str = "127.0.0.1") -> MetricsServer:
    """`serve_metrics` for `node`; call from the event loop the node runs on."""
    return serve_metrics(port, NodeCollector(node, asyncio.get_running_loop()), host=host)


class NodeCollector(Collector):
    """`p2pfl_*` metrics of one `Node`, read on the loop it runs on."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop) -> None:
        self.node = node
        self.loop = loop
        self._last: NodeSample | None = None

    def collect(self) -> Iterator[Metric]:
        sample = self._sample()
        if sample is not None:
            yield from node_metrics(sample)

    def _sample(self) -> NodeSample | None:
        result: concurrent.futures.Future[NodeSample] = concurrent.futures.Future()

        def read() -> None:
            try:
                result.set_result(sample_node(self.node))
            except Exception as exc:  # handed to the scraping thread, which logs it
                result.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(read)
            self._last = result.result(timeout=_SAMPLE_TIMEOUT)
        except RuntimeError:
            pass  # the loop is closed: the node has stopped; serve the last numbers
        except concurrent.futures.TimeoutError:
            log.debug("metrics: the node's loop did not answer in time; serving older numbers")
        return self._last


def node_metrics(s: NodeSample) -> Iterator[Metric]:
    """The metric families of one node sample."""
    labels = [s.node_id]
    for name, doc, value in (
        ("p2pfl_rounds", "Rounds completed.", s.rounds),
        ("p2pfl_models_sent", "Models sent to peers.", s.models_sent),
        ("p2pfl_models_received", "Models received from peers.", s.models_received),
        ("p2pfl_bytes_sent", "Bytes of model messages sent.", s.bytes_sent),
        ("p2pfl_bytes_received", "Bytes received on the inbox.", s.bytes_received),
    ):
        counter = CounterMetricFamily(name, doc, labels=["node"])
        counter.add_metric(labels, value)
        yield counter
    rejected = CounterMetricFamily(
        "p2pfl_rejected", "Messages rejected, by reason.", labels=["node", "reason"]
    )
    for reason, count in sorted(s.rejected.items()):
        rejected.add_metric([s.node_id, reason], count)
    yield rejected
    yield from _gauges(
        s.node_id,
        {
            "round": s.round,
            "accuracy": s.accuracy,
            "loss": s.loss,
            "peers": s.peers,
            "epsilon": s.epsilon,
        },
    )


_GAUGE_DOCS = {
    "round": "Current round.",
    "accuracy": "Accuracy of the last local evaluation.",
    "loss": "Test loss of the last local evaluation.",
    "peers": "Live trainer peers in the node's view.",
    "epsilon": "Differential privacy: epsilon spent on the node's own samples.",
    "cpu_percent": "CPU use of the node's process, percent of one core.",
    "rss_bytes": "Resident memory of the node's process.",
    "last_seen_seconds": "Seconds since the monitor last heard from the node.",
    "stale": "1 when the monitor has not heard from the node in time.",
    "in_global": "1 when the node's evaluation is in the global metrics.",
}


def _gauges(node_id: str, values: Mapping[str, float | int | None]) -> Iterator[Metric]:
    for key, value in values.items():
        gauge = GaugeMetricFamily(f"p2pfl_{key}", _GAUGE_DOCS[key], labels=["node"])
        if value is not None:
            gauge.add_metric([node_id], float(value))
        yield gauge


# ---- a monitor --------------------------------------------------------------------------------


class MonitorCollector(Collector):
    """Per-node metrics from a monitor's snapshot, and the network's global metrics."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any] | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if snap is None:
            return
        yield from monitor_metrics(snap)


def monitor_metrics(snap: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families of one monitor snapshot (see `NetworkState.snapshot`)."""
    nodes = list(snap.get("nodes", []))
    counters = {
        "models_sent": ("p2pfl_models_sent", "Models sent to peers."),
        "models_received": ("p2pfl_models_received", "Models received from peers."),
        "bytes_out": ("p2pfl_bytes_sent", "Bytes of model messages sent."),
        "bytes_in": ("p2pfl_bytes_received", "Bytes received on the inbox."),
    }
    for key, (name, doc) in counters.items():
        counter = CounterMetricFamily(name, doc, labels=["node"])
        for node in nodes:
            if node.get(key) is not None:
                counter.add_metric([node["id"]], node[key])
        yield counter
    gauges = {
        "round": "round",
        "accuracy": "accuracy",
        "loss": "test_loss",
        "peers": "peers",
        "epsilon": "epsilon",
        "cpu_percent": "cpu",
        "rss_bytes": "rss",
        "last_seen_seconds": "last_seen_s",
        "stale": "stale",
        "in_global": "in_global",
    }
    for name, key in gauges.items():
        gauge = GaugeMetricFamily(f"p2pfl_{name}", _GAUGE_DOCS[name], labels=["node"])
        for node in nodes:
            if node.get(key) is not None:
                gauge.add_metric([node["id"]], float(node[key]))
        yield gauge
    glob = snap.get("global", {})
    for key, doc in (
        ("accuracy", "Accuracy of the sum of all live nodes' confusion matrices."),
        ("macro_f1", "Macro-F1 of the sum of all live nodes' confusion matrices."),
        ("divergence", "Mean pairwise distance between the nodes' weight projections."),
    ):
        gauge = GaugeMetricFamily(f"p2pfl_global_{key}", doc)
        if glob.get(key) is not None:
            gauge.add_metric([], float(glob[key]))
        yield gauge
    count = GaugeMetricFamily("p2pfl_nodes", "Nodes the monitor knows, by state.", labels=["state"])
    count.add_metric(["live"], float(glob.get("nodes", 0)))
    count.add_metric(["stale"], float(glob.get("stale", 0)))
    yield count
