"""`telemetry_detail`: what a node's telemetry reveals at `full`, `metrics` and `off`, and what a
monitor makes of a network that mixes them.

The node's side runs the real `Node` on the in-memory bus with a small numpy learner whose
confusion matrix and weights are easy to find in the published bytes; the monitor's side feeds
`NetworkState` by hand, as `tests/test_monitor_state.py` does.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from p2pfl.config import ConfigError, NodeConfig, load_config
from p2pfl.discovery.presence import PresenceRecord
from p2pfl.learning.learner import EvalResult, FitResult
from p2pfl.monitor.dashboard import render_dashboard, render_report
from p2pfl.monitor.prometheus import monitor_metrics
from p2pfl.monitor.records import parse_telemetry
from p2pfl.monitor.state import NetworkState
from p2pfl.node import Node
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.telemetry import LogForwarder, ProcessStats, encode_telemetry, measured, projection
from p2pfl.topology import make_schedule
from p2pfl.transport.memory import MemoryBus, MemoryTransport

pytestmark = pytest.mark.timeout(60)

WaitUntil = Callable[..., Awaitable[None]]
NET = "detailtest"
BUS = "mqtt://127.0.0.1:1"
# Counts no other field of a record holds, so finding their msgpack encoding in the bytes means
# the matrix is there.
CONFUSION = np.array([[40961, 7], [9, 40993]], dtype=np.int64)


class ProbeLearner:
    """A numpy `Learner` whose evaluation is `CONFUSION` and whose weights never change."""

    def __init__(self) -> None:
        self.w = np.linspace(-1.0, 1.0, 64, dtype=np.float32)

    @property
    def num_samples(self) -> int:
        return 10

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.w = np.array(weights["w"], dtype=np.float32)

    def fit(self) -> FitResult:
        return FitResult(0.5, 10, 0.0)

    def evaluate(self) -> EvalResult:
        accuracy = float(np.trace(CONFUSION) / CONFUSION.sum())
        return EvalResult(0.25, accuracy, int(CONFUSION.sum()), CONFUSION.copy())


def make_node(bus: MemoryBus, detail: str, logs: LogForwarder | None = None, **extra: Any) -> Node:
    config = NodeConfig.model_validate(
        {"network": NET, "id": "n0", "discovery": ("static",), "mode": "async",
         "telemetry_detail": detail, **extra}
    )  # fmt: skip
    return Node(
        config,
        ProbeLearner(),
        MemoryTransport(bus, "n0"),
        node_id="n0",
        home_broker=BUS,
        schedule=make_schedule("ring"),
        logs=logs,
    )


def evaluated(detail: str) -> Node:
    node = make_node(MemoryBus(), detail)
    node.last_eval = node.learner.evaluate()
    return node


def msgpack_uint16(value: int) -> bytes:
    return b"\xcd" + struct.pack(">H", value)


def test_the_config_file_key_and_the_flag_set_the_level(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('telemetry_detail = "off"\n')
    assert load_config(cfg, {}).telemetry_detail == "off"
    assert load_config(cfg, {"telemetry_detail": "metrics"}).telemetry_detail == "metrics"
    assert load_config(None, {}).telemetry_detail == "full"
    with pytest.raises(ConfigError, match=r"^config error: telemetry_detail: .*'some'"):
        load_config(None, {"telemetry_detail": "some"})


# ---- what the bytes of a record hold, per level ---------------------------------------------


def test_full_telemetry_carries_the_confusion_matrix_and_the_projection() -> None:
    node = evaluated("full")
    record = measured(node.status(), ProcessStats(), node.learner.get_weights, NET)
    payload = encode_telemetry(NET, "n0", 1, record)
    sent = unpack_envelope(payload).body
    assert sent["detail"] == "full"
    assert sent["confusion"] == CONFUSION.tolist()
    assert sent["projection"] == pytest.approx(projection(node.learner.get_weights(), NET))
    # The positive control for the next test: these byte patterns are how the matrix travels.
    assert all(msgpack_uint16(int(v)) in payload for v in (40961, 40993))
    assert b"confusion" in payload and b"projection" in payload


def test_metrics_telemetry_leaves_the_matrix_and_the_projection_out_of_the_bytes() -> None:
    node = evaluated("metrics")
    record = measured(node.status(), ProcessStats(), node.learner.get_weights, NET)
    payload = encode_telemetry(NET, "n0", 1, record)
    sent = unpack_envelope(payload).body
    assert sent["detail"] == "metrics"
    assert sent["accuracy"] == pytest.approx(np.trace(CONFUSION) / CONFUSION.sum())
    assert sent["round"] == 0 and sent["samples"] == 10  # the metrics are all still there
    assert b"confusion" not in payload and b"projection" not in payload
    assert not any(msgpack_uint16(int(v)) in payload for v in (40961, 40993))
    sketch = projection(node.learner.get_weights(), NET)
    assert not any(struct.pack(">d", v) in payload for v in sketch)
    # A monitor reads it as a metrics-only report.
    report = parse_telemetry("n0", sent)
    assert report.detail == "metrics" and report.confusion is None and report.projection is None


def test_a_node_on_off_has_no_telemetry_body() -> None:
    node = evaluated("off")
    with pytest.raises(ValueError, match="publishes no telemetry"):
        encode_telemetry(NET, "n0", 1, node.status())


# ---- what a running node publishes, per level -----------------------------------------------


class Watcher:
    """Every telemetry and log payload published on the bus, in order."""

    def __init__(self, bus: MemoryBus) -> None:
        self.transport = MemoryTransport(bus, "watcher")
        self.telemetry: list[bytes] = []
        self.logs: list[str] = []

    async def start(self) -> None:
        await self.transport.connect()
        await self.transport.subscribe(topics.telemetry_all(NET))
        await self.transport.subscribe(topics.log(NET, "n0"))

    async def collect(self) -> None:
        async for message in self.transport.messages():
            payload = bytes(message.payload)
            if message.topic == topics.log(NET, "n0"):
                self.logs.append(unpack_envelope(payload).body["msg"])
            else:
                self.telemetry.append(payload)


def warning(text: str) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "p2pfl.node", "levelno": logging.WARNING,
                                  "levelname": "WARNING", "msg": text})  # fmt: skip


@pytest.mark.parametrize("detail", ["full", "metrics", "off"])
async def test_a_running_node_publishes_what_its_level_allows_and_forwards_warnings(
    detail: str, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    watcher = Watcher(bus)
    await watcher.start()
    # A record an earlier run left retained on a shared broker.
    old = MemoryTransport(bus, "earlier-run")
    await old.connect()
    await old.publish(topics.telemetry(NET, "n0"), b"old record", retain=True)
    logs = LogForwarder()
    logs.handle(warning("first"))
    node = make_node(bus, detail, logs, telemetry_interval=0.05, period=0.05)
    async with asyncio.TaskGroup() as tg:
        collecting = tg.create_task(watcher.collect())
        running = tg.create_task(node.run())
        await wait_until(lambda: watcher.logs == ["first"], within=20)
        # The loop publishes a record in the same pass as the first warning (its interval is
        # due at once); once the second warning arrives, that pass is over.
        logs.handle(warning("second"))
        await wait_until(lambda: watcher.logs == ["first", "second"], within=20)
        node.stop()
        await running
        collecting.cancel()
    records = [p for p in watcher.telemetry if p not in (b"old record", b"")]
    if detail == "off":
        assert records == []
        assert bus.retained(topics.telemetry(NET, "n0")) is None  # the old record is deleted
        return
    assert records
    for payload in records:
        body = unpack_envelope(payload).body
        assert body["detail"] == detail
        assert ("confusion" in body, "projection" in body) == (detail == "full",) * 2
    retained = bus.retained(topics.telemetry(NET, "n0"))
    assert retained is not None and unpack_envelope(bytes(retained)).body["detail"] == detail


# ---- the monitor, with a network that mixes the levels ----------------------------------------

WALL = 1_800_000_000.0


def mixed_network() -> tuple[NetworkState, list[float]]:
    now = [0.0]
    state = NetworkState("net", clock=lambda: now[0], wall=lambda: WALL + now[0], stale_after=5)

    def report(node_id: str, **fields: Any) -> None:
        body = {"id": node_id, "round": 3, "accuracy": 0.5, "broker": "mqtt://h:1", **fields}
        assert state.on_telemetry(node_id, body, sent_at=WALL + now[0])

    report("gone", detail="full", confusion=[[9, 0], [0, 9]])
    now[0] = 10.0  # "gone" is stale from here on
    report("full", detail="full", confusion=[[3, 1], [0, 4]], projection=[1.0] * 32)
    report("legacy", confusion=[[1, 1], [1, 1]], projection=[0.0] * 32)  # before `detail`
    report("metrics", detail="metrics", accuracy=0.99)
    report("fresh", detail="full")  # not evaluated yet
    quiet = PresenceRecord("quiet", online=True, broker="mqtt://h:2", round=4)
    assert state.on_presence(quiet, sent_at=WALL + now[0])  # telemetry off: presence only
    return state, now


def test_the_monitor_names_every_node_its_global_metrics_leave_out_and_why() -> None:
    state, _ = mixed_network()
    snap = state.snapshot()
    assert snap["excluded_from_global"] == [
        {"id": "fresh", "reason": "not-evaluated"},
        {"id": "gone", "reason": "stale"},
        {"id": "metrics", "reason": "metrics-only"},
        {"id": "quiet", "reason": "no-telemetry"},
    ]
    # Global accuracy is that of "full" and "legacy" alone: (3 + 4 + 1 + 1) / (8 + 4).
    assert snap["global"]["accuracy"] == pytest.approx(9 / 12)
    assert snap["global"]["included"] == 2 and snap["global"]["samples"] == 12
    assert snap["global"]["nodes"] == 5 and snap["global"]["stale"] == 1
    nodes = {n["id"]: n for n in snap["nodes"]}
    assert {k: (n["detail"], n["in_global"]) for k, n in nodes.items()} == {
        "fresh": ("full", False),
        "full": ("full", True),
        "gone": ("full", False),
        "legacy": ("full", True),
        "metrics": ("metrics", False),
        "quiet": (None, False),
    }
    assert nodes["metrics"]["accuracy"] == 0.99 and nodes["metrics"]["confusion"] is None
    assert nodes["quiet"]["round"] == 4


def test_a_node_that_switches_level_moves_in_and_out_of_the_global_metrics() -> None:
    state, now = mixed_network()
    now[0] += 1
    body = {"id": "metrics", "detail": "full", "confusion": [[0, 0], [0, 8]], "round": 4}
    assert state.on_telemetry("metrics", body, sent_at=WALL + now[0])
    assert "metrics" not in {e["id"] for e in state.excluded_from_global()}
    assert state.global_metrics().included == 3 and state.global_metrics().samples == 20


@pytest.mark.parametrize(
    "fields",
    [
        {"detail": "metrics", "confusion": [[1, 0], [0, 1]]},  # says metrics, carries more
        {"detail": "metrics", "projection": [0.5] * 32},
        {"detail": "off"},  # a node on off publishes nothing
        {"detail": "everything"},
        {"detail": 1},
    ],
)
def test_a_record_whose_detail_contradicts_it_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_telemetry("x", {"id": "x", **fields})
    state = NetworkState("net")
    assert not state.on_telemetry("x", {"id": "x", **fields}, sent_at=1.0)
    assert state.snapshot()["rejected"] == {"telemetry": 1} and "x" not in state


KINDS = ("full", "unevaluated", "legacy", "metrics", "presence", "stale")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(KINDS), max_size=10), st.integers(1, 50))
def test_every_known_node_is_either_in_the_global_metrics_or_named_as_left_out(
    kinds: list[str], count: int
) -> None:
    now = [0.0]
    state = NetworkState("net", clock=lambda: now[0], wall=lambda: WALL + now[0], stale_after=5)
    confusion = [[count, 1], [2, count]]
    for i, kind in enumerate(sorted(kinds, key=lambda k: k != "stale")):  # stale ones first
        node_id = f"n{i}"
        if kind == "stale":
            now[0] = 0.0
        elif now[0] == 0.0:
            now[0] = 10.0
        if kind == "presence":
            state.on_presence(PresenceRecord(node_id, online=True), sent_at=WALL + now[0])
            continue
        body: dict[str, Any] = {"id": node_id, "accuracy": 0.5}
        if kind != "legacy":
            body["detail"] = "metrics" if kind == "metrics" else "full"
        if kind in ("full", "legacy", "stale"):
            body.update(confusion=confusion, projection=[float(i)] * 32)
        assert state.on_telemetry(node_id, body, sent_at=WALL + now[0])
    now[0] = 10.0
    snap = state.snapshot()
    inside = {n["id"] for n in snap["nodes"] if n["in_global"]}
    left_out = {e["id"]: e["reason"] for e in snap["excluded_from_global"]}
    assert inside.isdisjoint(left_out) and inside | set(left_out) == {
        n["id"] for n in snap["nodes"]
    }
    assert len(snap["nodes"]) == len(kinds)
    expected = {"unevaluated": "not-evaluated", "metrics": "metrics-only",
                "presence": "no-telemetry", "stale": "stale"}  # fmt: skip
    assert sorted(left_out.values()) == sorted(expected[k] for k in kinds if k in expected)
    assert snap["global"]["included"] == len(inside)
    assert snap["global"]["samples"] == len(inside) * (2 * count + 3)
    # Prometheus says the same, node by node.
    family = next(m for m in monitor_metrics(snap) if m.name == "p2pfl_in_global")
    assert {s.labels["node"]: s.value for s in family.samples} == {
        n["id"]: float(n["id"] in inside) for n in snap["nodes"]
    }


def render(snap: dict[str, Any], width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, record=True, color_system=None)
    console.print(render_dashboard(snap, height=height))
    return console.export_text().rstrip("\n").split("\n")


def test_the_dashboard_and_the_report_show_who_is_left_out() -> None:
    state, _ = mixed_network()
    snap = state.snapshot()
    lines = render(snap, width=160)
    assert "not in global: fresh (not-evaluated), metrics (metrics-only), quiet" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()}
    assert rows["full"][3] == "yes" and rows["legacy"][3] == "yes"
    assert rows["metrics"][3] == "no" and rows["quiet"][3] == "no"
    small = render(snap)
    assert len(small) == 24 and max(map(len, small)) <= 80
    console = Console(width=120, record=True, color_system=None)
    console.print(render_report(snap))
    text = console.export_text()
    assert "not in global metrics" in text
    assert "metrics  metrics-only: telemetry detail metrics" in text
    assert "quiet  no-telemetry: known from presence only" in text
