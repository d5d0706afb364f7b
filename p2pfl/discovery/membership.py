"""A node's side of membership: announcing itself and keeping its `PeerView` up to date.

The node announces a retained presence record on its home broker and on the home broker of
every peer it learns of (static config, mDNS, or a presence record heard on its own broker),
each connection carrying the offline will; it repeats the record every third of the TTL as a
heartbeat and says `bye` on a graceful stop. Peers join the view when their presence is heard
and leave at once on their will or bye, or after the TTL without news. With presence off,
static and mDNS peers are taken as live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from p2pfl.config import NodeConfig
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.transport.base import Message, Transport, TransportError

log = logging.getLogger("p2pfl.node")


class Membership:
    """Presence for one node: who is live, and making sure they know we are."""

    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        view: PeerView,
        *,
        node_id: str,
        home_broker: str,
        next_seq: Callable[[], int],
        current_round: Callable[[], int],
        reject: Callable[[str, str], None],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.transport = transport
        self.view = view
        self.node_id = node_id
        self.home_broker = home_broker
        self.net = config.network
        self.presence_on = "presence" in config.discovery
        self._next_seq = next_seq
        self._round = current_round
        self._reject = reject
        self._clock = clock
        self._announced: set[str] = set()
        self._discovered: asyncio.Queue[PeerInfo] = asyncio.Queue()
        # peers that said bye after finishing a round (sync rounds up to it keep their shape)
        self.finished: dict[str, int] = {}

    def route(self, broker: str) -> str | None:
        """The transport's `broker` argument for a peer's broker URI (None: our home broker)."""
        return None if broker in ("", self.home_broker) else broker

    def will(self) -> Message:
        """The offline record the broker publishes if this node dies."""
        return self._record(online=False, graceful=False)

    async def start(self) -> None:
        """Listen for presence, introduce ourselves to the static peers, announce."""
        if self.presence_on:
            await self.transport.subscribe(topics.presence_all(self.net))
        for peer in self.config.peers:
            if peer.id == self.node_id:
                continue
            if self.presence_on:
                await self._announce_to(peer.broker)
            else:
                info = PeerInfo(
                    id=peer.id, role="trainer", broker=peer.broker, source="static",
                    last_seen=self._clock(),
                )  # fmt: skip
                self.view.upsert(info)
        await self._publish(online=True)

    async def say_bye(self) -> None:
        """Tell every broker we announced on that we stop on purpose."""
        await self._publish(online=False)

    async def on_message(self, message: Message) -> None:
        """A message on a presence topic (others are ignored)."""
        try:
            _net, kind, peer_id = topics.parse(message.topic)
        except ProtocolError:
            return
        if kind != "presence" or peer_id == self.node_id or not message.payload:
            return
        try:
            # a presence record is a flat map of a few fields: no long containers in it
            env = unpack_envelope(message.payload, max_size=64 * 1024, max_container_len=64)
            record = parse_presence(env)
            if env.src != peer_id or env.net != self.net:
                raise ProtocolError("presence record does not match its topic")
        except ProtocolError as exc:
            self._reject(peer_id, exc.reason)
            return
        if not record.online:
            if record.graceful and record.round is not None:
                self.finished[peer_id] = record.round
            if self.view.remove(peer_id, "offline"):
                log.info("peer left id=%s", peer_id)
            return
        self.finished.pop(peer_id, None)
        info = PeerInfo(
            id=peer_id,
            role=record.role,
            broker=record.broker,
            source="presence",
            last_seen=self._clock(),
            round=record.round,
        )
        if peer_id not in self.view:
            log.info("peer joined id=%s broker=%s", peer_id, record.broker)
        self.view.upsert(info)
        if record.broker and record.broker not in self._announced:
            # The peer learned of us before we knew it: make sure it hears our presence too.
            await self._announce_to(record.broker)

    def discovered(self, info: PeerInfo) -> None:
        """A discovery source (mDNS) found a peer; call it on the node's loop."""
        if info.id != self.node_id:
            self._discovered.put_nowait(info)

    def vanished(self, peer_id: str) -> None:
        """A discovery source saw a peer leave (e.g. an mDNS goodbye)."""
        if self.view.remove(peer_id, "gone"):
            log.info("peer left id=%s", peer_id)

    async def discovery_loop(self) -> None:
        """Introduce ourselves to each peer a discovery source reports."""
        while True:
            info = await self._discovered.get()
            if self.presence_on:
                # Like a static peer: an address. It joins the view when its presence is heard.
                if info.broker and info.broker not in self._announced:
                    await self._announce_to(info.broker)
                continue
            if info.id not in self.view:
                log.info("peer joined id=%s broker=%s source=%s", info.id, info.broker, info.source)
            self.view.upsert(info)

    async def heartbeat_loop(self) -> None:
        """Repeat our presence every third of the TTL; forget peers silent for the TTL."""
        interval = self.config.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            for gone in self.view.expire():
                log.info("peer expired id=%s", gone)
            await self._publish(online=True)

    def _record(self, *, online: bool, graceful: bool = True) -> Message:
        payload = encode_presence(
            self.net,
            self.node_id,
            self._next_seq(),
            online=online,
            graceful=graceful,
            role=self.config.role,
            broker=self.home_broker,
            round=self._round(),
        )
        return Message(topics.presence(self.net, self.node_id), payload, retain=True)

    async def _announce_to(self, broker: str) -> None:
        self._announced.add(broker)
        if broker == self.home_broker:
            return
        msg = self._record(online=True)
        try:
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self.route(broker)
            )
        except (ValueError, TransportError) as exc:
            log.warning("cannot announce to broker=%s error=%s", broker, exc)

    async def _publish(self, *, online: bool) -> None:
        if not self.presence_on:
            return
        msg = self._record(online=online)
        for broker in sorted({self.home_broker} | self._announced):
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self.route(broker)
            )
