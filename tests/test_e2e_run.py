"""End-to-end: `p2pfl run` as real processes on loopback, as a user would start them."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import psutil
import pytest

from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

# Small but real: MNIST-1D, a Dirichlet split, the MLP (fast on 2 cores).
FAST = ["--model", "mlp", "--local-epochs", "1", "--dataset", "mnist1d", "--seed", "0"]


def start_cluster(
    tmp_path: Path, n: int, extra: list[str], *, broker: str | None = None
) -> list[NodeProcess]:
    ports = free_ports(n)
    ids = [f"n{i}" for i in range(n)]
    # A network of its own: nodes of another run on this machine (mDNS on loopback) are not ours
    network = f"e2e-{uuid.uuid4().hex[:8]}"
    nodes = []
    for i, node_id in enumerate(ids):
        if broker is None:
            where = ["--listen", f"127.0.0.1:{ports[i]}"]
            peers = [
                arg
                for j, other in enumerate(ids)
                if j != i
                for arg in ("--peer", f"{other}=mqtt://127.0.0.1:{ports[j]}")
            ]
        else:
            where, peers = ["--broker", broker], []
        args = [
            "--id", node_id, "--network", network, "--state-dir", str(tmp_path / node_id),
            "--num-partitions", str(n), "--partition-index", str(i),
            "--presence-ttl", "6", "--interface", "127.0.0.1", *where, *peers, *extra,
        ]  # fmt: skip
        nodes.append(NodeProcess(node_id, args, tmp_path).start())
    return nodes


def logs(nodes: list[NodeProcess]) -> str:
    return "\n".join(n.tail() for n in nodes)


def finish(nodes: list[NodeProcess], timeout: float) -> None:
    try:
        for node in nodes:
            node.wait(timeout)
    except Exception:
        stop_all(nodes)
        raise AssertionError("nodes did not finish\n" + logs(nodes)) from None


@pytest.mark.parametrize(
    "schedule", [["--schedule", "ring"], ["--schedule", "partial-mesh", "--degree", "2"]]
)
def test_four_nodes_sync_rounds_on_embedded_brokers(tmp_path: Path, schedule: list[str]) -> None:
    rounds = 4
    nodes = start_cluster(
        tmp_path,
        4,
        [*FAST, *schedule, "--mode", "sync", "--rounds", str(rounds), "--round-timeout", "20",
         "--partition", "dirichlet:0.5"],
    )  # fmt: skip
    finish(nodes, 180)
    for node in nodes:
        assert node.proc is not None and node.proc.returncode == 0, logs(nodes)
        done = node.done()
        assert done is not None, node.tail()
        assert done["round"] == rounds
        # every round merged at least one neighbour's model: the gossip really happened (the
        # last may miss a neighbour that finished first; see the closing note of stop 10)
        assert all(r["merged"] >= 1 for r in node.rounds()[1:-1]), node.tail()
        assert done["models_received"] >= rounds - 1
        # Nothing is refused in a benign network. A record delivered twice (MQTT is at least
        # once: a peer's first presence record, retained and live, can reach a node twice at
        # start) is a duplicate, dropped uncounted, not a replay (p2pfl.trust.Duplicate).
        assert done["rejected"] == 0, (done.get("rejected_by_reason"), logs(nodes))


def test_random_walk_async_for_a_time_budget(tmp_path: Path) -> None:
    nodes = start_cluster(
        tmp_path, 3,
        # The budget starts once both peers are live: a node started late on a loaded machine
        # would otherwise find the others done.
        [*FAST, "--schedule", "random-walk", "--mode", "async", "--duration", "12",
         "--min-peers", "2"],
    )  # fmt: skip
    finish(nodes, 120)
    for node in nodes:
        done = node.done()
        assert done is not None, node.tail()
        assert done["round"] >= 2
        assert done["models_sent"] >= 2
        assert done["models_received"] >= 1


def test_kill_9_ring_reforms_and_restart_resumes_from_checkpoint(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, 4, [*FAST, "--schedule", "ring", "--mode", "async"])
    show = lambda: logs(nodes)  # noqa: E731
    try:
        wait_until(lambda: all(n.last_round() >= 3 for n in nodes), 120, "round 3", show)
        victim = nodes[2]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = victim.last_round()
        survivors = [n for i, n in enumerate(nodes) if i != 2]
        marks = {n.name: n.last_round() for n in survivors}
        # the survivors keep training, and the ring closes around the hole: 2 live peers each
        wait_until(
            lambda: all(
                n.last_round() >= marks[n.name] + 3 and n.rounds()[-1]["peers"] == 2
                for n in survivors
            ),
            90,
            "survivors to keep training with 2 peers",
            show,
        )
        # restarted with the same state dir, it resumes instead of starting over
        restarted = NodeProcess("n2-again", victim.args, tmp_path).start()
        nodes.append(restarted)
        wait_until(lambda: bool(restarted.rounds()), 90, "restarted node to train", show)
        resumed = [r for r in restarted.records() if "resumed from checkpoint" in r.get("msg", "")]
        assert resumed, restarted.tail()
        assert killed_at >= 3
        assert restarted.rounds()[0]["round"] >= killed_at + 1
        wait_until(lambda: restarted.rounds()[-1]["peers"] == 3, 60, "restarted node rejoins", show)
    finally:
        stop_all(nodes)
    for node in nodes:
        if node is not nodes[2]:
            assert node.proc is not None and node.proc.returncode == 0, node.tail()


def test_one_walker_token_circulates_the_ring(tmp_path: Path) -> None:
    nodes = start_cluster(
        tmp_path, 3, [*FAST, "--schedule", "ring", "--walkers", "1", "--rounds", "3"]
    )
    finish(nodes, 120)
    hops = sorted(r["round"] for n in nodes for r in n.rounds())
    # one token: every local step is one hop of the same model, so no two steps share a round
    assert hops == list(range(1, 10)), logs(nodes)
    for node in nodes:
        done = node.done()
        assert done is not None and done["rounds"] == 3, node.tail()


def test_local_mosquitto_home_brokers(tmp_path: Path) -> None:
    """`--broker local`: each node spawns a private Mosquitto as its home broker."""
    nodes = start_cluster(
        tmp_path, 2, [*FAST, "--broker", "local", "--mode", "sync", "--rounds", "3"]
    )
    brokers = [mosquitto_child(node) for node in nodes]
    finish(nodes, 120)
    for node in nodes:
        done = node.done()
        assert done is not None and done["round"] == 3, node.tail()
        assert done["models_received"] >= 2
    _, alive = psutil.wait_procs(brokers, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], (
        "a broker outlived its node"
    )


def test_local_mosquitto_dies_with_a_killed_node(tmp_path: Path) -> None:
    """A `kill -9` leaves no clean-up to the node: the kernel must take its broker down."""
    (node,) = start_cluster(tmp_path, 1, [*FAST, "--broker", "local", "--duration", "120"])
    broker = mosquitto_child(node)
    node.signal(signal.SIGKILL)
    node.wait(10)
    _, alive = psutil.wait_procs([broker], timeout=10)
    # Reparented to a PID 1 that may not reap: a zombie holds no port, it is gone for us.
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "broker outlived its node"


def mosquitto_child(node: NodeProcess) -> psutil.Process:
    """The private Mosquitto that `node` spawned, once it is up."""
    assert node.proc is not None
    parent = psutil.Process(node.proc.pid)

    def brokers() -> list[psutil.Process]:
        try:
            return [c for c in parent.children() if "mosquitto" in c.name()]
        except psutil.Error:
            return []

    wait_until(lambda: len(brokers()) == 1, 60, "a mosquitto child", node.tail)
    return brokers()[0]


def test_a_node_whose_peers_are_unreachable_says_so(tmp_path: Path) -> None:
    """Nothing shared must not look like success: within the --min-peers wait plus one round,
    a warning names the unreachable broker; at start, one line says where peers reach us."""
    closed, port = free_ports(2)
    node = NodeProcess(
        "lone",
        ["--id", "lone", "--network", "reach", "--state-dir", str(tmp_path / "lone"),
         "--listen", f"127.0.0.1:{port}", "--interface", "127.0.0.1",
         "--peer", f"ghost=mqtt://127.0.0.1:{closed}", "--min-peers", "1",
         "--round-timeout", "3", "--mode", "sync", "--rounds", "2", *FAST],
        tmp_path,
    ).start()  # fmt: skip
    try:
        node.wait(120)
    finally:
        stop_all([node])
    records = node.records()
    reach = next(r for r in records if r.get("event") == "reachable")
    assert reach["brokers"] == [f"mqtt://127.0.0.1:{port}"]
    warnings = [
        i
        for i, r in enumerate(records)
        if r.get("level") == "warning" and "starting with" in r.get("msg", "")
    ]
    rounds = [i for i, r in enumerate(records) if r.get("event") == "round"]
    assert warnings and rounds, node.tail()
    first = records[warnings[0]]["msg"]
    assert "starting with peers=0 wanted=1" in first
    assert f"peer ghost: broker unreachable at 127.0.0.1:{closed}" in first
    assert "connection refused" in first
    assert warnings[0] < rounds[0], "the warning comes before the first round ends"
