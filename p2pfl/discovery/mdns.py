"""Zero-configuration discovery: announce this node and find peers on the LAN over mDNS/DNS-SD.

Each node registers ``<id>@<network>._p2pfl._tcp.local.`` (python-zeroconf, asyncio API) with
its home broker's port, its addresses and the TXT record of :mod:`p2pfl.discovery.mdns_record`
(DESIGN.md names the instance ``<id>``: the network in it keeps two networks that reuse ids
apart). It browses
the same service type, resolves every instance that appears or changes, and reports the peers of
its network through ``on_peer``; a goodbye (graceful stop) reports ``on_gone``.

The TXT ``id`` is the truth, not the instance name: zeroconf probes the name before announcing
it and, when another responder on the LAN already holds it (two processes started with the same
id), renames ours to ``<id>@<network>-2`` (we pass ``allow_name_change``). Receivers then see
two instances with one id; they report the first and count the second as ``duplicate_id``.

mDNS is not a crash detector. A killed peer sends no goodbye; browsers drop it only when its PTR
record expires (zeroconf announces PTR/TXT with a 4500 s TTL and SRV/A with 120 s, and clamps a
received PTR TTL to at least 1125 s). Liveness comes from MQTT presence and traffic; mDNS
introduces peers, and reports them again whenever their record changes. The TXT ``round`` is the
round the node started from (a resumed node's checkpoint); presence carries the live round.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Self, TypeVar

from zeroconf import (
    BadTypeInNameException,
    Error,
    InterfaceChoice,
    NotRunningException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from p2pfl.discovery.addresses import advertised_hosts
from p2pfl.discovery.mdns_record import (
    REJECT_REASONS,
    SERVICE_TYPE,
    RecordRejected,
    build_txt,
    instance_label,
    parse_txt,
)
from p2pfl.discovery.peerview import PeerInfo
from p2pfl.transport.address import parse_broker_uri

log = logging.getLogger(__name__)

PeerCallback = Callable[[PeerInfo], None]
GoneCallback = Callable[[str], None]
T = TypeVar("T")


def _default_addresses(broker_uri: str, interfaces: Sequence[str]) -> list[str]:
    """Where peers can reach us: the broker's own IP if literal, else the chosen interfaces."""
    host = parse_broker_uri(broker_uri).host
    try:
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            return [str(ip)]
    except ValueError:
        pass  # a host name: announce the interface addresses below
    return advertised_hosts("0.0.0.0", chosen=interfaces)


