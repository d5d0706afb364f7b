"""End-to-end: who may join, with `--trust allowlist` and `--trust ca`, as users set them up.

Real `p2pfl run` processes on loopback; keys, trust lists and certificates made with the
`p2pfl keys` commands. An intruder (a node whose key is not trusted, or without a
certificate) cannot connect to the members' embedded brokers, and on a shared Mosquitto cannot
get a model merged; the members train together all along.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.transport.base import LocalBroker
from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until

pytestmark = pytest.mark.timeout(300)

NET = "members"
FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--interface", "127.0.0.1",
        "--discovery", "static,presence", "--presence-ttl", "6", "--rounds", "400",
        "--period", "0.2", "--network", NET]  # fmt: skip


def keys(*args: str, home: Path) -> str:
    env = dict(os.environ, XDG_STATE_HOME=str(home / "state"))
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "keys", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def public_key(tmp_path: Path, node: str) -> Path:
    path = tmp_path / f"{node}.pub"
    path.write_text(keys("show", "--public", "--state-dir", str(tmp_path / node), home=tmp_path))
    return path


def start(tmp_path: Path, node: str, extra: list[str]) -> NodeProcess:
    args = [*FAST, "--id", node, "--state-dir", str(tmp_path / node), *extra]
    return NodeProcess(node, args, tmp_path).start()


def embedded(ports: dict[str, int], node: str) -> list[str]:
    peers = [a for other, port in ports.items() if other != node
             for a in ("--peer", f"{other}=mqtt://127.0.0.1:{port}")]  # fmt: skip
    return ["--listen", f"127.0.0.1:{ports[node]}", *peers]


def rejected(node: NodeProcess) -> dict[str, int]:
    rounds = node.rounds()
    return dict(rounds[-1].get("rejected_by_reason", {})) if rounds else {}


def merged_from_peer(node: NodeProcess) -> bool:
    return any(r["peers"] == 1 and r["merged"] >= 1 for r in node.rounds())


def members_train_and_shut_out(members: list[NodeProcess], intruder: NodeProcess,
                               reason: str) -> None:  # fmt: skip
    every = [*members, intruder]

    def logs() -> str:
        return "\n".join(n.tail() for n in every)

    for node in members:
        wait_until(lambda n=node: merged_from_peer(n), 120, f"{node.name} merging", logs)
    wait_until(lambda: all(rejected(n).get(reason, 0) >= 1 for n in members), 60,
               f"members refusing the intruder ({reason})", logs)  # fmt: skip
    wait_until(lambda: intruder.last_round() >= 3, 60, "the intruder running", logs)
    for node in members:
        assert all(r["peers"] <= 1 for r in node.rounds()), node.tail()  # never the intruder
    # It may see the members (they announce themselves to any broker they are told of), but
    # it never gets their models, nor they its.
    assert all(r["merged"] == 0 for r in intruder.rounds()), intruder.tail()
    assert intruder.rounds()[-1]["models_received"] == 0, intruder.tail()


# ---- allowlist ----------------------------------------------------------------------------


def allowlist(tmp_path: Path) -> list[str]:
    """n1 and n2 trust each other's keys; n3's key is trusted by nobody."""
    pubs = {n: public_key(tmp_path, n) for n in ("n1", "n2", "n3")}
    for node, other in (("n1", "n2"), ("n2", "n1")):
        keys("trust", str(pubs[other]), "--id", other, "--state-dir", str(tmp_path / node),
             home=tmp_path)  # fmt: skip
    return ["--trust", "allowlist"]


def test_allowlist_an_untrusted_node_cannot_connect_to_members_brokers(tmp_path: Path) -> None:
    policy = allowlist(tmp_path)
    ports = dict(zip(("n1", "n2", "n3"), free_ports(3), strict=True))
    members = [start(tmp_path, n, [*policy, *embedded(ports, n)]) for n in ("n1", "n2")]
    intruder = start(tmp_path, "n3", embedded(ports, "n3"))  # tofu: it would take anyone
    try:
        members_train_and_shut_out(members, intruder, "untrusted")
        failed = [r for r in intruder.records() if "not authori" in str(r.get("msg", "")).lower()
                  or "not authori" in str(r.get("error", "")).lower()]  # fmt: skip
        assert failed, intruder.tail()  # its logins were refused at CONNECT
    finally:
        stop_all([*members, intruder])


def test_allowlist_on_a_shared_mosquitto_an_untrusted_node_gets_nothing_merged(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    policy = allowlist(tmp_path)
    shared = ["--broker", mosquitto.uri]
    members = [start(tmp_path, n, [*policy, *shared]) for n in ("n1", "n2")]
    intruder = start(tmp_path, "n3", shared)
    try:
        members_train_and_shut_out(members, intruder, "untrusted")
    finally:
        stop_all([*members, intruder])


# ---- ca -----------------------------------------------------------------------------------


def test_ca_a_node_with_a_certificate_joins_one_without_cannot(tmp_path: Path) -> None:
    ca_file = tmp_path / "net.key"
    network_key = keys("ca", "init", "--network", NET, "--ca-file", str(ca_file),
                       home=tmp_path).strip()  # fmt: skip
    for node in ("n1", "n2"):
        cert = tmp_path / f"{node}.cert"
        keys("ca", "admit", str(public_key(tmp_path, node)), "--id", node, "--ca-file",
             str(ca_file), "--out", str(cert), home=tmp_path)  # fmt: skip
        keys("ca", "install", str(cert), "--state-dir", str(tmp_path / node), home=tmp_path)
    policy = ["--trust", "ca", "--ca-key", network_key]
    # without a certificate, a node under ca refuses to start, and says what to do
    lone = NodeProcess("n3-ca", [*FAST, "--id", "n3", "--state-dir", str(tmp_path / "n3"),
                                 *policy], tmp_path).start()  # fmt: skip
    assert lone.wait(60) == 2, lone.tail()
    assert "keys ca" in lone.log_path.read_text(), lone.tail()
    ports = dict(zip(("n1", "n2", "n3"), free_ports(3), strict=True))
    members = [start(tmp_path, n, [*policy, *embedded(ports, n)]) for n in ("n1", "n2")]
    intruder = start(tmp_path, "n3", embedded(ports, "n3"))
    try:
        members_train_and_shut_out(members, intruder, "untrusted")
    finally:
        stop_all([*members, intruder])
