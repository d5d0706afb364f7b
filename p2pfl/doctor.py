"""`p2pfl doctor`: why does this machine not see the others? Check, report, suggest a fix.

Small async checks return frozen results: the interfaces mDNS would use (with a multicast
self-test that never leaves this host), the addresses a node here would advertise, and a TCP and
an MQTT CONNECT check of every broker address of each node found over mDNS or given with
``--peer``. :func:`diagnose` runs them and collects the problems, each with what to try.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import aiomqtt
from rich.console import Console
from rich.table import Table

from p2pfl.config import StaticPeer
from p2pfl.discovery.addresses import Interface, advertised_hosts, interfaces, is_loopback
from p2pfl.discovery.browse import browse
from p2pfl.discovery.dial import probe
from p2pfl.discovery.peerview import PeerInfo
from p2pfl.transport.address import parse_broker_uri

OK = "ok"
NOT_TRIED = "not tried"
# Administratively scoped (RFC 2365), not mDNS's 224.0.0.251: the self-test must not reach any
# real responder. Sent with TTL 0, so the datagram never leaves this host.
TEST_GROUP = "239.255.77.77"

# kind -> (what is wrong, what to try); filled in with the facts of each case.
ADVICE = {
    "unknown_interface": ("--interface {ip}: no interface of this machine has this address",
                          "use one of {known}"),
    "down": ("interface {name} is down", "ip link set {name} up, or choose another --interface"),
    "no_multicast": ("interface {name} lacks the MULTICAST flag",
                     "ip link set {name} multicast on, or use --peer"),
    "self_test": ("multicast self-test failed on {name}: {reason}",
                  "allow UDP multicast (224.0.0.0/4) in this machine's firewall, or use --peer"),
    "only_loopback": ("only loopback: other machines cannot reach this one",
                      "connect to the LAN, or give --interface a LAN address"),
    "loopback_advertised": ("loopback advertised: a node here would tell peers to dial "
                            "{hosts}, i.e. themselves",
                            "p2pfl run --advertise <this machine's LAN address>"),
    "mdns_failed": ("cannot use mDNS here: {reason}", "use --peer"),
    "nothing_found": ("{who} answered over mDNS within {within:g} s: is UDP port 5353 "
                      "(multicast) allowed?{same}", "allow UDP 5353 multicast, or use --peer"),
    "node_loopback": ("node {id}: loopback advertised: it tells peers to dial themselves",
                      "run that node with --interface or --advertise set to its LAN address"),
    "node_mqtt": ("node {id}: {verdict}", "check that it is an MQTT broker and whether it "
                  "needs a username, password or TLS"),
    "node_firewall": ("node {id}: {verdict}", "open TCP port {port} on that machine's firewall"),
    "node_local_firewall": ("node {id}: {verdict}",
                            "allow outgoing TCP to port {port} in this machine's firewall"),
    "node_refused": ("node {id}: {verdict}",
                     "check that the node runs and listens on that port (p2pfl run --listen)"),
    "node_elsewhere": ("node {id}: {verdict}", "put both machines on one network, or have the "
                       "node advertise an address reachable from here (--advertise)"),
}  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """Something that keeps nodes from seeing each other (``kind`` a key of ADVICE)."""

    kind: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}; try: {self.fix}"


def problem(kind: str, **facts: object) -> Problem:
    """The problem ``kind`` told with ``facts``."""
    what, fix = ADVICE[kind]
    return Problem(kind, what.format(**facts), fix.format(**facts))


@dataclass(frozen=True)
class InterfaceCheck:
    """One interface, whether mDNS would use it, and its self-test (None: not run)."""

    name: str
    addresses: tuple[str, ...]
    up: bool
    multicast: bool
    loopback: bool
    used: bool
    self_test: str | None


@dataclass(frozen=True)
class BrokerCheck:
    """One broker address of a node: ``tcp`` and ``mqtt`` are ``"ok"`` or why not."""

    uri: str
    tcp: str = NOT_TRIED
    """``"ok"``, or why no TCP connection opened."""
    mqtt: str = NOT_TRIED

    @property
    def ok(self) -> bool:
        return self.tcp == OK and self.mqtt == OK


@dataclass(frozen=True)
class NodeCheck:
    """A node found over mDNS (``source="mdns"``) or given with ``--peer`` (``"static"``)."""

    id: str
    network: str
    source: str
    brokers: tuple[BrokerCheck, ...]
    verdict: str


@dataclass(frozen=True)
class Report:
    """Everything `p2pfl doctor` found; ``ok`` when it found no problem."""

    interfaces: tuple[InterfaceCheck, ...]
    advertised: tuple[str, ...]
    hostname_ip: str
    nodes: tuple[NodeCheck, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _test_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((TEST_GROUP, 0))  # a random free port: concurrent self-tests do not mix
        group, local = socket.inet_aton(TEST_GROUP), socket.inet_aton(address)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + local)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, local)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    except OSError:
        sock.close()
        raise
    return sock


async def multicast_self_test(address: str, within: float = 0.5) -> str:
    """``"ok"`` when a datagram we multicast on the interface of ``address`` comes back to us.

    Joining the test group sends an IGMP report on that interface, as any mDNS responder does;
    the datagram itself has TTL 0 and stays on this host.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = _test_socket(address)
    except OSError as exc:
        return f"cannot join a multicast group on {address}: {exc.strerror or exc}"
    with sock:
        token = secrets.token_bytes(16)
        try:
            await loop.sock_sendto(sock, token, (TEST_GROUP, sock.getsockname()[1]))
            async with asyncio.timeout(within):
                while await loop.sock_recv(sock, 64) != token:
                    pass
        except TimeoutError:
            return f"our own multicast did not come back within {within:g}s (filtered here?)"
        except OSError as exc:
            return f"cannot send multicast on {address}: {exc.strerror or exc}"
    return OK


