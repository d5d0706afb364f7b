"""End-to-end: two `p2pfl run` nodes whose embedded brokers listen with TLS (`--tls-cert`),
verifying each other with a private CA (`--ca`): they announce mqtts:// and gossip over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until
from tests.test_transport_mqtt import _make_certs

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not found"),
]

FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--interface", "127.0.0.1",
        "--discovery", "static,presence", "--rounds", "400", "--period", "0.2",
        "--network", "tls"]  # fmt: skip


def test_two_nodes_gossip_over_tls_listeners(tmp_path: Path) -> None:
    ca, cert, key = _make_certs(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--ca", str(ca)]
    ports = dict(zip(("n1", "n2"), free_ports(2), strict=True))
    nodes = []
    for node, port in ports.items():
        other = next(o for o in ports if o != node)
        args = [*FAST, *tls, "--id", node, "--state-dir", str(tmp_path / node),
                "--listen", f"127.0.0.1:{port}",
                "--peer", f"{other}=mqtts://127.0.0.1:{ports[other]}"]  # fmt: skip
        nodes.append(NodeProcess(node, args, tmp_path).start())

    def logs() -> str:
        return "\n".join(n.tail() for n in nodes)

    try:
        for node in nodes:
            wait_until(
                lambda n=node: any(r["merged"] >= 1 for r in n.rounds()), 120,
                f"{node.name} merging over mqtts", logs,
            )  # fmt: skip
            reach = next(r for r in node.records() if r.get("event") == "reachable")
            assert all(b.startswith("mqtts://") for b in reach["brokers"]), reach
    finally:
        stop_all(nodes)
