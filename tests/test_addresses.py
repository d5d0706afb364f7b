"""What a node announces for its broker, which addresses are its own, and how peers are dialled.

Interfaces are faked (psutil) where a test needs a multi-homed host; connections are real, to
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.discovery import addresses
from p2pfl.discovery.addresses import OwnBroker, advertised_hosts, broker_uris
from p2pfl.discovery.dial import explain, first_reachable, probe
from p2pfl.discovery.mdns_record import RecordRejected, parse_txt
from p2pfl.discovery.presence import MAX_BROKERS, encode_presence, parse_presence
from p2pfl.protocol.envelope import Envelope, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from tests.nodeproc import free_ports


def _addr(ip: str) -> SimpleNamespace:
    return SimpleNamespace(family=socket.AF_INET, address=ip)


@pytest.fixture
def lan_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Debian-like host: loopback, a LAN card, a container bridge; the host name resolves to
    127.0.1.1 (as /etc/hosts says on Debian and Ubuntu)."""
    ifaces = {
        "lo": [_addr("127.0.0.1")],
        "docker0": [_addr("172.17.0.1")],
        "eth0": [_addr("10.77.0.1"), SimpleNamespace(family=socket.AF_INET6, address="fe80::1")],
        "wlan0": [],
    }
    stats = {
        "lo": SimpleNamespace(isup=True, flags="up,loopback,running"),
        "docker0": SimpleNamespace(isup=True, flags="up,broadcast,running,multicast"),
        "eth0": SimpleNamespace(isup=True, flags="up,broadcast,running,multicast"),
        "wlan0": SimpleNamespace(isup=False, flags="broadcast,multicast"),
    }
    monkeypatch.setattr(addresses.psutil, "net_if_addrs", lambda: ifaces)
    monkeypatch.setattr(addresses.psutil, "net_if_stats", lambda: stats)
    monkeypatch.setattr(addresses, "default_route_interface", lambda: "eth0")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    yield


# ---- what a node announces ------------------------------------------------------------------


def test_wildcard_broker_is_announced_at_interface_addresses_not_the_host_name(
    lan_host: None,
) -> None:
    # The host name maps to 127.0.1.1; what peers get are the interfaces, default route first.
    assert advertised_hosts("0.0.0.0") == ["10.77.0.1", "172.17.0.1"]
    assert advertised_hosts("") == ["10.77.0.1", "172.17.0.1"]


def test_advertise_and_a_bound_host_win(lan_host: None) -> None:
    assert advertised_hosts("0.0.0.0", ["nat.example", "10.0.0.9"]) == ["nat.example", "10.0.0.9"]
    assert advertised_hosts("10.77.0.1") == ["10.77.0.1"]
    assert advertised_hosts("127.0.0.1") == ["127.0.0.1"]  # one machine keeps working


def test_chosen_interfaces_restrict_what_is_announced(lan_host: None) -> None:
    assert advertised_hosts("0.0.0.0", chosen=["172.17.0.1"]) == ["172.17.0.1"]
    # Tests bind mDNS to loopback: loopback is then all there is to announce.
    assert advertised_hosts("0.0.0.0", chosen=["127.0.0.1"]) == ["127.0.0.1"]


def test_loopback_is_announced_only_when_there_is_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(addresses.psutil, "net_if_addrs", lambda: {"lo": [_addr("127.0.0.1")]})
    monkeypatch.setattr(
        addresses.psutil, "net_if_stats", lambda: {"lo": SimpleNamespace(isup=True, flags="up")}
    )
    assert advertised_hosts("0.0.0.0") == ["127.0.0.1"]


def test_interfaces_report_flags_and_put_the_default_route_first(lan_host: None) -> None:
    found = {i.name: i for i in addresses.interfaces()}
    assert found["eth0"].addresses == ("10.77.0.1",)  # IPv4 only: the embedded broker's family
    assert found["lo"].loopback and not found["eth0"].loopback
    assert not found["wlan0"].up and found["wlan0"].multicast
    assert addresses.interfaces()[0].name == "eth0"
    assert addresses.local_addresses() == ["10.77.0.1", "172.17.0.1", "127.0.0.1"]


def testdefault_route_interface_is_read_from_the_routing_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\n"
        "eth1\t004D0A0A\t00000000\t0001\n"
        "wlan0\t00000000\t0101A8C0\t0003\n"
    )
    assert addresses.default_route_interface(table) == "wlan0"
    assert addresses.default_route_interface(tmp_path / "missing") is None


def test_broker_uris_bracket_ipv6() -> None:
    assert broker_uris(["10.0.0.1", "::1"], 1883) == ["mqtt://10.0.0.1:1883", "mqtt://[::1]:1883"]
    assert broker_uris(["h"], 8883, tls=True) == ["mqtts://h:8883"]


# ---- our own broker --------------------------------------------------------------------------


def test_own_broker_is_recognised_under_every_name(lan_host: None) -> None:
    own = OwnBroker("0.0.0.0", 1883, ["mqtt://10.77.0.1:1883"])
    for uri in (
        "mqtt://10.77.0.1:1883",
        "mqtt://127.0.0.1:1883",
        "mqtt://127.0.1.1:1883",
        "mqtt://localhost:1883",
        "mqtt://172.17.0.1:1883",  # another interface of this host
        f"mqtt://{socket.gethostname()}:1883",
    ):
        assert uri in own, uri
    for uri in ("mqtt://10.77.0.2:1883", "mqtt://127.0.0.1:1884", "junk", 42):
        assert uri not in own, uri


