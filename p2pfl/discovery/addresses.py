"""Which addresses a node announces for its broker, and which broker addresses are its own.

A broker listening on a wildcard address (``0.0.0.0``) is reached at the host's interface
addresses. The host name is no guide: Debian and Ubuntu map it to ``127.0.1.1`` in /etc/hosts,
so a node that announced ``gethostbyname(gethostname())`` told every peer to dial itself. We
read the interfaces instead (psutil), announce every non-loopback IPv4 address (the default
route's interface first), and announce a loopback address only when there is nothing else,
i.e. when the broker listens only there or the host has no network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from p2pfl.transport.address import BrokerAddress, parse_broker_uri

WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Interface:
    """One network interface: its name, IPv4 addresses, and whether it is up and multicast."""

    name: str
    addresses: tuple[str, ...]
    up: bool
    multicast: bool
    loopback: bool


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether a listening host means "every interface"."""
    return host in WILDCARDS


def default_route_interface(routes: Path = Path("/proc/net/route")) -> str | None:
    """The interface of the IPv4 default route (Linux), or None."""
    try:
        lines = routes.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def interfaces() -> list[Interface]:
    """This host's interfaces with their IPv4 addresses, default-route interface first."""
    stats = psutil.net_if_stats()
    found = []
    for name, addrs in psutil.net_if_addrs().items():
        ips = tuple(a.address for a in addrs if a.family == socket.AF_INET)
        st = stats.get(name)
        flags = set(st.flags.split(",")) if st is not None and st.flags else set()
        loopback = "loopback" in flags or (bool(ips) and all(is_loopback(ip) for ip in ips))
        found.append(
            Interface(
                name=name,
                addresses=ips,
                up=st.isup if st is not None else False,
                multicast="multicast" in flags or loopback,
                loopback=loopback,
            )
        )
    first = default_route_interface()
    return sorted(found, key=lambda i: (i.loopback, i.name != first))


def local_addresses() -> list[str]:
    """Every IPv4 address of an interface that is up, default-route interface first."""
    return [a for i in interfaces() if i.up for a in i.addresses]


def advertised_hosts(
    listen_host: str, advertise: Sequence[str] = (), chosen: Sequence[str] = ()
) -> list[str]:
    """The hosts peers should dial to reach a broker listening on ``listen_host``.

    ``advertise`` (the user's word) wins. A broker bound to one address is reached there. A
    wildcard broker is reached at the non-loopback addresses of ``chosen`` interfaces (the
    node's ``--interface`` IPs) or, without any, of every interface; loopback only when the
    host has nothing else.
    """
    if advertise:
        return list(dict.fromkeys(advertise))
    if not is_wildcard(listen_host):
        return [listen_host]
    candidates = list(chosen) or local_addresses()
    routable = [a for a in candidates if not is_loopback(a)]
    return list(dict.fromkeys(routable)) or ["127.0.0.1"]


def broker_uris(hosts: Iterable[str], port: int, *, tls: bool = False) -> list[str]:
    """``mqtt[s]://HOST:PORT`` for each host."""
    return [BrokerAddress(host=h, port=port, tls=tls).uri for h in hosts]


class OwnBroker:
    """Recognises this node's own broker under any address a peer might name it by.

    Used to refuse a peer record that names our broker as the peer's (a peer that announces a
    loopback address, or a forged record): dialling it would only deliver to ourselves.
    """

    def __init__(self, listen_host: str, port: int, uris: Iterable[str] = ()) -> None:
        self.port = port
        self._wildcard = is_wildcard(listen_host)
        self._hosts = {listen_host} if not self._wildcard else set()
        for uri in uris:
            self._hosts.add(parse_broker_uri(uri).host)
        self._local: set[str] | None = None

    def __contains__(self, uri: object) -> bool:
        if not isinstance(uri, str):
            return False
        try:
            address = parse_broker_uri(uri)
        except ValueError:
            return False
        if address.port != self.port:
            return False
        host = address.host
        if host in self._hosts:
            return True
        if not self._wildcard:
            return False
        if is_loopback(host) or is_wildcard(host) or host == socket.gethostname():
            return True
        if self._local is None:
            self._local = set(local_addresses())
        return host in self._local
