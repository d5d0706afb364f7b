"""A node's status: `Node.status()` reads the node on its event loop, and the one telemetry schema
(`NodeStatus`) round-trips what a node publishes and refuses, with a reason, what it could not.

The round trip goes through the real envelope (msgpack) and the monitor's parser; the refusals
through the monitor's `NetworkState`, which counts them.
"""

from __future__ import annotations

import ast
import asyncio
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.config import NodeConfig
from p2pfl.monitor.prometheus import serve_node_metrics
from p2pfl.monitor.records import parse_telemetry
from p2pfl.monitor.state import NetworkState
from p2pfl.node import Node
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.status import NodeStatus
from p2pfl.telemetry import encode_telemetry
from p2pfl.topology import make_schedule
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.test_telemetry_detail import ProbeLearner

pytestmark = pytest.mark.timeout(60)

NET = "statustest"

# ---- Node.status() runs on the node's event loop ------------------------------------------------


async def test_node_status_is_read_on_the_loop_for_telemetry_and_for_prometheus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    calls: list[tuple[int, bool]] = []  # (thread, whether an event loop runs in it)
    original = Node.status

    def spy(self: Node) -> NodeStatus:
        try:
            asyncio.get_running_loop()
            on_a_loop = True
        except RuntimeError:
            on_a_loop = False
        calls.append((threading.get_ident(), on_a_loop))
        return original(self)

    monkeypatch.setattr(Node, "status", spy)
    bus = MemoryBus()
    watcher = MemoryTransport(bus, "watcher")
    await watcher.connect()
    await watcher.subscribe(topics.telemetry(NET, "n0"))
    config = NodeConfig.model_validate(
        {"network": NET, "id": "n0", "discovery": ("static",), "mode": "async",
         "telemetry_interval": 0.05, "period": 0.05}
    )  # fmt: skip
    node = Node(config, ProbeLearner(), MemoryTransport(bus, "n0"), node_id="n0",
                home_broker="mqtt://127.0.0.1:1", schedule=make_schedule("ring"))  # fmt: skip
    server = serve_node_metrics(node.status, 0)
    try:
        async with asyncio.TaskGroup() as tg:
            running = tg.create_task(node.run())
            published = []
            async for message in watcher.messages():
                published.append(unpack_envelope(bytes(message.payload)).body)
                if len(published) == 2:
                    break
            url = f"http://127.0.0.1:{server.port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            node.stop()
            await running
    finally:
        server.shutdown()
    assert b'p2pfl_round{node="n0"}' in text
    assert [body["id"] for body in published] == ["n0", "n0"]
    assert published[-1]["projection"] is not None  # the thread's part is there too
    # the run's learning configuration travels with it (the web dashboard shows it)
    assert published[-1]["config"]["mode"] == "async" and len(published[-1]["config_hash"]) == 64
    assert len(calls) >= 3  # two records and a scrape
    assert set(calls) == {(loop_thread, True)}


def test_telemetry_and_the_exporter_do_not_import_the_node() -> None:
    """They depend on the status record, not on `Node` (no `p2pfl.node` <-> `telemetry` cycle)."""
    root = Path(__file__).resolve().parents[1] / "p2pfl"
    for path in [
        root / "telemetry.py",
        root / "status.py",
        *sorted((root / "monitor").glob("*.py")),
    ]:
        tree = ast.parse(path.read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}  # fmt: skip
        assert "p2pfl.node" not in imported, path


# ---- the schema ---------------------------------------------------------------------------------

node_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24)
text = st.text(st.characters(categories=("L", "N", "P", "S")), max_size=40)
labels = st.text(st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=64)
counts = st.integers(0, 2**62 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
square = st.integers(1, 6).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 10_000), min_size=n, max_size=n), min_size=n,
                       max_size=n).map(lambda rows: tuple(map(tuple, rows)))
)  # fmt: skip