def test_a_broker_bound_to_one_address_owns_only_that_one() -> None:
    own = OwnBroker("127.0.0.1", 18830)
    assert "mqtt://127.0.0.1:18830" in own
    assert "mqtt://127.0.0.2:18830" not in own  # another process of this machine may be there


# ---- dialling ---------------------------------------------------------------------------------


async def test_first_reachable_skips_dead_addresses_in_order() -> None:
    closed, other_closed = free_ports(2)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        dead = f"mqtt://127.0.0.1:{closed}"
        good = f"mqtt://127.0.0.1:{port}"
        route, failures = await first_reachable([dead, good, f"mqtt://127.0.0.1:{other_closed}"])
        assert route == good
        assert list(failures) == [dead]
        assert "connection refused" in failures[dead]
        assert await probe(good) is None


async def test_nothing_reachable_says_why_for_each() -> None:
    a, b = free_ports(2)
    uris = [f"mqtt://127.0.0.1:{a}", f"mqtt://127.0.0.1:{b}"]
    route, failures = await first_reachable(uris)
    assert route is None
    assert set(failures) == set(uris)


async def test_one_candidate_is_not_probed() -> None:
    # The link to it will tell; no extra connection for the common case.
    (closed,) = free_ports(1)
    uri = f"mqtt://127.0.0.1:{closed}"
    assert await first_reachable([uri]) == (uri, {})
    assert await probe("memory://bus") is None


def test_failures_are_explained_in_a_users_words() -> None:
    assert "firewall" in explain(TimeoutError(), "h", 1883)
    assert "nothing listens" in explain(ConnectionRefusedError(), "h", 1883)
    assert "no route" in explain(OSError(errno.EHOSTUNREACH, "x"), "h", 1883)
    assert "no route" in explain(OSError(errno.ENETUNREACH, "x"), "h", 1883)


# ---- presence records carry every address ----------------------------------------------------


def test_presence_carries_every_broker_address() -> None:
    brokers = ["mqtt://10.77.0.1:1883", "mqtt://192.168.1.4:1883"]
    payload = encode_presence(
        "lab", "m1", 1, online=True, role="trainer", broker=brokers[0], brokers=brokers
    )
    record = parse_presence(unpack_envelope(payload))
    assert record.broker == brokers[0]
    assert record.candidates == tuple(brokers)
    old = encode_presence("lab", "m1", 1, online=True, role="trainer", broker=brokers[0])
    assert parse_presence(unpack_envelope(old)).candidates == (brokers[0],)


def _presence(body: dict[str, object]) -> Envelope:
    return Envelope(v=1, kind="presence", net="lab", src="m1", seq=1, ts=0.0, body=body)


@given(
    st.one_of(
        st.lists(st.just("mqtt://10.0.0.1:1883"), min_size=MAX_BROKERS + 1, max_size=40),
        st.lists(st.one_of(st.integers(), st.just("http://x"), st.text(min_size=513)), min_size=1),
        st.integers(),
        st.text(),
    )
)
def test_presence_with_bad_broker_lists_is_refused(brokers: object) -> None:
    env = _presence({"state": "online", "broker": "mqtt://10.0.0.1:1883", "brokers": brokers})
    with pytest.raises(ProtocolError):
        parse_presence(env)


# ---- mDNS records give every address too -----------------------------------------------------


def _txt(mqtt: str) -> dict[bytes, bytes | None]:
    return {b"v": b"1", b"net": b"lab", b"id": b"m1", b"role": b"trainer", b"mqtt": mqtt.encode()}


def test_mdns_record_of_a_multi_homed_host_lists_its_addresses() -> None:
    peer = parse_txt(_txt("mqtt://10.77.0.1:1883"), ["192.168.1.4", "10.77.0.1", "127.0.0.1"])
    assert peer.broker == "mqtt://10.77.0.1:1883"
    assert peer.candidates == (
        "mqtt://10.77.0.1:1883",
        "mqtt://192.168.1.4:1883",
        "mqtt://127.0.0.1:1883",  # last: only useful on the same machine
    )


def test_mdns_record_of_a_wildcard_broker_uses_its_addresses() -> None:
    peer = parse_txt(_txt("mqtt://0.0.0.0:1883"), ["fe80::1", "10.77.0.2"])
    assert peer.candidates == ("mqtt://10.77.0.2:1883",)
    with pytest.raises(RecordRejected):
        parse_txt(_txt("mqtt://0.0.0.0:1883"), [])


def test_mdns_record_naming_another_host_is_taken_as_is() -> None:
    # An external broker, or a name for NAT: the record's own addresses are not its broker's.
    for mqtt in ("mqtt://broker.example:1883", "mqtt://10.9.9.9:1883"):
        assert parse_txt(_txt(mqtt), ["10.77.0.2"]).candidates == (mqtt,)


def test_presence_carries_the_key_fingerprint() -> None:
    payload = encode_presence(
        "lab", "m1", 1, online=True, role="trainer", broker="mqtt://10.0.0.1:1", pk="SHA256:abc"
    )
    assert parse_presence(unpack_envelope(payload)).pk == "SHA256:abc"
    env = _presence({"state": "online", "pk": "x" * 200})
    with pytest.raises(ProtocolError, match="pk"):
        parse_presence(env)
