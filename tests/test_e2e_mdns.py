"""End-to-end: nodes with no peer list and no shared broker find each other over mDNS.

mDNS is bound to 127.0.0.1 only (`--interface 127.0.0.1`): tests never multicast on a real
network.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

LOOPBACK = ["--interface", "127.0.0.1", "--listen", "127.0.0.1:0"]
# A short pause between local steps: four nodes training flat out would starve the commands
# the test runs meanwhile (and a late node's start-up) of the CPU.
FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--presence-ttl", "6",
        "--period", "0.2"]  # fmt: skip


def peers_json(network: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "peers", "--network", network, *LOOPBACK[:2],
         "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def keys_show(state_dir: Path) -> subprocess.Popen[str]:
    """`p2pfl keys show --json` on a state dir, started (the caller reads its output)."""
    return subprocess.Popen(
        [sys.executable, "-m", "p2pfl", "keys", "show", "--json", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_nodes_discover_each_other_over_mdns_and_train_a_ring(tmp_path: Path) -> None:
    net = f"demo-{uuid.uuid4().hex[:6]}"
    other_net = f"other-{uuid.uuid4().hex[:6]}"

    def node(name: str, network: str = net) -> NodeProcess:
        args = ["--id", name, "--network", network, "--state-dir", str(tmp_path / name),
                "--schedule", "ring", "--num-partitions", "4", "--partition-index",
                str(int(name[-1]) % 4), *LOOPBACK, *FAST]  # fmt: skip
        return NodeProcess(name, args, tmp_path).start()

    nodes = [node(f"d{i}") for i in range(3)]
    stranger = node("x9", other_net)
    everyone = [*nodes, stranger]
    logs = lambda: "\n".join(n.tail() for n in everyone)  # noqa: E731
    try:
        # A node may train its first rounds alone, before mDNS and presence bring the others.
        wait_until(
            lambda: all(
                n.last_round() >= 10
                and n.rounds()[-1]["peers"] == 2  # both others, and not the stranger
                and n.rounds()[-1]["models_received"] > 0
                for n in nodes
            ),
            150,
            "round 10 with both peers",
            logs,
        )

        # mDNS is UDP: on a loaded machine an answer can be lost; a user would run it again
        for _attempt in range(3):
            listed = peers_json(net)
            if len(listed) == 3:
                break
        assert sorted(p["id"] for p in listed) == ["d0", "d1", "d2"], listed
        assert {p["role"] for p in listed} == {"trainer"}
        late = node("d3")  # it starts up (seconds) while the keys are checked
        everyone.append(late)
        # each announces the fingerprint of the key in its state dir
        shows = [keys_show(tmp_path / str(peer["id"])) for peer in listed]
        for peer, show in zip(listed, shows, strict=True):
            out, err = show.communicate(timeout=60)
            assert peer["pk"] == json.loads(out)["fingerprint"], err
        assert stranger.rounds()[-1]["peers"] == 0  # never saw, never contacted, the demo nodes

        wait_until(
            lambda: all(n.rounds() and n.rounds()[-1]["peers"] == 3 for n in [*nodes, late]),
            60,
            "the late node to join every view",
            logs,
        )
        late.signal(signal.SIGTERM)
        assert late.wait(30) == 0
        wait_until(
            lambda: all(n.rounds()[-1]["peers"] == 2 for n in nodes), 30, "ring to close", logs
        )
        received = {n.name: n.rounds()[-1]["models_received"] for n in nodes}
        wait_until(
            lambda: all(n.rounds()[-1]["models_received"] > received[n.name] for n in nodes),
            30,
            "the closed ring to keep gossiping",
            logs,
        )
    finally:
        stop_all(everyone)