async def check_interface(iface: Interface, chosen: Sequence[str]) -> InterfaceCheck:
    """Whether mDNS would use ``iface`` (up with IPv4, or named by ``chosen``), and its test."""
    mine = [a for a in iface.addresses if a in chosen] if chosen else list(iface.addresses)
    used = bool(mine) and (bool(chosen) or iface.up)
    result = None
    if used and iface.up:
        results = [await multicast_self_test(a) for a in mine]
        result = next((r for r in results if r != OK), OK)
    return InterfaceCheck(
        iface.name, iface.addresses, iface.up, iface.multicast, iface.loopback, used, result
    )


def interface_problems(checks: Sequence[InterfaceCheck], chosen: Sequence[str]) -> list[Problem]:
    """What is wrong with the interfaces mDNS would use."""
    known = sorted({a for c in checks for a in c.addresses})
    found = [problem("unknown_interface", ip=ip, known=", ".join(known) or "none")
             for ip in chosen if ip not in known]  # fmt: skip
    used = [c for c in checks if c.used]
    for c in used:
        if not c.up or not c.multicast:
            found.append(problem("down" if not c.up else "no_multicast", name=c.name))
        if c.self_test not in (None, OK):
            found.append(problem("self_test", name=c.name, reason=c.self_test))
    if used and all(c.loopback for c in used):
        found.append(problem("only_loopback"))
    return found