@st.composite
def statuses(draw: st.DrawFn) -> NodeStatus:
    detail = draw(st.sampled_from(["full", "metrics"]))
    full = detail == "full"
    optional = st.none
    return NodeStatus(
        id=draw(node_ids), detail=detail, role=draw(st.sampled_from(["trainer", "monitor"])),
        run=draw(optional() | text), tags=tuple(draw(st.lists(labels, max_size=4))),
        config=draw(st.dictionaries(labels, st.none() | st.booleans() | counts | finite | text,
                                    max_size=6)),
        config_hash=draw(optional() | text),
        schedule=draw(optional() | text), mode=draw(optional() | text), broker=draw(text),
        round=draw(counts), rounds=draw(optional() | counts), train_loss=draw(optional() | finite),
        test_loss=draw(optional() | finite), accuracy=draw(optional() | finite),
        confusion=draw(square | optional()) if full else None, samples=draw(optional() | counts),
        models_sent=draw(counts), models_received=draw(counts), bytes_sent=draw(counts),
        bytes_received=draw(counts), rejected=draw(st.dictionaries(labels, counts, max_size=4)),
        cpu=draw(optional() | finite), rss=draw(optional() | counts),
        uptime=draw(optional() | finite), peers=tuple(draw(st.lists(node_ids, max_size=5))),
        sent_to=tuple(draw(st.lists(node_ids, max_size=3))),
        projection=tuple(draw(st.lists(finite, min_size=1, max_size=40))) if full else None,
        epsilon=draw(optional() | st.floats(0, 1e6)), paused=draw(optional() | labels),
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(statuses())
def test_a_valid_status_round_trips_through_the_wire_and_the_monitor(status: NodeStatus) -> None:
    payload = encode_telemetry(NET, status.id, 1, status)
    body = unpack_envelope(payload).body
    assert parse_telemetry(status.id, body) == status
    # The names monitors of earlier versions read are still on the wire.
    assert (body["loss"], body["bytes_out"], body["bytes_in"]) == (
        status.train_loss,
        status.bytes_sent,
        status.bytes_received,
    )
    assert ("confusion" in body) == (status.detail == "full")
    state = NetworkState(NET)
    assert state.on_telemetry(status.id, body, sent_at=1.0) == (status.role == "trainer")


def test_a_record_of_an_earlier_version_reads_with_its_old_names() -> None:
    old = {"id": "a", "loss": 0.5, "test_loss": 0.75, "bytes_out": 10, "bytes_in": 20}
    status = parse_telemetry("a", old)
    assert (status.train_loss, status.test_loss) == (0.5, 0.75)
    assert (status.bytes_sent, status.bytes_received) == (10, 20)
    assert status.rounds is None and status.detail == "full"


# (wire key, a strategy of values the schema must refuse for it)
CORRUPTIONS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("round", st.integers(max_value=-1) | st.integers(min_value=2**62) | st.booleans() | text),
    ("models_sent", st.integers(max_value=-1) | finite | st.booleans()),
    ("bytes_out", st.integers(max_value=-1) | st.just("1")),
    ("bytes_in", st.integers(max_value=-1) | st.just([1])),
    ("accuracy", st.booleans() | text.map(lambda t: t or "x")),
    ("train_loss", st.booleans() | st.just([0.5])),
    ("epsilon", st.floats(max_value=-1e-9, allow_infinity=False) | st.just("8")),
    ("role", st.integers() | st.just(["trainer"])),
    ("peers", st.just(["a/b"]) | st.just(["a b"]) | st.just([""]) | st.integers()),
    ("sent_to", st.just(["x#"]) | st.just("abc")),
    ("projection", st.just([1.0, float("nan")]) | st.just([float("inf")]) | st.just([0.0] * 1025)),
    ("confusion", st.just([[1, 2], [3]]) | st.just([[1, -2], [3, 4]]) | st.just("nope")),
    ("rejected", st.just({"x": -1}) | st.just({"": 1}) | st.just(["x"])),
    ("tags", st.just([""]) | st.just(["x" * 65]) | st.just(["t"] * 101)),
    ("id", node_ids.filter(lambda i: i != "n0")),
    ("detail", st.just("off") | st.just("everything") | st.just(1)),
    ("paused", st.just("") | st.just("x" * 65) | st.integers() | st.just(["window"])),
    (
        "config",
        st.just({"lr": [0.1]})
        | st.just({"": 1})
        | st.just({f"k{i}": i for i in range(65)})
        | st.just({"model": {"nested": 1}})
        | st.just(["lr"]),
    ),
]


@settings(max_examples=200, deadline=None)
@given(statuses(), st.sampled_from(CORRUPTIONS), st.data())
def test_a_malformed_record_is_refused_with_a_reason_naming_its_field_and_counted(
    status: NodeStatus, corruption: tuple[str, st.SearchStrategy[Any]], data: st.DataObject
) -> None:
    key, bad_values = corruption
    body = {**status.wire(), "id": "n0", key: data.draw(bad_values)}
    with pytest.raises(ProtocolError) as refused:
        parse_telemetry("n0", body)
    assert key in refused.value.reason
    state = NetworkState(NET)
    assert not state.on_telemetry("n0", body, sent_at=1.0)
    assert "n0" not in state and state.snapshot()["rejected"] == {"telemetry": 1}


def test_a_metrics_record_that_carries_the_matrix_is_refused_naming_it() -> None:
    body = {"id": "a", "detail": "metrics", "confusion": [[1, 0], [0, 1]]}
    with pytest.raises(ProtocolError, match="confusion"):
        parse_telemetry("a", body)
