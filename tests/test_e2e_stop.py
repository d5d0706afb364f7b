"""Stop means stop: `p2pfl run` exits promptly on SIGTERM whatever its broker does.

A machine shutdown or `docker compose down` signals the nodes and their broker at once; a
service manager waits its stop timeout and then SIGKILLs, losing the final checkpoint. Each
scenario is repeated because the hang it guards against was a race (1 run in 4 before the fix).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto
from tests.nodeproc import NodeProcess, free_ports, run_dir, stop_all, wait_until

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--interface", "127.0.0.1"]
REPEATS = 6  # the default suite; `pytest -m slow` repeats it 20 times
EXIT_WITHIN = 10.0


def two_nodes(tmp: Path, name: str, broker: str) -> list[NodeProcess]:
    return [
        NodeProcess(
            f"{name}-s{j}",
            ["--id", f"s{j}", "--network", name, "--broker", broker, "--schedule", "ring",
             "--rounds", "0", "--discovery", "static,presence", "--num-partitions", "2",
             "--partition-index", str(j), "--state-dir", str(tmp / name / f"s{j}"), *FAST],
            tmp,
        ).start()
        for j in range(2)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "repeats", [REPEATS, pytest.param(20, marks=[pytest.mark.slow, pytest.mark.timeout(1200)])]
)
def test_nodes_exit_when_their_broker_dies_with_them(tmp_path: Path, repeats: int) -> None:
    """Two nodes and their Mosquitto SIGTERMed together (even runs) or the broker 0.1 s first
    (odd runs): every node exits 0 within 10 s, and its last checkpoint is on disk."""
    for run in range(repeats):
        kill_together(tmp_path, run, broker_first=run % 2 == 1)


def kill_together(tmp: Path, run: int, *, broker_first: bool) -> None:
    name = f"stop{run}"
    broker = MosquittoBroker("127.0.0.1", 0)
    broker.start()
    nodes = two_nodes(tmp, name, broker.uri)

    def tails() -> str:
        return f"run {run}\n" + "\n".join(n.tail() for n in nodes)

    try:
        wait_until(lambda: all(n.rounds() for n in nodes), 120, "a first round", tails)
        pid = broker.pid
        assert pid is not None
        if broker_first:
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.1)  # the case under test: the broker goes 0.1 s before its nodes
        for node in nodes:
            node.signal(signal.SIGTERM)
        if not broker_first:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + EXIT_WITHIN
        for node in nodes:
            try:
                code = node.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{node.name} still running\n{tails()}") from None
            assert code == 0, f"{node.name} exited {code}\n{tails()}"
        for j, node in enumerate(nodes):
            checkpoints = list((run_dir(tmp / name / f"s{j}") / "checkpoints").glob("ckpt-*.npz"))
            assert checkpoints, f"{node.name} left no checkpoint\n{tails()}"
            assert any("node stopped" in r.get("msg", "") for r in node.records()), tails()
    finally:
        stop_all(nodes, grace=5)
        broker.close()


def test_a_second_sigterm_ends_a_slow_shutdown_at_once(tmp_path: Path) -> None:
    """The first SIGTERM waits for the local step to end (here: a long one); the second one
    ends the process now."""
    node = NodeProcess(
        "slow",
        ["--id", "slow", "--network", "stop2", "--listen", "127.0.0.1:0", "--rounds", "0",
         "--model", "cnn1d", "--local-epochs", "500", "--state-dir", str(tmp_path / "slow"),
         "--interface", "127.0.0.1"],
        tmp_path,
    ).start()  # fmt: skip
    try:
        wait_until(
            lambda: any(r.get("msg", "").startswith("node started") for r in node.records()),
            60,
            "the node to start training",
            node.tail,
        )
        node.signal(signal.SIGTERM)
        wait_until(
            lambda: any("send it again" in r.get("msg", "") for r in node.records()),
            10,
            "the first SIGTERM to be taken",
            node.tail,
        )
        assert node.alive(), "the local step is long: the first SIGTERM waits for it"
        node.signal(signal.SIGTERM)
        assert node.wait(5) == 128 + signal.SIGTERM, node.tail()
        assert any("second SIGTERM: exiting now" in r.get("msg", "") for r in node.records())
    finally:
        stop_all([node], grace=5)


def test_node_and_monitor_exit_when_a_peers_broker_dies(tmp_path: Path) -> None:
    """Embedded home brokers: a peer is SIGKILLed (its broker dies with it) and the node and a
    `p2pfl monitor` watching both are SIGTERMed at that moment: both exit 0 within 10 s. Three
    networks side by side, each losing its peer at once: the race needs repeats, not one after
    the other (each network waits out its own start-up)."""
    scenes: list[PeerLoss] = []
    try:
        for run in range(3):
            scenes.append(PeerLoss(tmp_path, f"stope{run}"))
        for scene in scenes:
            scene.wait_ready()
        for scene in scenes:
            scene.lose_the_peer()
        deadline = time.monotonic() + EXIT_WITHIN
        for scene in scenes:
            scene.assert_exited(deadline)
    finally:
        for scene in scenes:
            scene.close()


def watched(export: Path) -> list[str]:
    """The brokers a monitor listened on at its last export (none before the first)."""
    lines = export.read_text().splitlines() if export.exists() else []
    try:
        return list(json.loads(lines[-1])["monitor"]["brokers"]) if lines else []
    except ValueError:  # the line being written
        return []


class PeerLoss:
    """Two nodes on their embedded brokers, peers of each other, and a monitor on both."""

    def __init__(self, tmp: Path, net: str) -> None:
        ports = free_ports(2)
        peers = [f"e{j}=mqtt://127.0.0.1:{port}" for j, port in enumerate(ports)]
        self.nodes = [
            NodeProcess(
                f"{net}-{j}",
                ["--id", f"e{j}", "--network", net, "--listen", f"127.0.0.1:{ports[j]}",
                 "--peer", peers[1 - j], "--rounds", "0", "--num-partitions", "2",
                 "--partition-index", str(j), "--state-dir", str(tmp / net / f"e{j}"), *FAST,
                 "--period", "0.2"],  # six nodes training flat out would starve the start-ups
                tmp,
            ).start()
            for j in range(2)
        ]  # fmt: skip
        self.export = tmp / f"{net}.jsonl"
        self.monitor = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", net, "--no-mdns",
             "--peer", peers[0], "--peer", peers[1], "--export", str(self.export)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def tails(self) -> str:
        return "\n".join(n.tail() for n in self.nodes)

    def wait_ready(self) -> None:
        wait_until(lambda: all(n.rounds() for n in self.nodes), 120, "a first round", self.tails)
        wait_until(
            lambda: len(watched(self.export)) == 2, 30, "the monitor on both brokers", self.tails
        )

    def lose_the_peer(self) -> None:
        survivor, victim = self.nodes
        victim.signal(signal.SIGKILL)
        survivor.signal(signal.SIGTERM)
        self.monitor.send_signal(signal.SIGTERM)

    def assert_exited(self, deadline: float) -> None:
        survivor = self.nodes[0]
        assert survivor.wait(max(0.0, deadline - time.monotonic())) == 0, self.tails()
        assert self.monitor.wait(max(0.0, deadline - time.monotonic())) == 0

    def close(self) -> None:
        stop_all(self.nodes, grace=5)
        if self.monitor.poll() is None:
            self.monitor.kill()
            self.monitor.wait(5)
