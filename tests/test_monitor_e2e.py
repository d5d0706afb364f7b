"""End-to-end: a monitor against real `p2pfl run` processes.

1. In process, on one shared Mosquitto: it sees all three trainers, its global accuracy is the
   one computed by hand from their confusion matrices, trainers never send it a model, and a
   SIGKILLed node turns stale, then disappears.
2. `p2pfl monitor --once --json` as a subprocess, nodes on their own embedded brokers, found
   over mDNS bound to 127.0.0.1 (tests never multicast on a real network).
3. `--telemetry-detail`: a node on `metrics` next to one on `full`; `p2pfl monitor --once`
   names it as left out of the global metrics, in its table and in its JSON export. (`off` is
   checked in process, in tests/test_telemetry_detail.py: one process fewer here.)
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.monitor.monitor import Monitor
from p2pfl.transport.base import LocalBroker
from tests.nodeproc import NodeProcess, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--telemetry-interval", "1",
        "--num-partitions", "3"]  # fmt: skip


def trainer(name: str, index: int, net: str, tmp: Path, *where: str) -> NodeProcess:
    args = ["--id", name, "--network", net, "--state-dir", str(tmp / name), "--partition-index",
            str(index), "--interface", "127.0.0.1", *FAST, *where]  # fmt: skip
    return NodeProcess(name, args, tmp).start()


def by_id(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in snap["nodes"]}


async def test_monitor_on_a_shared_broker_sees_every_node_and_a_crash(
    mosquitto: LocalBroker, tmp_path: Path, wait_until: Callable[..., Awaitable[None]]
) -> None:
    net = f"mon-{uuid.uuid4().hex[:6]}"
    where = ["--broker", mosquitto.uri, "--discovery", "presence,static"]
    nodes = [trainer(f"t{i}", i, net, tmp_path, *where) for i in range(3)]
    logs = lambda: "\n".join(n.tail() for n in nodes)  # noqa: E731
    # Telemetry comes every second; silence makes a node stale only after many of them, so a
    # loaded machine does not. The killed node turns stale at once: its will says it crashed.
    monitor = Monitor(
        net, brokers=[mosquitto.uri], use_mdns=False, stale_after=8.0, forget_after=8.0
    )
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(monitor.run_until(stop))
            try:

                def all_trained() -> bool:
                    seen = by_id(monitor.snapshot())
                    # Each has trained, gossiped both ways, and seen both other trainers.
                    return set(seen) == {"t0", "t1", "t2"} and all(
                        n["accuracy"] is not None
                        and n["models_received"] > 0
                        and n["bytes_out"] > 0
                        and n["peers"] >= 2
                        for n in seen.values()
                    )

                await wait_until(all_trained, within=150, interval=0.2)
                snap = monitor.snapshot()
                total = np.sum([n["confusion"] for n in snap["nodes"]], axis=0)
                assert snap["global"]["accuracy"] == pytest.approx(np.trace(total) / total.sum())
                assert snap["global"]["nodes"] == 3 and snap["global"]["divergence"] is not None
                for node in snap["nodes"]:
                    assert node["bytes_out"] > 0 and node["round"] >= 1 and not node["stale"]
                    assert node["peers"] == 2, logs()  # the monitor is not a trainer peer
                assert all(monitor.monitor_id not in edge for edge in snap["overlay"])
                assert snap["monitor"]["brokers"] == [mosquitto.uri]

                nodes[2].signal(signal.SIGKILL)
                nodes[2].wait(10)
                await wait_until(lambda: by_id(monitor.snapshot())["t2"]["stale"], within=10)
                await wait_until(lambda: "t2" not in by_id(monitor.snapshot()), within=15)
                survivors = by_id(monitor.snapshot())
                assert set(survivors) == {"t0", "t1"}
                assert not any(n["stale"] for n in survivors.values())
            finally:
                stop.set()
    finally:
        stop_all(nodes)
    # The trainers saw the monitor come and go, with its role.
    joined = [r for r in nodes[0].records() if r.get("msg", "").startswith("peer joined")]
    assert any(monitor.monitor_id in r["msg"] for r in joined), nodes[0].tail()


def test_monitor_once_json_finds_nodes_on_embedded_brokers_over_mdns(tmp_path: Path) -> None:
    net = f"mon-{uuid.uuid4().hex[:6]}"
    nodes = [trainer(f"e{i}", i, net, tmp_path, "--listen", "127.0.0.1:0") for i in range(3)]
    logs = lambda: "\n".join(n.tail() for n in nodes)  # noqa: E731
    try:
        wait_until(
            lambda: all(n.rounds() and n.rounds()[-1]["models_received"] > 0 for n in nodes),
            150,
            "every node to train and receive a model",
            logs,
        )
        out = subprocess.run(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", net, "--interface",
             "127.0.0.1", "--once", "--json", "--wait", "15"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
    finally:
        stop_all(nodes)
    seen = by_id(snap)
    assert sorted(seen) == ["e0", "e1", "e2"], (snap, logs())
    for report in seen.values():
        assert report["round"] >= 1 and report["accuracy"] is not None, report
        assert report["bytes_out"] > 0 and report["bytes_in"] > 0, report
    for key in ("accuracy", "macro_f1", "divergence"):
        assert isinstance(snap["global"][key], float), snap["global"]
    assert len(snap["monitor"]["brokers"]) == 3  # one client per node's embedded broker


def test_the_monitor_names_a_node_on_metrics_as_left_out_of_global_metrics(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    net = f"mon-{uuid.uuid4().hex[:6]}"
    where = ["--broker", mosquitto.uri, "--discovery", "presence,static"]
    nodes = [
        trainer(f"d{i}", i, net, tmp_path, *where, "--telemetry-detail", detail)
        for i, detail in enumerate(["full", "metrics"])
    ]
    logs = lambda: "\n".join(n.tail() for n in nodes)  # noqa: E731
    export = tmp_path / "snap.jsonl"
    try:
        # One evaluation each is all the monitor needs; gossip is not what this is about.
        wait_until(lambda: all(n.rounds() for n in nodes), 150, "every node to train", logs)
        out = subprocess.run(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", net, "--broker",
             mosquitto.uri, "--no-mdns", "--once", "--wait", "5", "--export", str(export),
             "--state-dir", str(tmp_path / "monitor")],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        stop_all(nodes)
    snap = json.loads(export.read_text().splitlines()[-1])
    seen = by_id(snap)
    assert sorted(seen) == ["d0", "d1"], (snap, logs())
    assert snap["excluded_from_global"] == [{"id": "d1", "reason": "metrics-only"}], snap
    assert (seen["d0"]["detail"], seen["d1"]["detail"]) == ("full", "metrics")
    assert (seen["d0"]["in_global"], seen["d1"]["in_global"]) == (True, False)
    assert seen["d1"]["accuracy"] is not None and seen["d1"]["confusion"] is None
    assert seen["d1"]["projection"] is None
    # The global accuracy is d0's alone.
    own = np.array(seen["d0"]["confusion"])
    assert snap["global"]["included"] == 1
    assert snap["global"]["accuracy"] == pytest.approx(np.trace(own) / own.sum())
    # The table says the same to a person.
    report = out.stdout.splitlines()
    start = report.index("not in global metrics") + 1
    assert report[start].startswith("d1  metrics-only: telemetry detail metrics"), out.stdout
    assert not report[start + 1].startswith("d0"), out.stdout
