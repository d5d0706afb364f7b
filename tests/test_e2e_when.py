"""End-to-end: `p2pfl run --when`, as a user would start it: three nodes on a ring, one of them
outside its training window. It says `paused: window`, sends no model, and the other two
train on without waiting for it, until `p2pfl resume` brings it back."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until
from tests.test_e2e_run import FAST, logs

pytestmark = pytest.mark.timeout(420)


def window_excluding_now() -> str:
    start = datetime.now() + timedelta(hours=2)
    return f"window={start:%H:%M}-{start + timedelta(hours=1):%H:%M}"


def p2pfl(*args: str) -> dict[str, Any]:
    """`p2pfl ARGS` as an operator runs it; its JSON output, if any."""
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else {}


def test_a_node_outside_its_window_pauses_its_peers_go_on_and_resume_brings_it_back(
    tmp_path: Path,
) -> None:
    """Issue 17's acceptance: n2 starts outside its window. It says `paused: window` in its log
    and in `p2pfl status`, sends no model, and n0 and n1 train on without waiting for it; then
    `p2pfl resume` brings it back, at the round its peers reached, merging their models."""
    rounds = 10_000  # more than the test lets them run: it stops them once n2 is back
    common = [*FAST, "--schedule", "ring", "--mode", "sync", "--round-timeout", "60",
              "--rounds", str(rounds)]  # fmt: skip
    ids, ports = ["n0", "n1", "n2"], free_ports(3)
    everyone = []
    for i, node_id in enumerate(ids):
        peers = [arg for j, other in enumerate(ids) if j != i
                 for arg in ("--peer", f"{other}=mqtt://127.0.0.1:{ports[j]}")]  # fmt: skip
        own = ["--when", window_excluding_now()] if node_id == "n2" else []
        args = [
            "--id", node_id, "--network", "e2e-when", "--state-dir", str(tmp_path / node_id),
            "--num-partitions", "3", "--partition-index", str(i), "--presence-ttl", "6",
            "--interface", "127.0.0.1", "--listen", f"127.0.0.1:{ports[i]}", *peers, *common,
            *own,
        ]  # fmt: skip
        everyone.append(NodeProcess(node_id, args, tmp_path).start())
    nodes, paused = everyone[:2], everyone[2]
    try:
        wait_until(lambda: all(n.last_round() >= 2 for n in nodes), within=150,
                   what="two rounds of n0 and n1", logs=lambda: logs(everyone))  # fmt: skip
        said = [r["msg"] for r in paused.records() if "paused" in str(r.get("msg"))]
        assert said and said[0].startswith("paused: window (next check in"), paused.tail()
        status = p2pfl("status", "--state-dir", str(tmp_path / "n2"), "--json")
        assert status["paused"] == "window" and status["models_sent"] == 0, status
        assert status["rounds"] == 0, status
        before = {n.name: len(n.records()) for n in nodes}
        p2pfl("resume", "--state-dir", str(tmp_path / "n2"))
        wait_until(lambda: len(paused.rounds()) >= 3, within=180,
                   what="n2 to train again", logs=lambda: logs(everyone))  # fmt: skip
        assert all(n.alive() for n in everyone), logs(everyone)
    finally:
        stop_all(everyone)
    for node in nodes:
        # While n2 was paused, no round of theirs ended on its timeout waiting for it.
        waited = [r for r in node.records()[: before[node.name]] if "round timeout" in str(r)]
        assert not waited, node.tail()
    trained = paused.rounds()
    # It caught up: its first round is past the ones it missed; it sent and merged models.
    assert trained[0]["round"] > 2, paused.tail()
    assert trained[-1]["models_sent"] > 0, paused.tail()
    assert any(r["merged"] > 0 for r in trained), paused.tail()


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
