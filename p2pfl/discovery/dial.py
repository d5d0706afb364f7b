"""Reaching a peer's broker: probe its announced addresses and keep the first that connects.

A multi-homed peer announces several addresses (LAN, Wi-Fi, a container bridge); only some are
reachable from here. The probes are plain TCP connections, opened in parallel; the first
address *in the peer's order* that accepts wins, so the choice does not depend on which answer
happened to be fastest. A failed probe carries a reason a user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Sequence

from p2pfl.transport.address import parse_broker_uri

PROBE_TIMEOUT = 2.0


def explain(exc: BaseException, host: str, port: int) -> str:
    """What a failed TCP connection to ``host:port`` most likely means, in a user's words."""
    if isinstance(exc, TimeoutError):
        return f"no answer from {host}:{port} (a firewall dropping TCP port {port}?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {host}:{port} (nothing listens on TCP port {port})"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {host} (another network, or the host is down)"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return f"{host}:{port} refused by a local firewall rule"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"cannot connect to {host}:{port}: {text}"


async def probe(uri: str, within: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to the broker at ``uri`` opens in time, else why not."""
    if uri.startswith("memory://"):
        return None  # the simulator's bus: always there
    try:
        address = parse_broker_uri(uri)
    except ValueError as exc:
        return str(exc)
    try:
        async with asyncio.timeout(within):
            _reader, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, TimeoutError) as exc:
        return explain(exc, address.host, address.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def first_reachable(
    uris: Sequence[str], within: float = PROBE_TIMEOUT
) -> tuple[str | None, dict[str, str]]:
    """The first of ``uris`` (in order) whose broker accepts a connection, and why the ones
    before it failed. A single candidate is returned without a probe: its link will tell."""
    if len(uris) == 1:
        return uris[0], {}
    tasks = [asyncio.ensure_future(probe(uri, within)) for uri in uris]
    failures: dict[str, str] = {}
    try:
        for uri, task in zip(uris, tasks, strict=True):
            reason = await task
            if reason is None:
                return uri, failures
            failures[uri] = reason
        return None, failures
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
