"""`p2pfl doctor`: its checks against real sockets, brokers and nodes, and its verdicts.

Everything here stays on loopback: mDNS and the multicast self-test are bound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from p2pfl.config import StaticPeer
from p2pfl.discovery.mdns import Mdns
from p2pfl.doctor import (
    NOT_TRIED,
    OK,
    BrokerCheck,
    InterfaceCheck,
    NodeCheck,
    Report,
    check_broker,
    diagnose,
    interface_problems,
    multicast_self_test,
    node_problem,
    node_verdict,
    render,
)
from p2pfl.transport.base import LocalBroker
from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until

pytestmark = pytest.mark.timeout(120)

LOOPBACK = ["--interface", "127.0.0.1"]


def doctor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port_uri() -> str:
    return f"mqtt://127.0.0.1:{free_ports(1)[0]}"


@pytest.fixture
async def not_mqtt() -> AsyncIterator[str]:
    """A TCP server on loopback that hangs up on every client: TCP works, MQTT does not."""

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with server:
        yield f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"


# -- the multicast self-test ------------------------------------------------------------------


async def test_multicast_self_test_gets_its_datagram_back_on_loopback() -> None:
    assert await multicast_self_test("127.0.0.1") == OK


async def test_multicast_self_test_on_an_address_not_here_says_why() -> None:
    reason = await multicast_self_test("203.0.113.77")  # TEST-NET-3: on no interface here
    assert reason.startswith("cannot join a multicast group on 203.0.113.77")


# -- broker checks against real parts ---------------------------------------------------------


async def test_a_real_broker_passes_tcp_and_mqtt(broker: LocalBroker) -> None:
    assert await check_broker(broker.uri, within=3.0) == BrokerCheck(broker.uri, OK, OK)


async def test_a_closed_port_is_refused_and_mqtt_not_tried() -> None:
    uri = closed_port_uri()
    result = await check_broker(uri, within=1.0)
    assert "connection refused" in result.tcp
    assert result.mqtt == NOT_TRIED
    assert node_verdict([result]).startswith("broker unreachable at 127.0.0.1:")


async def test_a_tcp_server_that_is_no_broker_fails_the_mqtt_check(not_mqtt: str) -> None:
    result = await check_broker(not_mqtt, within=1.0)
    assert result.tcp == OK
    assert result.mqtt.startswith("MQTT CONNECT failed")
    assert node_verdict([result]).startswith("MQTT refused at 127.0.0.1:")


async def test_diagnose_finds_an_announced_node_and_checks_a_static_one(
    broker: LocalBroker,
) -> None:
    net = f"doc-{uuid.uuid4().hex[:6]}"
    ghost = StaticPeer.parse(f"ghost={closed_port_uri()}")
    async with Mdns(net, "real", broker_uri=broker.uri, interfaces=["127.0.0.1"]):
        for _attempt in range(3):  # mDNS is UDP: an answer can be lost on a loaded machine
            report = await diagnose(net, ["127.0.0.1"], 2.0, [ghost])
            if len(report.nodes) == 2:
                break
    nodes = {n.id: n for n in report.nodes}
    assert nodes["real"].verdict == OK and nodes["real"].source == "mdns"
    assert nodes["ghost"].verdict.startswith("broker unreachable")
    kinds = {p.kind for p in report.problems}
    assert kinds == {"only_loopback", "loopback_advertised", "node_refused"}
    assert report.advertised == ("127.0.0.1",)
    assert not report.ok


async def test_an_interface_address_not_on_this_machine_is_reported_and_nothing_sent() -> None:
    report = await diagnose("lab", ["203.0.113.77"], 1.0)
    kinds = [p.kind for p in report.problems]
    assert kinds[0] == "unknown_interface"
    assert not {"nothing_found", "mdns_failed"} & set(kinds)  # mDNS did not run
    assert not any(c.used for c in report.interfaces)


# -- verdicts, from constructed results -------------------------------------------------------

GOOD = BrokerCheck("mqtt://10.0.0.2:1883", OK, OK)
DROPPED = BrokerCheck(
    "mqtt://10.0.0.3:1883", "no answer from 10.0.0.3:1883 (a firewall dropping TCP port 1883?)"
)
NO_ROUTE = BrokerCheck("mqtt://172.17.0.2:1883", "no route to 172.17.0.2 (another network?)")
REFUSED = BrokerCheck("mqtt://10.0.0.4:1883", OK, "MQTT CONNECT refused: [code:5] not authorised")


def test_one_working_address_is_enough() -> None:
    assert node_verdict([NO_ROUTE, GOOD]) == OK


def test_loopback_advertised_wins_over_the_checks() -> None:
    loop = BrokerCheck("mqtt://127.0.0.1:1883", OK, OK)
    assert node_verdict([loop], loopback_advertised=True) == "loopback advertised"


def test_unreachable_names_every_address_and_its_reason() -> None:
    verdict = node_verdict([DROPPED, NO_ROUTE])
    assert verdict.startswith("broker unreachable at 10.0.0.3:1883 (no answer")
    assert "172.17.0.2:1883 (no route" in verdict


@pytest.mark.parametrize(
    ("brokers", "kind", "fix"),
    [
        ([DROPPED], "node_firewall", "open TCP port 1883"),
        ([NO_ROUTE], "node_elsewhere", "--advertise"),
        ([REFUSED], "node_mqtt", "username"),
        (
            [BrokerCheck("mqtt://10.0.0.5:1883", "10.0.0.5:1883 refused by a local firewall rule")],
            "node_local_firewall",
            "this machine's firewall",
        ),
    ],
)
def test_each_failure_gets_its_own_fix(brokers: list[BrokerCheck], kind: str, fix: str) -> None:
    node = NodeCheck("n1", "lab", "mdns", tuple(brokers), node_verdict(brokers))
    found = node_problem(node)
    assert (found.kind, found.what.startswith("node n1: ")) == (kind, True)
    assert fix in found.fix


def iface(name: str, ip: str, *, up: bool = True, multicast: bool = True,
          test: str | None = OK) -> InterfaceCheck:  # fmt: skip
    return InterfaceCheck(name, (ip,), up, multicast, name == "lo", True, test if up else None)


def test_interface_problems() -> None:
    lo, eth = iface("lo", "127.0.0.1"), iface("eth0", "10.0.0.2")
    assert interface_problems([lo, eth], []) == []
    assert [p.kind for p in interface_problems([lo], ["127.0.0.1"])] == ["only_loopback"]
    bad = [iface("eth0", "10.0.0.2", multicast=False, test="our own multicast did not come back"),
           iface("wlan0", "10.0.1.2", up=False)]  # fmt: skip
    kinds = [p.kind for p in interface_problems(bad, ["10.0.0.2", "10.0.1.2", "10.9.9.9"])]
    assert kinds == ["unknown_interface", "no_multicast", "self_test", "down"]


def test_render_shows_marks_and_what_to_try() -> None:
    node = NodeCheck("n1", "lab", "static", (DROPPED,), node_verdict([DROPPED]))
    report = Report((iface("eth0", "10.0.0.2"),), ("10.0.0.2",), "127.0.1.1", (node,),
                    (node_problem(node),))  # fmt: skip
    out = io.StringIO()
    render(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "broker unreachable at 10.0.0.3:1883" in text
    assert "try: open TCP port 1883 on that machine's firewall" in text
    assert "127.0.1.1, a loopback address; p2pfl does not use it (not a problem)" in text


# -- the command, as a user runs it -----------------------------------------------------------


def test_doctor_finds_a_running_node_and_its_broker_works(tmp_path: Path) -> None:
    net = f"doc-{uuid.uuid4().hex[:6]}"
    node = NodeProcess("d0", ["--id", "d0", "--network", net, "--state-dir", str(tmp_path / "d0"),
                              *LOOPBACK, "--listen", "127.0.0.1:0", "--model", "mlp",
                              "--local-epochs", "1"], tmp_path).start()  # fmt: skip
    try:
        wait_until(lambda: node.last_round() >= 1, 90, "the node's first round", node.tail)
        for _attempt in range(3):  # mDNS is UDP: a user would run it again
            out = doctor("--network", net, *LOOPBACK, "--timeout", "2", "--json")
            report = json.loads(out.stdout)
            if report["nodes"]:
                break
    finally:
        stop_all([node])
    assert len(report["nodes"]) == 1, report
    [found] = report["nodes"]
    assert (found["id"], found["network"], found["verdict"]) == ("d0", net, OK)
    assert [(b["tcp"], b["mqtt"]) for b in found["brokers"]] == [(OK, OK)]
    # mDNS and the broker work, but only on loopback: no other machine could reach this one
    assert out.returncode == 1
    assert any(p.startswith("loopback advertised") for p in report["problems"])
    assert report["advertised"] == ["127.0.0.1"]


def test_doctor_reports_an_unreachable_static_peer() -> None:
    ghost = closed_port_uri()
    net = f"nobody-{uuid.uuid4().hex[:6]}"
    out = doctor(*LOOPBACK, "--peer", f"ghost={ghost}", "--network", net, "--timeout", "1")
    assert out.returncode == 1, out.stderr
    assert "broker unreachable" in out.stdout
    assert f"no node of network {net} answered over mDNS" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peer", "nonsense"], "error: expected ID=mqtt://HOST:PORT, got 'nonsense'"),
        (["--peer", "x=http://h:1"], "error: broker: broker URI 'http://h:1' has scheme 'http'"),
        (["--interface", "eth0"], "error: --interface 'eth0' is not an IPv4 address"),
        (["--timeout", "0"], "error: --timeout must be > 0 seconds"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    out = doctor(*args)
    assert out.returncode == 2
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert out.stdout == ""


def test_help_teaches_with_examples() -> None:
    out = subprocess.run([sys.executable, "-m", "p2pfl", "doctor", "--help"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0
    for text in ("--network", "--peer", "--json", "Examples", "p2pfl doctor --network lab"):
        assert text in out.stdout
