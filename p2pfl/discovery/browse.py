"""`p2pfl peers`: browse the LAN for a while and list the nodes found, as a table or as JSON."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from p2pfl.discovery.mdns import Mdns
from p2pfl.discovery.peerview import PeerInfo
from p2pfl.transport.address import parse_broker_uri

PEER_FIELDS = ("id", "role", "network", "address", "broker", "version", "round")


async def browse(
    network: str | None, *, interfaces: Sequence[str] = (), duration: float = 2.0
) -> list[PeerInfo]:
    """Listen for ``duration`` seconds; the peers found, sorted by id (``network`` None: all).

    Announces nothing. Most answers arrive within half a second of the first query.
    """
    async with Mdns(network, None, interfaces=interfaces) as mdns:
        await asyncio.sleep(duration)
        await mdns.settle(within=3.0)
        return mdns.peers()


def _address(peer: PeerInfo) -> str:
    """The address its broker is reached at first, else the first one its record lists."""
    try:
        host = parse_broker_uri(peer.broker).host
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    addresses = peer.meta.get("addresses")
    return str(addresses[0]) if isinstance(addresses, list) and addresses else ""


def peers_json(peers: Iterable[PeerInfo]) -> list[dict[str, Any]]:
    """One JSON-ready dict per peer with the fields of ``PEER_FIELDS`` (round None = null)."""
    return [
        {
            "id": peer.id,
            "role": peer.role,
            "network": str(peer.meta.get("net", "")),
            "address": _address(peer),
            "broker": peer.broker,
            "version": peer.version,
            "round": peer.round,
            "pk": peer.meta.get("pk"),
            "brokers": list(peer.candidates),
        }
        for peer in peers
    ]


def format_peers_table(peers: Iterable[PeerInfo]) -> Table:
    """A rich table of the peers, one row each, in the order given."""
    table = Table(title="p2pfl peers")
    for name in PEER_FIELDS:
        table.add_column(name, justify="right" if name in ("version", "round") else "left")
    for row in peers_json(peers):
        table.add_row(*("-" if row[name] is None else str(row[name]) for name in PEER_FIELDS))
    return table