async def check_broker(uri: str, within: float) -> BrokerCheck:
    """TCP, then (if TCP works) an MQTT CONNECT and DISCONNECT to the broker at ``uri``."""
    reason = await probe(uri, within=within)
    if reason is not None:
        return BrokerCheck(uri, tcp=reason)
    address = parse_broker_uri(uri)
    client = aiomqtt.Client(
        address.host,
        address.port,
        timeout=within,
        identifier=f"p2pfl-doctor-{secrets.token_hex(4)}",
        tls_params=aiomqtt.TLSParameters() if address.tls else None,
    )
    try:
        async with asyncio.timeout(within + 1.0), client:
            pass
    except aiomqtt.MqttCodeError as exc:
        if exc.rc in (4, 5, 134, 135):  # bad user name or password, not authorised
            return BrokerCheck(uri, tcp=OK, mqtt=OK)  # it answers: it wants a node's key login
        return BrokerCheck(uri, tcp=OK, mqtt=f"MQTT CONNECT refused: {exc}")
    except (aiomqtt.MqttError, OSError) as exc:
        return BrokerCheck(uri, tcp=OK, mqtt=f"MQTT CONNECT failed: {exc or type(exc).__name__}")
    except TimeoutError:
        return BrokerCheck(uri, tcp=OK, mqtt=f"MQTT CONNECT failed: no answer in {within:g}s")
    return BrokerCheck(uri, tcp=OK, mqtt=OK)


def _where(uri: str) -> str:
    address = parse_broker_uri(uri)
    return f"{address.host}:{address.port}"


def node_verdict(brokers: Sequence[BrokerCheck], loopback_advertised: bool = False) -> str:
    """``ok``, ``loopback advertised``, ``MQTT refused at ...`` or ``broker unreachable at ...``.

    One working address is enough: a peer dials the first of them that connects.
    """
    if loopback_advertised:
        return "loopback advertised"
    if any(b.ok for b in brokers):
        return OK
    if not brokers:
        return "broker unreachable: it announced no broker address"
    refused = [b for b in brokers if b.tcp == OK]
    if refused:
        return f"MQTT refused at {_where(refused[0].uri)} ({refused[0].mqtt})"
    return "broker unreachable at " + "; ".join(f"{_where(b.uri)} ({b.tcp})" for b in brokers)


def node_problem(node: NodeCheck) -> Problem:
    """The problem of a node whose verdict is not ``ok``, with the fix its reason suggests."""
    facts = {"id": node.id, "verdict": node.verdict}
    if node.verdict == "loopback advertised":
        return problem("node_loopback", **facts)
    if node.verdict.startswith("MQTT"):
        return problem("node_mqtt", **facts)
    port = parse_broker_uri(node.brokers[0].uri).port if node.brokers else 0
    reasons = " ".join(b.tcp for b in node.brokers)  # dial.explain's words
    kinds = (("local firewall", "node_local_firewall"), ("firewall", "node_firewall"),
             ("refused", "node_refused"))  # fmt: skip
    kind = next((k for word, k in kinds if word in reasons), "node_elsewhere")
    return problem(kind, port=port, **facts)


