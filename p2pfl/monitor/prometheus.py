"""Prometheus metrics over HTTP (prometheus-client), for a node (`p2pfl run --metrics-port`) and
for a monitor (`p2pfl monitor --metrics-port`).

Every metric is named `p2pfl_*` and labelled `node`. Each server has its own
`CollectorRegistry` with one custom collector, never the process-global registry, so several
nodes in one process (tests, the simulator) do not clash.

Both export the fields of a node's status (`p2pfl.status.NodeStatus`) under the names of one
table. The HTTP server answers on its own threads; a node's state belongs to its event loop, so
the node collector calls `Node.status()` *on the loop* (`call_soon_threadsafe`) and the monitor
collector reads a snapshot (plain data) that the monitor's loop replaces as a whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pfl.status import NodeStatus

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

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


# ---- the metrics, by the fields of a node's status --------------------------------------------

COUNTERS = {
    "rounds": ("p2pfl_rounds", "Rounds completed."),
    "models_sent": ("p2pfl_models_sent", "Models sent to peers."),
    "models_received": ("p2pfl_models_received", "Models received from peers."),
    "bytes_sent": ("p2pfl_bytes_sent", "Bytes of model messages sent."),
    "bytes_received": ("p2pfl_bytes_received", "Bytes received on the inbox."),
}
"""`NodeStatus.summary()` key -> the counter it is exported as."""
Gauges = tuple[tuple[str, str, str], ...]
GAUGES: Gauges = (
    ("round", "p2pfl_round", "Current round."),
    ("accuracy", "p2pfl_accuracy", "Accuracy of the last local evaluation."),
    ("test_loss", "p2pfl_test_loss", "Test loss of the last local evaluation."),
    ("test_loss", "p2pfl_loss", "Test loss of the last local evaluation (p2pfl_test_loss)."),
    ("train_loss", "p2pfl_train_loss", "Training loss of the last local step."),
    ("peers", "p2pfl_peers", "Live trainer peers in the node's view."),
    ("epsilon", "p2pfl_epsilon", "Differential privacy: epsilon spent on the node's own samples."),
)
"""(`NodeStatus.summary()` key, gauge, help). `p2pfl_loss` is the test loss under the name
scrapers of earlier versions read."""
MONITOR_GAUGES: Gauges = (
    ("cpu", "p2pfl_cpu_percent", "CPU use of the node's process, percent of one core."),
    ("rss", "p2pfl_rss_bytes", "Resident memory of the node's process."),
    ("last_seen_s", "p2pfl_last_seen_seconds", "Seconds since the monitor last heard from it."),
    ("stale", "p2pfl_stale", "1 when the monitor has not heard from the node in time."),
    ("in_global", "p2pfl_in_global", "1 when the node's evaluation is in the global metrics."),
)
"""What a monitor knows of a node beyond `Node.status()`: the process figures of its telemetry
(`telemetry.measured`) and its liveness."""


def status_metrics(rows: Sequence[Mapping[str, Any]], gauges: Gauges = GAUGES) -> Iterator[Metric]:
    """The metric families of some nodes, one row each (`NodeStatus.summary()` plus `id`)."""
    for key, (name, doc) in COUNTERS.items():
        counter = CounterMetricFamily(name, doc, labels=["node"])
        for row in rows:
            if row.get(key) is not None:
                counter.add_metric([row["id"]], row[key])
        yield counter
    rejected = CounterMetricFamily(
        "p2pfl_rejected", "Messages rejected, by reason.", labels=["node", "reason"]
    )
    for row in rows:
        for reason, count in sorted((row.get("rejected_by_reason") or {}).items()):
            rejected.add_metric([row["id"], reason], count)
    yield rejected
    for key, name, doc in gauges:
        gauge = GaugeMetricFamily(name, doc, labels=["node"])
        for row in rows:
            if row.get(key) is not None:
                gauge.add_metric([row["id"]], float(row[key]))
        yield gauge


# ---- a node -----------------------------------------------------------------------------------


def serve_node_metrics(
    status: Callable[[], NodeStatus], port: int, *, host: str = "127.0.0.1"
) -> MetricsServer:
    """`serve_metrics` of a node's `status` (`Node.status`); call from the loop the node runs on."""
    return serve_metrics(port, NodeCollector(status, asyncio.get_running_loop()), host=host)


class NodeCollector(Collector):
    """`p2pfl_*` metrics of one node's status, read on the loop the node runs on."""

    def __init__(self, status: Callable[[], NodeStatus], loop: asyncio.AbstractEventLoop) -> None:
        self.status = status
        self.loop = loop
        self._last: NodeStatus | None = None

    def collect(self) -> Iterator[Metric]:
        status = self._sample()
        if status is not None:
            yield from status_metrics([{"id": status.id, **status.summary()}])

    def _sample(self) -> NodeStatus | None:
        result: concurrent.futures.Future[NodeStatus] = concurrent.futures.Future()

        def read() -> None:
            try:
                result.set_result(self.status())
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
    yield from status_metrics(nodes, GAUGES + MONITOR_GAUGES)
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
