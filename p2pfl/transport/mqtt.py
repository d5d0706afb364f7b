"""MQTT transport on aiomqtt 2.5 (MQTT 3.1.1).

A node has one *home* broker, where its subscriptions live, and publishes to a peer through the
peer's home broker (`publish(..., broker=URI)`): the transport opens one extra client per distinct
remote broker, lazily, and closes it again when idle.

aiomqtt has no automatic reconnect, so each broker link runs a supervised loop (a child of the
transport's `asyncio.TaskGroup`): connect, re-subscribe, send and receive until the connection
breaks, then reconnect with capped exponential backoff and jitter. Publishes go through a
bounded outgoing queue per link, so they wait while the broker is away; a message is either
acknowledged by the broker (QoS 1) or dropped and counted in `stats.dropped`, never lost
silently: on overflow, after `max_attempts` broken connections while it was in flight, when a
remote broker stays unreachable for `link_give_up` seconds, or when `close` cannot flush it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator

import aiomqtt

from p2pfl.transport.address import BrokerAddress, parse_broker_uri
from p2pfl.transport.base import Message, Payload, Transport, TransportError, topic_matches
from p2pfl.transport.link import Link
from p2pfl.transport.options import MqttOptions
from p2pfl.transport.outbox import Outgoing

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)
def _address(uri: str) -> BrokerAddress:
    return parse_broker_uri(uri)


class MqttTransport(Transport):
    """`Transport` over MQTT brokers; subscriptions on the home broker, publishes anywhere."""

    def __init__(
        self,
        home: str | BrokerAddress,
        client_id: str,
        options: MqttOptions | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.options = opts = options or MqttOptions()
        super().__init__(client_id, opts.max_inbox, opts.max_inbox_bytes, opts.max_payload)
        self.home = parse_broker_uri(home) if isinstance(home, str) else home
        self._links: dict[BrokerAddress, Link] = {}
        self._running: set[Link] = set()
        self._home_link: Link | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._aborting = False
        self._seq = itertools.count()
        self._failure: BaseException | None = None
        self._drop_reasons: set[str] = set()

    def __repr__(self) -> str:
        return f"MqttTransport({self.client_id!r}, home={self.home.uri}, {self._state})"

    @property
    def connected(self) -> bool:
        """Whether the home broker connection is up right now."""
        return self._home_link is not None and self._home_link.connected.is_set()

    @property
    def brokers(self) -> list[str]:
        """URIs of the brokers this transport has a link to now (home first)."""
        return [address.uri for address in self._links]

    @property
    def patterns(self) -> list[str]:
        """The topic filters subscribed to (re-subscribed after every reconnect)."""
        return list(self._patterns)

    async def _connect(self) -> None:
        # TransportError if the home broker is not reachable in `connect_timeout`.
        home = self._link(self.home, self.client_id, home=True)
        self._home_link = home
        self._links[self.home] = home
        self._state = "connecting"
        self._runner = runner = asyncio.create_task(self._run(home), name=f"mqtt:{self.client_id}")
        waiter = asyncio.ensure_future(home.connected.wait())
        hopeless = asyncio.ensure_future(home.hopeless.wait())
        try:
            await asyncio.wait(
                {waiter, hopeless, runner},
                timeout=self.options.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
            hopeless.cancel()
            if self._state == "connecting" and home.connected.is_set():
                self._state = "connected"
            else:  # timed out, failed, cancelled, or closed meanwhile: stop trying
                if self._state == "connecting":
                    self._state = "closing"
                self._stop.set()
                await asyncio.wait({runner})
        if self._state == "connected":
            return
        raise TransportError(
            f"{self.client_id}: cannot connect to broker {self.home.uri}: "
            f"{home.last_error or 'timed out'}"
        ) from self._failure

    async def _subscribe(self, pattern: str) -> None:
        # on the home broker; kept across reconnects
        home, client = self._home_link, self._home_client()
        if home is not None and client is not None:
            # A broken connection here is fine: the link subscribes again when it reconnects.
            with contextlib.suppress(aiomqtt.MqttError):
                await home.until_down(client.subscribe(pattern, qos=1))

    async def _unsubscribe(self, pattern: str) -> None:
        home, client = self._home_link, self._home_client()
        if home is not None and client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await home.until_down(client.unsubscribe(pattern))

    async def _publish(
        self, topic: str, payload: Payload, qos: int, retain: bool, broker: str | None
    ) -> None:
        # queued for the link to `broker` (None = home); returns without waiting
        address = self.home if broker is None else _address(broker)
        link = self._links.get(address) or self._open_link(address)
        item = Outgoing(next(self._seq), topic, payload, qos, retain)
        if not link.enqueue(item):
            self.dropped(1, f"outgoing queue to {address.uri} is full")

    async def flush(self) -> None:
        """Wait until every queued message is acknowledged by its broker or dropped.

        No timeout of its own (a broker may be down): wrap it in `asyncio.timeout`.
        """
        for link in list(self._running):
            await link.drained.wait()

    async def messages(self) -> AsyncIterator[Message]:
        """Messages for the subscriptions, until the transport is closed."""
        async for message in super().messages():
            yield message
        if self._failure is not None:
            raise TransportError(f"{self.client_id}: transport failed") from self._failure

    async def close(self) -> None:
        """Flush queued messages (up to `drain_timeout`), then disconnect; no will."""
        if self._state == "new":
            self._finish()
            return
        if self._state == "connected":
            self._state = "closing"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.drain_timeout):
                    # A link whose broker died will not drain: don't wait on it.
                    for link in [lk for lk in self._running if lk.connected.is_set()]:
                        await link.until_down(link.drained.wait())
        if self._state == "connecting":
            self._state = "closing"
        self._stop.set()
        await self._wait_runner()

    async def abort(self) -> None:
        """Cut every connection without DISCONNECT, as a crash would: the broker sends the will."""
        if self._state == "new":
            self._finish()
            return
        if self._state in ("connecting", "connected"):
            self._state = "closing"
            self._aborting = True
            for link in self._running:
                link.kill()
        self._stop.set()
        await self._wait_runner()

    # -- used by the links (`LinkOwner`) ---------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Put a received message in the inbox, or count it dropped when the inbox is full.

        A message no subscription of ours matches is ignored (see `wanted`).
        """
        if not self.wanted(message.topic):
            return
        refused = self._receive(message)
        if refused is not None:
            self.dropped(1, refused)

    def dropped(self, count: int, reason: str) -> None:
        """Count `count` lost messages; the first loss for each reason is logged as a warning."""
        if count <= 0:
            return
        self.stats.dropped += count
        level = logging.DEBUG if reason in self._drop_reasons else logging.WARNING
        self._drop_reasons.add(reason)
        log.log(level, "dropped client=%s count=%d reason=%s", self.client_id, count, reason)

    def forget(self, link: Link) -> None:
        """Stop routing publishes to `link` (idle or given up); a new one opens on demand."""
        if self._links.get(link.address) is link:
            del self._links[link.address]

    def wanted(self, topic: str) -> bool:
        """Whether `topic` matches one of our subscriptions."""
        # amqtt 0.12 pushes retained messages for *other* clients' filters to every client
        # that connects, so a message is not necessarily one we asked for.
        return topic in self._patterns or any(topic_matches(p, topic) for p in self._patterns)

    # -- internals ---------------------------------------------------------------------------

    async def _run(self, home: Link) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start(home)
                await self._stop.wait()
                if self._aborting:
                    # The links see their sockets die and end on their own; don't cancel them
                    # mid-way or aiomqtt would try a graceful DISCONNECT.
                    tasks = [
                        link.task
                        for link in self._running
                        if link.task is not None and link.client is not None
                    ]
                    if tasks:
                        await asyncio.wait(tasks, timeout=1.0)
                for link in list(self._running):
                    if link.task is not None:
                        link.task.cancel()
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._failure = exc
            raise
        finally:
            self._tg = None
            self._finish()

    def _start(self, link: Link) -> None:
        assert self._tg is not None
        self._running.add(link)
        link.task = self._tg.create_task(self._supervise(link), name=f"mqtt-link:{link.address}")

    async def _supervise(self, link: Link) -> None:
        try:
            await link.run()
        finally:
            self._running.discard(link)
            self.forget(link)
            self.dropped(link.clear(), "transport closed before they were delivered")

    def _open_link(self, address: BrokerAddress) -> Link:
        if self._tg is None:
            raise TransportError(f"{self.client_id}: transport is not running")
        # Remote links carry the will too: when this node dies, every broker it was connected
        # to announces it, so peers on per-node embedded brokers see the crash at once.
        link = self._link(address, f"{self.client_id}-out", home=False)
        self._links[address] = link
        self._start(link)
        return link

    def _link(self, address: BrokerAddress, identifier: str, *, home: bool) -> Link:
        return Link(
            self,
            address,
            identifier,
            options=self.options,
            stats=self.stats,
            stop=self._stop,
            home=home,
            will=self._will,
        )

    def _home_client(self) -> aiomqtt.Client | None:
        home = self._home_link
        if home is None or not home.connected.is_set():
            return None
        return home.client

    async def _wait_runner(self) -> None:
        if self._runner is not None:
            done, _ = await asyncio.wait({self._runner}, timeout=self.options.close_timeout)
            if not done:
                # A connection that does not end (a broker that died mid-handshake, aiomqtt
                # waiting for a DISCONNECT to go out): cut everything; cancel, not wait.
                log.warning("closing client=%s: connections did not end in time", self.client_id)
                self._runner.cancel()
                await asyncio.wait({self._runner}, timeout=self.options.close_timeout)
                if not self._runner.done():
                    log.error("closing client=%s: abandoned its connections", self.client_id)
                    self._finish()
                    return
            if not self._runner.cancelled() and self._runner.exception() is not None:
                raise TransportError(
                    f"{self.client_id}: transport failed"
                ) from self._runner.exception()

    def _finish(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        self._links.clear()
        self._inbox.close()