async def check_node(peer: PeerInfo, within: float, loopback_advertised: bool = False) -> NodeCheck:
    """Check every broker address of one node, in parallel."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(check_broker(uri, within)) for uri in peer.candidates]
    brokers = tuple(t.result() for t in tasks)
    verdict = node_verdict(brokers, loopback_advertised)
    return NodeCheck(peer.id, str(peer.meta.get("net", "")), peer.source, brokers, verdict)


def advertises_loopback(peer: PeerInfo) -> bool:
    """Whether every broker address ``peer`` announced is a loopback one."""
    return all(is_loopback(parse_broker_uri(uri).host) for uri in peer.candidates)


async def check_mdns_nodes(
    network: str | None, on: Sequence[str], within: float
) -> list[NodeCheck]:
    """Browse (on the ``on`` addresses, or everywhere) and check every node found."""
    found = await browse(network, interfaces=on, duration=within)
    # A loopback broker is only wrong for a node heard from beyond this host.
    wide = any(not is_loopback(a) for a in on) if on else True
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(check_node(p, within, wide and advertises_loopback(p)))
                 for p in found]  # fmt: skip
    return [t.result() for t in tasks]


def _hostname_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        return f"does not resolve ({exc})"


def _static(peer: StaticPeer) -> PeerInfo:
    return PeerInfo(peer.id, "trainer", peer.broker, "static")  # its network is unknown


async def diagnose(
    network: str | None, chosen: Sequence[str], within: float, peers: Sequence[StaticPeer] = ()
) -> Report:
    """Run every check (about ``within`` seconds, plus the broker checks), collect problems."""
    ifaces = interfaces()
    valid = [ip for ip in chosen if any(ip in i.addresses for i in ifaces)]
    problems: list[Problem] = []
    found: list[NodeCheck] | None = None  # None: mDNS did not run
    async with asyncio.TaskGroup() as tg:
        checks = [tg.create_task(check_interface(i, chosen)) for i in ifaces]
        hostname = tg.create_task(asyncio.to_thread(_hostname_ip))
        static = [tg.create_task(check_node(_static(p), within)) for p in peers]
        if valid or not chosen:
            try:
                found = await check_mdns_nodes(network, valid, within)
            except OSError as exc:
                problems.append(problem("mdns_failed", reason=exc))
    iface_checks = tuple(t.result() for t in checks)
    problems[:0] = interface_problems(iface_checks, chosen)
    advertised = tuple(advertised_hosts("0.0.0.0", (), chosen=valid))
    if all(is_loopback(h) for h in advertised):
        problems.append(problem("loopback_advertised", hosts=", ".join(advertised)))
    if found == []:
        who = f"no node of network {network}" if network else "no p2pfl node"
        same = " are the others on the same network name?" if network else ""
        problems.append(problem("nothing_found", who=who, within=within, same=same))
    nodes = (*(found or ()), *(t.result() for t in static))
    problems += [node_problem(n) for n in nodes if n.verdict != OK]
    return Report(iface_checks, advertised, hostname.result(), nodes, tuple(problems))


def report_json(report: Report) -> dict[str, object]:
    """The report as one JSON-ready object."""
    return {
        "interfaces": [asdict(c) for c in report.interfaces],
        "advertised": list(report.advertised),
        "hostname_ip": report.hostname_ip,
        "nodes": [asdict(n) for n in report.nodes],
        "problems": [str(p) for p in report.problems],
        "ok": report.ok,
    }


def _mark(value: str | None) -> str:
    """✓ or ✗ (or - when not tried): the reasons are in the verdict, not in the tables."""
    if value is None or value == NOT_TRIED:
        return "-"
    return "[green]✓[/]" if value == OK else "[red]✗[/]"


def render(report: Report, console: Console) -> None:
    """Print the report: interfaces, advertised addresses, nodes, then the verdict."""
    table = Table(title="interfaces (mDNS uses those marked used)")
    for column in ("interface", "addresses", "up", "multicast", "used", "self-test"):
        table.add_column(column)
    for c in report.interfaces:
        flags = ("yes" if flag else "no" for flag in (c.up, c.multicast, c.used))
        table.add_row(c.name, ", ".join(c.addresses) or "-", *flags, _mark(c.self_test))
    console.print(table)
    console.print(f"a node here would advertise: {', '.join(report.advertised)}")
    how = ", a loopback address; p2pfl does not use it (not a problem)"
    if not is_loopback(report.hostname_ip):
        how = " (p2pfl does not use it)"
    console.print(f"the host name resolves to {report.hostname_ip}{how}", highlight=False)
    nodes = Table(title="nodes (found over mDNS, or given with --peer)")
    for column in ("node", "network", "broker", "tcp", "mqtt", "verdict"):
        nodes.add_column(column, no_wrap=column == "broker", overflow="fold")
    for n in report.nodes:
        verdict = n.verdict.partition(" at ")[0]
        network = "--peer" if n.source == "static" else n.network
        head = [n.id, network, f"{_mark(n.verdict)} {verdict}"]
        for b in n.brokers or (BrokerCheck("-"),):
            nodes.add_row(*head[:2], b.uri, _mark(b.tcp), _mark(b.mqtt), head[2])
            head = ["", "", ""]
    console.print(nodes)
    console.print("[bold]verdict[/]")
    if report.ok:
        console.print("[green]✓[/] everything checked works")
    for p in report.problems:
        console.print(f"[red]✗[/] {p.what}\n    try: {p.fix}", highlight=False)
