"""Prometheus endpoints, scraped over HTTP on loopback and parsed with prometheus-client's parser:
a real node's counters (nodes on the memory bus), and a monitor's per-node and global metrics."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.config import NodeConfig
from p2pfl.learning.datasets import load_dataset
from p2pfl.learning.torch_learner import build_learner
from p2pfl.monitor.prometheus import (
    MetricsServer,
    MonitorCollector,
    serve_metrics,
    serve_node_metrics,
)
from p2pfl.monitor.state import NetworkState
from p2pfl.node import Node
from p2pfl.protocol import topics
from p2pfl.topology import make_schedule
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.nodeproc import free_ports, stop_all, wait_until
from tests.test_e2e_run import FAST, start_cluster

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics on loopback and parse it: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@contextlib.contextmanager
def serving(server: MetricsServer) -> Iterator[MetricsServer]:
    try:
        yield server
    finally:
        server.shutdown()


def node_labels(node: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"node": node, **more}.items()))


async def test_a_running_nodes_counters_are_scraped_over_http() -> None:
    dataset = await asyncio.to_thread(load_dataset, "mnist1d", seed=0)
    bus = MemoryBus()
    ids = ("n0", "n1")
    nodes = []
    first_round = asyncio.Event()
    for k, node_id in enumerate(ids):
        config = NodeConfig.model_validate(
            {"network": "prom", "id": node_id, "model": "logreg", "mode": "sync", "rounds": 3,
             "discovery": ("static",), "round_timeout": 10.0, "telemetry_interval": 0,
             "peers": [{"id": p, "broker": "mqtt://127.0.0.1:1"} for p in ids]}
        )  # fmt: skip
        learner = build_learner(
            "logreg",
            dataset,
            np.arange(k * 100, (k + 1) * 100),
            test_indices=np.arange(200),
            init_seed=0,
            seed=k,
        )
        transport = MemoryTransport(bus, node_id)
        nodes.append(
            Node(config, learner, transport, node_id=node_id, home_broker="mqtt://127.0.0.1:1",
                 schedule=make_schedule("ring"), on_round=lambda _: first_round.set())
        )  # fmt: skip
    n0 = nodes[0]
    with serving(serve_node_metrics(n0.status, 0, host="127.0.0.1")) as server:
        before = await asyncio.to_thread(scrape, server.port)
        assert before[("p2pfl_rounds_total", node_labels("n0"))] == 0
        assert ("p2pfl_accuracy", node_labels("n0")) not in before  # nothing evaluated yet

        intruder = MemoryTransport(bus, "intruder")
        await intruder.connect()
        async with asyncio.timeout(40), asyncio.TaskGroup() as tg:
            runs = [tg.create_task(node.run()) for node in nodes]
            await first_round.wait()
            await intruder.publish(topics.inbox("prom", "n0"), b"\x93not an envelope")
        assert all(run.result().rounds == 3 for run in runs)

        after = await asyncio.to_thread(scrape, server.port)
        c = n0.counters
        assert n0.last_eval is not None
        expected = {
            ("p2pfl_rounds_total", node_labels("n0")): 3,
            ("p2pfl_round", node_labels("n0")): 3,
            ("p2pfl_models_sent_total", node_labels("n0")): c.models_sent,
            ("p2pfl_models_received_total", node_labels("n0")): c.models_received,
            ("p2pfl_bytes_sent_total", node_labels("n0")): c.bytes_sent,
            ("p2pfl_bytes_received_total", node_labels("n0")): c.bytes_received,
            ("p2pfl_rejected_total", node_labels("n0", reason="malformed")): 1,
            ("p2pfl_accuracy", node_labels("n0")): n0.last_eval.accuracy,
            ("p2pfl_loss", node_labels("n0")): n0.last_eval.loss,
            ("p2pfl_peers", node_labels("n0")): 1,
        }
        assert {key: after.get(key) for key in expected} == pytest.approx(expected)
        assert c.models_sent == 3 and c.bytes_received > 0


def test_a_monitors_per_node_and_global_metrics_are_scraped_over_http() -> None:
    state = NetworkState("prom", stale_after=60.0)  # both live, however slow the scrape
    reports: dict[str, dict[str, Any]] = {
        "a": {"round": 7, "accuracy": 0.75, "confusion": [[3, 1], [0, 0]], "projection": [0, 0],
              "bytes_out": 1000, "bytes_in": 800, "models_sent": 5, "models_received": 4,
              "peers": ["b"], "cpu": 50.0, "rss": 4096, "test_loss": 0.5},
        "b": {"round": 9, "accuracy": 1.0, "confusion": [[0, 0], [0, 4]], "projection": [3, 4]},
    }  # fmt: skip
    for node_id, body in reports.items():
        state.on_telemetry(node_id, {"id": node_id, **body}, sent_at=1.0)
    latest: dict[str, Any] = {"snap": None}
    with serving(serve_metrics(0, MonitorCollector(lambda: latest["snap"]))) as server:
        assert not any(name.startswith("p2pfl") for name, _ in scrape(server.port))
        latest["snap"] = state.snapshot()
        got = scrape(server.port)
    expected = {
        ("p2pfl_global_accuracy", ()): 7 / 8,
        ("p2pfl_global_macro_f1", ()): (6 / 7 + 8 / 9) / 2,
        ("p2pfl_global_divergence", ()): 5.0,
        ("p2pfl_nodes", (("state", "live"),)): 2,
        ("p2pfl_nodes", (("state", "stale"),)): 0,
        ("p2pfl_round", node_labels("a")): 7,
        ("p2pfl_round", node_labels("b")): 9,
        ("p2pfl_accuracy", node_labels("a")): 0.75,
        ("p2pfl_loss", node_labels("a")): 0.5,
        ("p2pfl_peers", node_labels("a")): 1,
        ("p2pfl_bytes_sent_total", node_labels("a")): 1000,
        ("p2pfl_bytes_received_total", node_labels("a")): 800,
        ("p2pfl_models_sent_total", node_labels("a")): 5,
        ("p2pfl_cpu_percent", node_labels("a")): 50.0,
        ("p2pfl_rss_bytes", node_labels("a")): 4096,
        ("p2pfl_stale", node_labels("b")): 0,
    }
    assert {key: got.get(key) for key in expected} == pytest.approx(expected)
    assert ("p2pfl_loss", node_labels("b")) not in got  # unknown values are left out, not 0


def test_p2pfl_run_serves_its_status_on_the_metrics_port(tmp_path: Path) -> None:
    """End to end: a `p2pfl run` process's `--metrics-port`, scraped while it trains."""
    (port,) = free_ports(1)
    (node,) = start_cluster(tmp_path, 1, [*FAST, "--rounds", "1000", "--metrics-port", str(port)])
    got: Samples = {}

    def trained() -> bool:
        try:
            got.update(scrape(port))
        except OSError:  # not listening yet
            return False
        return got.get(("p2pfl_rounds_total", node_labels("n0")), 0) >= 2

    try:
        wait_until(trained, 120, "two rounds on the metrics port", node.tail)
    finally:
        stop_all([node])
    n0 = node_labels("n0")
    assert got[("p2pfl_round", n0)] >= 1
    assert got[("p2pfl_loss", n0)] == got[("p2pfl_test_loss", n0)] > 0
    assert got[("p2pfl_train_loss", n0)] > 0 and 0 <= got[("p2pfl_accuracy", n0)] <= 1
    assert got[("p2pfl_peers", n0)] == 0  # alone: it has no peer