class Mdns:
    """Announce this node (when ``node_id`` and ``broker_uri`` are given) and browse for peers.

    ``network`` None reports peers of every network (browse only). ``interfaces`` empty means
    every interface (zeroconf's default); tests pass ``["127.0.0.1"]``, which works even where
    ``lo`` lacks the MULTICAST flag. ``port`` defaults to the broker URI's port, ``addresses``
    to the broker's IP when literal, else the interface addresses. Callbacks run on the event
    loop; a bad record is counted in :attr:`stats`, logged once per instance, never raised.
    """

    def __init__(
        self,
        network: str | None,
        node_id: str | None,
        *,
        role: str = "trainer",
        broker_uri: str | None = None,
        port: int | None = None,
        interfaces: Sequence[str] = (),
        addresses: Sequence[str] = (),
        public_key: str | None = None,
        round: int | None = None,
        on_peer: PeerCallback | None = None,
        on_gone: GoneCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        resolve_timeout: float = 3.0,
    ) -> None:
        self._announce = node_id is not None and broker_uri is not None
        if node_id is not None and broker_uri is not None:
            if network is None:
                raise ValueError("a node that announces itself needs a network name")
            build_txt(network, node_id, role=role, broker_uri=broker_uri, public_key=public_key)
            port = port or parse_broker_uri(broker_uri).port
            addresses = list(addresses) or _default_addresses(broker_uri, interfaces)
        self.network = network
        self.node_id = node_id
        self.role = role
        self.stats: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._broker_uri = broker_uri
        self._port = port
        self._interfaces = list(interfaces)
        self._addresses = list(addresses)
        self._public_key = public_key
        self._round = round
        self._on_peer = on_peer
        self._on_gone = on_gone
        self._clock = clock
        self._resolve_timeout_ms = int(resolve_timeout * 1000)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._children: set[asyncio.Task[None]] = set()
        self._failed: list[BaseException] = []
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._by_name: dict[str, PeerInfo] = {}  # every accepted instance, duplicates too
        self._reported: dict[tuple[str, object], str] = {}  # (id, net) -> the instance reported
        self._logged: set[tuple[str, str]] = set()
        self._closed = False

    @property
    def instance_name(self) -> str | None:
        """The full service name we announce (after any rename), or None when not announcing."""
        return self._info.name if self._info is not None else None

    async def settle(self, within: float) -> None:
        """Wait (at most `within` s) for the resolutions in flight, so a browse that ends
        while a busy machine is still answering does not miss the slow ones."""
        pending = [t for t in self._resolving.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=within)

    def peers(self) -> list[PeerInfo]:
        """The peers currently known through mDNS, sorted by id then network."""
        peers = (self._by_name[name] for name in self._reported.values())
        return sorted(peers, key=lambda p: (p.id, str(p.meta.get("net"))))

    async def start(self) -> None:
        """Open the sockets, start browsing, and announce; probing our name takes ~1.2 s.

        Raises OSError when the multicast sockets cannot be opened.
        """
        if self._zc is not None or self._closed:
            raise RuntimeError("an Mdns can be started once")
        self._zc = AsyncZeroconf(interfaces=self._interfaces or InterfaceChoice.All)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_change]
        )
        if not self._announce:
            return
        try:
            # The network in the name: two networks on one LAN that reuse an id (n0, n1, ...)
            # must not announce under one name (a record of the other network arriving under
            # our peer's name would drop our peer).
            label = instance_label(f"{self.node_id}@{self.network}")
            info = self._service_info(label + "." + SERVICE_TYPE)
            wanted = info.name
            broadcast = await self._zc.async_register_service(info, allow_name_change=True)
        except BaseException:
            await self.close()
            raise
        self._info = info
        if info.name != wanted:
            log.warning("mdns name taken id=%s announced_as=%s", self.node_id, info.name)
        self._spawn(self._await(broadcast))

    async def close(self) -> None:
        """Stop browsing, send goodbyes for our service (~0.25 s), close the sockets; idempotent.

        Re-raises (as an ExceptionGroup) any unexpected failure of a background task.
        """
        if self._closed:
            return
        self._closed = True
        if self._zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        children = list(self._children)
        for task in children:
            task.cancel()
        await asyncio.gather(*children, return_exceptions=True)
        await self._zc.async_close()  # unregisters our service: goodbye packets
        errors = [e for e in self._failed if isinstance(e, Exception)]
        if errors:
            raise ExceptionGroup("mdns background tasks failed", errors)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- announcing --------------------------------------------------------------------------

    def _service_info(self, name: str) -> AsyncServiceInfo:
        assert self.network is not None and self.node_id is not None
        assert self._broker_uri is not None
        txt = build_txt(
            self.network,
            self.node_id,
            role=self.role,
            broker_uri=self._broker_uri,
            public_key=self._public_key,
            round=self._round,
        )
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=dict(txt),
            parsed_addresses=self._addresses,
        )

    @staticmethod
    async def _await(future: Any) -> None:
        await future

    # -- browsing ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a child task; close() cancels and awaits every child still running."""
        task = asyncio.get_running_loop().create_task(coro)
        self._children.add(task)
        task.add_done_callback(self._child_done)
        return task

    def _child_done(self, task: asyncio.Task[None]) -> None:
        self._children.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Logged now so it is not silent until close(), which re-raises it.
            self._failed.append(error)
            log.error("mdns task failed", exc_info=error)

    def _on_service_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._closed or name == self.instance_name:
            return
        if state_change is ServiceStateChange.Removed:
            task = self._resolving.pop(name, None)
            if task is not None:
                task.cancel()
            self._dirty.discard(name)
            self._forget(name)
        elif name in self._resolving:
            self._dirty.add(name)  # resolve again once the running resolution ends
        else:
            self._resolving[name] = self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        try:
            while True:
                self._dirty.discard(name)
                try:
                    info = AsyncServiceInfo(SERVICE_TYPE, name)
                except (BadTypeInNameException, Error, ValueError) as exc:
                    self._reject(name, RecordRejected("malformed", f"bad name: {exc}"))
                    return
                try:
                    found = await info.async_request(self._zc.zeroconf, self._resolve_timeout_ms)
                except NotRunningException:
                    return
                except (Error, OSError) as exc:
                    self._reject(name, RecordRejected("unresolved", str(exc)))
                else:
                    if found:
                        self._accept(name, info)
                    else:
                        self._reject(name, RecordRejected("unresolved", "no answer"))
                if name not in self._dirty:
                    return
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    def _accept(self, name: str, info: AsyncServiceInfo) -> None:
        try:
            peer = parse_txt(info.properties, info.parsed_addresses(), self._clock())
            net = peer.meta["net"]
            if self.network is not None and net != self.network:
                raise RecordRejected("other_network", f"network {net!r}")
            if peer.id == self.node_id:
                raise RecordRejected("duplicate_id", "another process announces our id")
        except RecordRejected as exc:
            self._reject(name, exc)
            return
        key = (peer.id, net)
        owner = self._reported.get(key)
        if owner is not None and owner != name and owner in self._by_name:
            # Kept, not reported: it takes over if the reported instance goes away.
            self._by_name[name] = peer
            self._count(name, RecordRejected("duplicate_id", f"id also announced by {owner}"))
            return
        self._by_name[name] = peer
        self._reported[key] = name
        self._call(self._on_peer, peer)

    def _count(self, name: str, exc: RecordRejected) -> None:
        self.stats[exc.reason] += 1
        if (name, exc.reason) not in self._logged:
            self._logged.add((name, exc.reason))
            level = logging.WARNING if exc.reason == "duplicate_id" else logging.INFO
            log.log(level, "mdns record ignored name=%s reason=%s", name, exc)

    def _reject(self, name: str, exc: RecordRejected) -> None:
        self._count(name, exc)
        if exc.reason != "unresolved":
            self._forget(name)  # a peer whose record turned bad is no longer reported

    def _forget(self, name: str) -> None:
        gone = self._by_name.pop(name, None)
        if gone is None:
            return
        key = (gone.id, gone.meta["net"])
        if self._reported.get(key) != name:
            return  # a shadowed duplicate: nothing was reported for it
        del self._reported[key]
        heir = next((n for n, p in self._by_name.items() if (p.id, p.meta["net"]) == key), None)
        if heir is not None:
            self._reported[key] = heir
            self._call(self._on_peer, self._by_name[heir])
        else:
            self._call(self._on_gone, gone.id)

    def _call(self, callback: Callable[[T], None] | None, arg: T) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:
            # A bug in the caller's callback must not stop discovery of every other peer.
            log.exception("mdns callback failed arg=%r", arg)
