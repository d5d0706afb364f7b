"""Nodes on separate emulated LAN hosts (network namespaces on one bridge), started with the
defaults a user would type: no --peer, --advertise, --interface or --listen.

Each host's /etc/hosts maps its hostname to 127.0.1.1 (the Debian default), so a node that
advertises ``gethostbyname(gethostname())`` is unreachable from the others: these tests check
that nodes find each other and advertise their bridge address 10.77.0.N instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lan.netns import Host, Lan, NsNodeProcess
from tests.nodeproc import stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

NETWORK = "lab"
IDS = ["m1", "m2", "m3"]
# Sync rounds of the MLP on MNIST-1D take ~0.1 s on 2 cores: start-up dominates.
ROUNDS = 6


def node_args(name: str, index: int, tmp: Path, rounds: int, extra: list[str]) -> list[str]:
    return [
        "--id", name, "--network", NETWORK, "--state-dir", str(tmp / f"n{index}"),
        "--mode", "sync", "--rounds", str(rounds), "--local-epochs", "1", "--model", "mlp",
        "--seed", "0", "--dataset", "mnist1d", "--num-partitions", "3",
        "--partition-index", str(index), "--telemetry-interval", "1", "--min-peers", "2",
        *extra,
    ]  # fmt: skip


def start_nodes(
    lan: Lan, tmp: Path, rounds: int, extra: list[str], n: int = 3
) -> list[NsNodeProcess]:
    return [
        lan.popen_node(lan.hosts[i], IDS[i], node_args(IDS[i], i, tmp, rounds, extra), tmp)
        for i in range(n)
    ]


def tails(nodes: list[NsNodeProcess]) -> str:
    return "\n".join(n.tail() for n in nodes)


def peers_json(lan: Lan, host: Host, want: set[str], attempts: int = 3) -> list[dict[str, Any]]:
    """`p2pfl peers --json` on `host`; mDNS is UDP, so ask again (as a user would) until every
    id of `want` is listed, at most `attempts` times."""
    listed: list[dict[str, Any]] = []
    for _ in range(attempts):
        out = lan.p2pfl(host, "peers", "--network", NETWORK, "--json", "--timeout", "3")
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        if want <= {p["id"] for p in listed}:
            break
    return listed


def assert_lan_addresses(lan: Lan, listed: list[dict[str, Any]], ids: list[str]) -> None:
    by_id = {p["id"]: p for p in listed}
    assert sorted(by_id) == sorted(ids), listed
    for i, node_id in enumerate(ids):
        ip = lan.hosts[i].ip
        peer = by_id[node_id]
        assert peer["address"] == ip, peer
        assert ip in peer["broker"], peer
        assert "127." not in peer["broker"], peer


MONITOR_ONCE = ("monitor", "--network", NETWORK, "--once", "--json", "--wait", "15")


def monitor_once(lan: Lan, host: Host) -> subprocess.Popen[str]:
    """`p2pfl monitor --once --json` started on `host` (it waits until every node it discovered
    has reported, at most 15 s)."""
    return lan.popen(
        host,
        [sys.executable, "-m", "p2pfl", *MONITOR_ONCE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def complete(snap: dict[str, Any]) -> bool:
    return sorted(n["id"] for n in snap["nodes"]) == IDS and snap["global"]["nodes"] == 3


def wait_started(node: NsNodeProcess) -> None:
    """Until the node says where it is reachable, or that it started (its broker is up and it
    is announced); fails if it exits."""

    def started() -> bool:
        msgs = [r.get("msg", "") for r in node.records()]
        return any("reachable at" in m or m.startswith("node started") for m in msgs)

    wait_until(lambda: started() or not node.alive(), 90, "the node to start", node.tail)
    assert node.alive(), node.tail()


def finish(nodes: list[NsNodeProcess], timeout: float) -> None:
    """Wait for every node to exit 0 after its rounds; stop them all on a timeout."""
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            rc = node.wait(max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"{node.name} exited {rc}\n{tails(nodes)}"
    except subprocess.TimeoutExpired:
        stop_all(nodes, grace=10)
        raise AssertionError(f"nodes did not finish in {timeout}s\n{tails(nodes)}") from None


@pytest.mark.parametrize("schedule", ["ring", "random-walk", "partial-mesh"])
def test_ring_across_namespaces(lan: Lan, tmp_path: Path, schedule: str) -> None:
    extra = ["--schedule", schedule] + (["--degree", "2"] if schedule == "partial-mesh" else [])
    # `peers` and `monitor` look at the network while it trains: it runs until stopped, so
    # however fast the machine trains they see it alive.
    nodes = start_nodes(lan, tmp_path, 0, extra)
    logs = lambda: tails(nodes)  # noqa: E731
    observer = lan.hosts[3]
    try:
        wait_until(lambda: all(n.rounds() for n in nodes), 90, "every node's first round", logs)
        monitor = monitor_once(lan, observer)  # runs alongside `peers`
        listed = peers_json(lan, observer, set(IDS))
        out, err = monitor.communicate(timeout=90)
        assert monitor.returncode == 0, err
        snap = json.loads(out)
        if not complete(snap):  # an mDNS answer lost on a loaded machine: look again
            again = lan.p2pfl(observer, *MONITOR_ONCE, timeout=90)
            assert again.returncode == 0, again.stderr
            snap = json.loads(again.stdout)
        wait_until(
            lambda: all(n.last_round() > ROUNDS for n in nodes), 90, f"{ROUNDS} rounds", logs
        )
        assert all(n.alive() for n in nodes), logs()
        stop_all(nodes, grace=30)
        codes = [n.wait(0) for n in nodes]
        assert codes == [0, 0, 0], f"exit codes {codes}\n{logs()}"
    finally:
        stop_all(nodes, grace=10)

    for node in nodes:
        numbers = [r["round"] for r in node.rounds()]
        # async: a node that fell behind may catch up to a peer's round, never go back
        assert numbers[0] == 1 and numbers == sorted(set(numbers)), node.tail()
        # the round under way when SIGTERM came may miss a neighbour that stopped first
        rounds_seen = node.rounds()[:-1]
        assert max(r["peers"] for r in rounds_seen) == 2, node.tail()
        merged = [r["merged"] for r in rounds_seen]
        if schedule == "random-walk":
            # A walker picks one random neighbour per round: a node may get nothing in a round.
            assert sum(m >= 1 for m in merged) * 2 >= len(merged), (node.name, merged)
        else:
            assert all(m >= 1 for m in merged), (node.name, merged)
    assert sum(r["merged"] for n in nodes for r in n.rounds()) > 0

    assert_lan_addresses(lan, listed, IDS)
    seen = {n["id"]: n for n in snap["nodes"]}
    assert sorted(seen) == IDS, snap
    for report in seen.values():
        assert report["round"] is not None and report["round"] >= 1, report
    glob = snap["global"]
    assert glob["nodes"] == 3 and glob["stale"] == 0, glob
    assert isinstance(glob["accuracy"], float), glob
    brokers = snap["monitor"]["brokers"]
    assert len(brokers) == 3, brokers
    for host in lan.hosts[:3]:
        assert any(host.ip in str(b) for b in brokers), (host.ip, brokers)


def test_hostname_maps_to_loopback_but_advertises_bridge_address(lan: Lan, tmp_path: Path) -> None:
    host, observer = lan.hosts[0], lan.hosts[3]
    probe = lan.run(
        host,
        [sys.executable, "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"],
    )
    assert probe.stdout.strip() == "127.0.1.1", probe  # the trap is really set

    node = lan.popen_node(host, "m1", node_args("m1", 0, tmp_path, 0, []), tmp_path)
    try:
        wait_started(node)
        listed = peers_json(lan, observer, {"m1"})
        assert_lan_addresses(lan, listed, ["m1"])
    finally:
        stop_all([node], grace=10)
    reachable = [r["msg"] for r in node.records() if "reachable at" in r.get("msg", "")]
    assert reachable, node.tail()
    assert host.ip in reachable[0], reachable
    assert "127." not in reachable[0], reachable


def broker_port(listed: list[dict[str, Any]], node_id: str) -> int:
    broker = next(p["broker"] for p in listed if p["id"] == node_id)
    match = re.search(r":(\d+)/?$", broker)
    assert match, broker
    return int(match.group(1))


def test_doctor_reports_blocked_broker(lan: Lan, tmp_path: Path) -> None:
    host, observer = lan.hosts[0], lan.hosts[3]
    # --rounds 0: until stopped. Alone, it waits (idle) up to --round-timeout for its peers.
    node = lan.popen_node(host, "m1", node_args("m1", 0, tmp_path, 0, []), tmp_path)
    try:
        wait_started(node)
        listed = peers_json(lan, observer, {"m1"})
        assert [p["id"] for p in listed] == ["m1"], listed
        port = broker_port(listed, "m1")

        healthy = lan.p2pfl(observer, "doctor", "--network", NETWORK, timeout=90)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        lan.block_tcp_port(host, port)
        blocked = lan.p2pfl(observer, "doctor", "--network", NETWORK, timeout=90)
        text = blocked.stdout + blocked.stderr
        assert blocked.returncode != 0, text
        assert "broker unreachable" in text.lower(), text
        assert node.alive(), node.tail()
    finally:
        stop_all([node], grace=10)


def test_a_multi_homed_peer_is_reached_at_the_address_that_works(lan: Lan, tmp_path: Path) -> None:
    """m1 has a second interface (10.78.0.1) the others have no route to, and announces it
    first: they must skip it and keep 10.77.0.1, the first of its addresses that connects."""
    multi = lan.hosts[0]
    # A veth pair that leads nowhere: the kernel here may lack the dummy driver.
    for cmd in (
        ["ip", "link", "add", "name", "dum0", "type", "veth", "peer", "name", "dum1"],
        ["ip", "addr", "add", "10.78.0.1/24", "dev", "dum0"],
        ["ip", "link", "set", "dum1", "up"],
        ["ip", "link", "set", "dum0", "up"],
    ):
        subprocess.run(["ip", "netns", "exec", multi.ns, *cmd], check=True)
    extra = ["--schedule", "ring"]
    nodes = [
        lan.popen_node(
            lan.hosts[i],
            IDS[i],
            node_args(IDS[i], i, tmp_path, 4, extra + (
                ["--advertise", f"10.78.0.1,{multi.ip}"] if i == 0 else [])),
            tmp_path,
        )
        for i in range(3)
    ]  # fmt: skip
    try:
        finish(nodes, 150)
    finally:
        stop_all(nodes, grace=10)
    reach = next(r for r in nodes[0].records() if r.get("event") == "reachable")
    assert reach["brokers"][0].startswith("mqtt://10.78.0.1:"), reach
    for node in nodes[1:]:
        joined = [r["msg"] for r in node.records() if "peer joined id=m1" in r.get("msg", "")]
        assert joined, node.tail()
        assert all(f"broker=mqtt://{multi.ip}:" in m for m in joined), joined
        skipped = [r["msg"] for r in node.records() if "peer reached id=m1" in r.get("msg", "")]
        assert skipped and "not_at=mqtt://10.78.0.1:" in skipped[0], node.tail()
        assert all(r["merged"] >= 1 for r in node.rounds()), node.tail()
