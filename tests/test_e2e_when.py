"""End-to-end: `p2pfl run --when`, as a user would start it: three nodes on a ring, one of them
outside its training window. It says `paused: window`, sends no model, and the other two
finish their sync rounds without waiting for it."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until
from tests.test_e2e_run import FAST, logs

pytestmark = pytest.mark.timeout(240)


def window_excluding_now() -> str:
    start = datetime.now() + timedelta(hours=2)
    return f"window={start:%H:%M}-{start + timedelta(hours=1):%H:%M}"


def test_a_node_outside_its_window_pauses_and_its_peers_go_on(tmp_path: Path) -> None:
    rounds = 2
    common = [*FAST, "--schedule", "ring", "--mode", "sync", "--round-timeout", "60"]
    ids, ports = ["n0", "n1", "n2"], free_ports(3)
    everyone = []
    for i, node_id in enumerate(ids):
        peers = [arg for j, other in enumerate(ids) if j != i
                 for arg in ("--peer", f"{other}=mqtt://127.0.0.1:{ports[j]}")]  # fmt: skip
        own = ["--when", window_excluding_now()] if node_id == "n2" else ["--rounds", str(rounds)]
        args = [
            "--id", node_id, "--network", "e2e-when", "--state-dir", str(tmp_path / node_id),
            "--num-partitions", "3", "--partition-index", str(i), "--presence-ttl", "6",
            "--interface", "127.0.0.1", "--listen", f"127.0.0.1:{ports[i]}", *peers, *common,
            *own,
        ]  # fmt: skip
        everyone.append(NodeProcess(node_id, args, tmp_path).start())
    nodes, paused = everyone[:2], everyone[2:]
    try:
        wait_until(lambda: all(n.done() is not None for n in nodes), within=150,
                   what="the eligible nodes to finish", logs=lambda: logs(everyone))  # fmt: skip
        said = [r["msg"] for r in paused[0].records() if "paused" in str(r.get("msg"))]
        assert said and said[0].startswith("paused: window (next check in"), paused[0].tail()
    finally:
        stop_all(everyone)
    for node in nodes:
        done = node.done()
        assert done is not None and done["round"] == rounds, node.tail()
        # No round of theirs ended on its timeout waiting for the paused node.
        timeouts = [r for r in node.records() if "round timeout" in str(r.get("msg"))]
        assert not timeouts, node.tail()
    done = paused[0].done()
    assert done is not None, paused[0].tail()
    assert done["models_sent"] == 0 and done["round"] == 0, paused[0].tail()


def test_a_node_on_a_metered_interface_pauses_until_stopped(tmp_path: Path) -> None:
    """`--when unmetered --metered-interfaces IF`: the default route's interface is metered."""
    from p2pfl.discovery.addresses import default_route_interface

    interface = default_route_interface()
    if interface is None:
        pytest.skip("no IPv4 default route on this machine: nothing can be metered")
    (port,) = free_ports(1)
    node = NodeProcess("alone", [
        *FAST, "--id", "alone", "--network", "e2e-metered", "--state-dir", str(tmp_path / "s"),
        "--listen", f"127.0.0.1:{port}", "--interface", "127.0.0.1", "--discovery", "static",
        "--min-peers", "0", "--when", "unmetered", "--metered-interfaces", f"lo,{interface}",
    ], tmp_path).start()  # fmt: skip
    try:
        wait_until(lambda: any("paused: unmetered" in str(r.get("msg")) for r in node.records()),
                   within=90, what="the node to pause", logs=node.tail)  # fmt: skip
    finally:
        stop_all([node])
    done = node.done()
    assert done is not None and done["rounds"] == 0 and done["models_sent"] == 0, node.tail()
