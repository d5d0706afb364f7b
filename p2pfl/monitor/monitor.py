"""The monitor node: finds the network like a node does, listens to everyone, never trains.

Nodes publish telemetry on their *home* broker only, so the monitor opens one MQTT client per
distinct broker it learns of: the brokers it is given, static peers' brokers, the broker every
mDNS record advertises, and the broker in every presence record heard on a broker it already
watches (with embedded brokers that is one client per node; with a shared broker, one in all).
On each it subscribes to presence, telemetry and logs, and publishes its own presence with role
`monitor`, so trainers see it but never pick it as a target (`PeerView.live()` lists trainers).
Its clients come from a transport factory: MQTT by default, the simulator's bus in a simulation.

A broker nobody is known to live on any more (every node on it forgotten) is left after
`forget_after` seconds, unless it was given on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from p2pfl.broker_auth import login_password
from p2pfl.config import StaticPeer
from p2pfl.discovery.dial import first_reachable
from p2pfl.discovery.mdns import Mdns
from p2pfl.discovery.peerview import PeerInfo
from p2pfl.discovery.presence import encode_presence, parse_presence, presence_certificate
from p2pfl.identity import Identity
from p2pfl.monitor.state import NetworkState
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.transport.address import parse_broker_uri
from p2pfl.transport.base import Message, Transport, TransportError, TransportFactory
from p2pfl.transport.mqtt import MqttOptions, MqttTransport
from p2pfl.trust import Trust, trust_label

log = logging.getLogger(__name__)

MAX_RECORD = 1 << 20
HEARTBEAT = 5.0
"""Seconds between the monitor's presence records (a third of the nodes' default TTL)."""
RETRY_AFTER = 30.0
"""A broker that could not be reached is tried again when rediscovered after this long."""
RETRY_GIVEN = 5.0
"""A broker given on the command line that could not be reached is retried this often."""

DEFAULT_OPTIONS = MqttOptions(connect_timeout=5.0, drain_timeout=1.0, backoff_max=5.0)


@dataclass
class _Watch:
    """One broker the monitor listens on."""

    uri: str
    transport: Transport
    since: float
    task: asyncio.Task[None] | None = None
    ready: bool = False


def canonical_broker(uri: str) -> str | None:
    """`mqtt://host:port` spelled one way, so one broker gets one client; None when invalid."""
    try:
        return parse_broker_uri(uri).uri
    except ValueError:
        return None


class Monitor:
    """Watches one network: discovery, one MQTT client per broker, a `NetworkState`."""

    def __init__(
        self,
        network: str,
        *,
        brokers: Sequence[str] = (),
        peers: Sequence[StaticPeer] = (),
        interfaces: Sequence[str] = (),
        use_mdns: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stale_after: float | None = None,
        forget_after: float = 60.0,
        monitor_id: str | None = None,
        options: MqttOptions = DEFAULT_OPTIONS,
        trust: Trust | None = None,
        identity: Identity | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        """`transport` opens a client on a broker; None: `MqttTransport` with `options`."""
        topics.validate_name(network, "network name")
        self.network = network
        self.identity = identity or Identity.generate()
        # Records are verified like a node verifies them; their order is the state's business
        # (the same record arrives through several brokers, retained ones replay old news).
        self.trust = trust or Trust("tofu")
        self.monitor_id = topics.validate_name(
            monitor_id or f"monitor-{self.identity.public_raw.hex()[:8]}", "monitor id"
        )
        self.state = NetworkState(
            network, stale_after=stale_after, forget_after=forget_after, clock=clock
        )
        self.clock = clock
        self.interfaces = list(interfaces)
        self.use_mdns = use_mdns
        if options.login is None:  # nodes' brokers let in only clients with a key login
            options = replace(options, login=self._login)
        self.options = options
        self._new_transport = transport or self._mqtt_transport
        self._pinned: set[str] = set()
        for broker in [*brokers, *(p.broker for p in peers)]:
            uri = canonical_broker(broker)
            if uri is None:
                raise ValueError(f"invalid broker URI {broker!r}: expected mqtt[s]://HOST:PORT")
            self._pinned.add(uri)
        self._expected: set[str] = {p.id for p in peers}
        self._watches: dict[str, _Watch] = {}
        self._failed: dict[str, float] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self._seq = time.time_ns() // 1000  # above any seq of an earlier run: no replay
        self._clients = 0
        self._logged: set[tuple[str, str]] = set()
        self._dialling: set[tuple[str, ...]] = set()
        self._routes: dict[str, str] = {}  # a node's first address -> the one that answered

    # ---- public -----------------------------------------------------------------------------

    def _mqtt_transport(self, uri: str, client_id: str) -> Transport:
        return MqttTransport(uri, client_id, self.options)

    def _login(self, uri: str) -> tuple[str, str]:
        return self.monitor_id, login_password(
            self.identity, self.monitor_id, uri, certificate=self.trust.certificate
        )

    @property
    def brokers(self) -> list[str]:
        """The brokers listened on now (connected and subscribed)."""
        return sorted(uri for uri, w in self._watches.items() if w.ready)

    @property
    def expected(self) -> set[str]:
        """Trainer ids announced by discovery (mDNS, presence, static peers)."""
        return set(self._expected)

    def settled(self) -> bool:
        """Every broker heard of is connected and every discovered node has reported."""
        if any(not w.ready for w in self._watches.values()):
            return False
        for node_id in self._expected:
            node = self.state.get(node_id)
            if node is None or node.telemetry is None:
                return False
        return True

    def snapshot(self, *, log_lines: int = 20) -> dict[str, Any]:
        """`NetworkState.snapshot()` plus who the monitor is and where it listens."""
        snap = self.state.snapshot(log_lines=log_lines)
        snap["monitor"] = {"id": self.monitor_id, "brokers": self.brokers}
        return snap

    async def run_until(self, stop: asyncio.Event) -> None:
        """Discover, connect and listen until `stop` is set; then say bye and disconnect.

        A monitor runs once.
        """
        if self._closing:
            raise RuntimeError("a Monitor runs once")
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for uri in sorted(self._pinned):
                    self._watch(uri)
                mdns = await self._start_mdns()
                upkeep = tg.create_task(self._upkeep(), name="monitor-upkeep")
                try:
                    await stop.wait()
                finally:
                    self._closing = True
                    upkeep.cancel()
                    for watch in list(self._watches.values()):
                        if watch.task is not None:
                            watch.task.cancel()
                    if mdns is not None:
                        await mdns.close()
        finally:
            self._closing = True
            self._tg = None

    # ---- discovery --------------------------------------------------------------------------

    async def _start_mdns(self) -> Mdns | None:
        if not self.use_mdns:
            return None
        mdns = Mdns(
            self.network,
            None,
            interfaces=self.interfaces,
            on_peer=self._on_mdns_peer,
            on_gone=self._expected.discard,
        )
        try:
            await mdns.start()
        except OSError as exc:
            log.warning("mDNS unavailable, continuing without it error=%s", exc)
            return None
        return mdns

    def _on_mdns_peer(self, info: PeerInfo) -> None:
        if info.role != "trainer":
            return
        self._expected.add(info.id)
        self._watch_any(info.candidates)

    def _watch_any(self, candidates: tuple[str, ...]) -> None:
        """Listen on a node's broker: the first of its announced addresses that answers."""
        if len(candidates) <= 1:
            for uri in candidates:
                self._watch(uri)
            return
        if self._tg is None or self._closing or candidates in self._dialling:
            return
        if any(canonical_broker(c) in self._watches for c in candidates):
            return
        self._dialling.add(candidates)
        self._tg.create_task(self._dial(candidates), name="monitor-dial")

    async def _dial(self, candidates: tuple[str, ...]) -> None:
        try:
            route, failures = await first_reachable(candidates)
        finally:
            self._dialling.discard(candidates)
        if route is None:
            log.warning("monitor cannot reach brokers=%s", "; ".join(failures.values()))
            return
        first, chosen = canonical_broker(candidates[0]), canonical_broker(route)
        if first is not None and chosen is not None:
            self._routes[first] = chosen
        self._watch(route)

    def _watch(self, broker: str, retry_after: float = RETRY_AFTER) -> None:
        """Start listening on `broker` unless already (or recently, in vain) doing so."""
        uri = canonical_broker(broker)
        if uri is None or uri in self._watches or self._tg is None or self._closing:
            return
        failed = self._failed.get(uri)
        if failed is not None and self.clock() - failed < retry_after:
            return
        self._clients += 1
        client_id = f"{self.monitor_id}-{self._clients}-{secrets.token_hex(8)}"
        transport = self._new_transport(uri, client_id)
        watch = self._watches[uri] = _Watch(uri, transport, since=self.clock())
        watch.task = self._tg.create_task(self._follow(watch), name=f"monitor:{uri}")

    async def _follow(self, watch: _Watch) -> None:
        transport = watch.transport
        will = Message(self._presence_topic, self._presence(online=False), retain=False)
        try:
            await transport.connect(will=will)
        except TransportError as exc:
            # Once per broker: one given on the command line is retried every few seconds.
            level = logging.DEBUG if watch.uri in self._failed else logging.WARNING
            log.log(level, "monitor cannot reach broker=%s error=%s", watch.uri, exc)
            self._failed[watch.uri] = self.clock()
            self._watches.pop(watch.uri, None)
            return
        except BaseException:
            self._watches.pop(watch.uri, None)
            raise
        self._failed.pop(watch.uri, None)
        log.info("monitor listening broker=%s", watch.uri)
        try:
            # Telemetry before presence: replayed retained records then arrive in the order the
            # state needs (a dead node's last report, then its will).
            for pattern in (
                topics.telemetry_all(self.network),
                topics.log_all(self.network),
                topics.presence_all(self.network),
            ):
                await transport.subscribe(pattern)
            await self._announce(transport)
            watch.ready = True
            async for message in transport.messages():
                self._on_message(message)
        except TransportError as exc:
            log.warning("monitor lost broker=%s error=%s", watch.uri, exc)
        finally:
            self._watches.pop(watch.uri, None)
            await self._leave(transport)

    # ---- records ----------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        try:
            net, kind, node_id = topics.parse(message.topic)
        except ProtocolError:
            self.state.reject("topic")
            return
        if net != self.network or node_id == self.monitor_id or not message.payload:
            return  # an empty payload is a cleared retained record
        try:
            if len(message.payload) > MAX_RECORD:
                raise ProtocolError(f"oversize: {len(message.payload)} bytes")
            payload = message.payload
            cert = None
            if kind == "presence":  # under ca, a presence record carries its certificate

                def cert() -> bytes | None:
                    return presence_certificate(payload, max_size=MAX_RECORD)

            self.trust.check(payload, replay=False, cert=cert)
            env = unpack_envelope(message.payload, max_size=MAX_RECORD)
            if env.src != node_id or env.net != net:
                raise ProtocolError("record does not match its topic")
            if kind == "presence":
                record = parse_presence(env)
            elif env.kind != kind:
                raise ProtocolError(f"a {env.kind!r} record on a {kind} topic")
        except ProtocolError as exc:
            self.state.reject(trust_label(exc.reason) or kind)
            if (node_id, kind) not in self._logged:
                self._logged.add((node_id, kind))
                log.info("monitor dropped record kind=%s id=%s reason=%s", kind, node_id, exc)
            return
        if kind == "presence":
            accepted = self.state.on_presence(record, sent_at=env.ts, retained=message.retain)
            if record.role != "trainer":
                return
            if record.online and accepted:
                self._expected.add(node_id)
                self._watch_any(record.candidates)
            elif not record.online:
                self._expected.discard(node_id)
        elif kind == "telemetry":
            self.state.on_telemetry(node_id, env.body, sent_at=env.ts, retained=message.retain)
        elif kind == "log":
            self.state.on_log(node_id, env.body, sent_at=env.ts)

    # ---- own presence -----------------------------------------------------------------------

    @property
    def _presence_topic(self) -> str:
        return topics.presence(self.network, self.monitor_id)

    def _presence(self, *, online: bool) -> bytes:
        self._seq += 1
        return encode_presence(
            self.network, self.monitor_id, self._seq, online=online, role="monitor", broker="",
            signer=self.identity, cert=self.trust.certificate,
        )  # fmt: skip

    async def _announce(self, transport: Transport) -> None:
        await transport.publish(
            self._presence_topic, self._presence(online=True), qos=1, retain=True
        )

    async def _leave(self, transport: Transport) -> None:
        with contextlib.suppress(TransportError):
            await transport.publish(self._presence_topic, self._presence(online=False), qos=1)
            # Clear our retained record: a monitor that comes and goes leaves nothing behind.
            await transport.publish(self._presence_topic, b"", qos=1, retain=True)
        with contextlib.suppress(TransportError):
            await transport.close()

    # ---- upkeep -----------------------------------------------------------------------------

    async def _upkeep(self) -> None:
        last_beat = self.clock()
        while True:
            await asyncio.sleep(0.5)
            for gone in self.state.expire():
                self._expected.discard(gone)
                log.info("node forgotten id=%s", gone)
            if self.clock() - last_beat >= HEARTBEAT:
                last_beat = self.clock()
                for watch in list(self._watches.values()):
                    if watch.ready:
                        with contextlib.suppress(TransportError):
                            await self._announce(watch.transport)
            self._prune()
            for uri in self._pinned:
                self._watch(uri, retry_after=RETRY_GIVEN)

    def _prune(self) -> None:
        """Leave the brokers no known node lives on any more (their nodes were forgotten)."""
        in_use = {canonical_broker(n.broker) for n in self.state.nodes() if n.broker}
        in_use |= {self._routes.get(uri) for uri in in_use if uri is not None}
        now = self.clock()
        for uri, watch in list(self._watches.items()):
            if uri in self._pinned or uri in in_use or not watch.ready:
                continue
            if now - watch.since > self.state.forget_after and watch.task is not None:
                log.info("monitor leaves broker=%s (no node on it)", uri)
                watch.task.cancel()
