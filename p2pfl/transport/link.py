"""One supervised connection from an `MqttTransport` to one broker, and its outgoing queue
(an `Outbox`, p2pfl.transport.outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Sequence
from typing import Protocol, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from p2pfl.transport.address import BrokerAddress
from p2pfl.transport.base import Message, TransportStats
from p2pfl.transport.options import MqttOptions
from p2pfl.transport.outbox import Outbox, Outgoing

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a broken connection raises: aiomqtt wraps most errors, but aiomqtt's graceful
# disconnect may re-raise the socket error that broke the connection.
_CONNECTION_ERRORS = (aiomqtt.MqttError, OSError)
# CONNACK refusals no retry fixes: bad user name or password, not authorized (MQTT 3.1.1, 5).
_REFUSED_FOR_GOOD = frozenset({4, 5, 134, 135})


def is_hopeless(error: BaseException | None) -> bool:
    """Whether a failed connection is a configuration error rather than a broker not up yet.

    aiomqtt re-raises socket and TLS errors as a plain MqttError, keeping the original in the
    exception's context.
    """
    while error is not None:
        if isinstance(error, ssl.SSLCertVerificationError):
            return True
        if isinstance(error, MqttConnectError):
            rc = error.rc
            return (rc.value if isinstance(rc, ReasonCode) else rc) in _REFUSED_FOR_GOOD
        error = error.__cause__ or error.__context__
    return False


class _LinkIdle(Exception):
    """A remote link had nothing to send for `link_idle` seconds."""


class LinkOwner(Protocol):
    """What a `Link` asks of the transport that owns it (`MqttTransport`)."""

    @property
    def patterns(self) -> list[str]:
        """The topic filters to subscribe to on the home broker, after every (re)connection."""
        ...

    def deliver(self, message: Message) -> None:
        """Take a message received on the home broker (the owner drops unwanted ones)."""
        ...

    def dropped(self, count: int, reason: str) -> None:
        """Count `count` messages this link lost, for `reason`."""
        ...

    def forget(self, link: Link) -> None:
        """Stop routing publishes to `link`: it went idle or gave up on its broker."""
        ...


class Link:
    """Connects to one broker again and again until stopped, and sends its outbox there.

    `stop` is the owner's closing signal: once set, the link stops reconnecting. `stats` is the
    owner's counters, which the link adds its publishes and reconnects to.
    """

    def __init__(
        self,
        owner: LinkOwner,
        address: BrokerAddress,
        identifier: str,
        *,
        options: MqttOptions,
        stats: TransportStats,
        stop: asyncio.Event,
        home: bool,
        will: Message | None,
    ) -> None:
        opts = self.options = options
        self.owner = owner
        self.stats = stats
        self._stop = stop
        self.killed = False
        self.address = address
        self.identifier = identifier
        self.home = home
        self.will = will
        self.outbox = Outbox(opts.max_queued_messages, opts.max_queued_bytes)
        self.inflight: dict[int, Outgoing] = {}
        self.inflight_bytes = 0
        self.connected = asyncio.Event()
        self.down = asyncio.Event()
        self.down.set()
        self.drained = asyncio.Event()
        self.drained.set()
        self.client: aiomqtt.Client | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_error: BaseException | None = None
        # Set when a first connection fails in a way no retry can fix (untrusted certificate,
        # refused credentials), so that connect() reports it at once instead of at its timeout.
        self.hopeless = asyncio.Event()

    def __repr__(self) -> str:
        return f"Link({self.identifier!r} -> {self.address.uri})"

    def enqueue(self, item: Outgoing) -> bool:
        """Queue `item` for sending; False when the outbox is full."""
        if not self.outbox.put(item):
            return False
        self.drained.clear()
        return True

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker."""
        return len(self.outbox) + len(self.inflight)

    def clear(self) -> int:
        """Forget every pending message; returns how many there were."""
        count = self.pending()
        self.outbox.clear()
        self.inflight.clear()
        self.inflight_bytes = 0
        self.drained.set()
        return count

    async def until_down(self, request: Awaitable[T]) -> T | None:
        """Await a request on the current connection; None if the connection breaks first."""
        work = asyncio.ensure_future(request)
        down = asyncio.ensure_future(self.down.wait())
        try:
            await asyncio.wait({work, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
        if work.cancelled():
            return None
        return work.result()

    def kill(self) -> None:
        """Shut the socket down without DISCONNECT, so the broker publishes the will."""
        self.killed = True
        client = self.client
        if client is None:
            return
        # aiomqtt keeps paho's client private; paho's socket() is public API.
        sock = client._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def run(self) -> None:
        """Connect, serve, and reconnect with capped exponential backoff and jitter."""
        opts = self.options
        loop = asyncio.get_running_loop()
        delay = opts.backoff_min
        down_since = loop.time()
        ever_up = False
        while True:
            was_up, idle = await self._connect_once()
            # Checked, not left to cancellation: on Python 3.11 a TaskGroup whose child fails
            # (the broken connection) while the link is cancelled raises the child's error and
            # drops the cancellation, so a closing link would otherwise reconnect forever.
            if idle or self.killed or self._stop.is_set():
                return
            now = loop.time()
            if was_up:
                ever_up = True
                delay = opts.backoff_min
                down_since = now
            elif not ever_up and is_hopeless(self.last_error):
                self.hopeless.set()
            if not self.home and now - down_since >= opts.link_give_up:
                self.owner.forget(self)
                self.owner.dropped(self.clear(), f"broker {self.address.uri} unreachable")
                return
            await self._pause(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, opts.backoff_max)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the owner starts closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _connect_once(self) -> tuple[bool, bool]:
        """One connection's life; returns (whether it came up, whether the link went idle)."""
        opts = self.options
        idle = False
        was_up = False
        error: BaseException | None = None
        try:
            async with self._client() as client, asyncio.TaskGroup() as tg:
                self.client = client
                self.down.clear()
                # The receiver starts first: it notices a broken connection, which cancels
                # a SUBSCRIBE waiting for its SUBACK instead of letting it run into the timeout.
                tg.create_task(self._receive(client))
                if self.home:
                    await self._resubscribe(client)
                was_up = True
                self.connected.set()
                if self.last_error is not None:
                    self.stats.reconnects += 1
                    log.info("reconnected client=%s broker=%s", self.identifier, self.address)
                self.last_error = None
                tg.create_task(self._send(client, tg))
        except* _LinkIdle:
            idle = True
        except* _CONNECTION_ERRORS as group:
            error = group.exceptions[0]
        finally:
            self.connected.clear()
            self.down.set()
            self.client = None
            self._requeue_inflight(opts.max_attempts)
        if error is not None and not self.killed:
            # Each new kind of failure is worth a warning (refused, then not authorised...);
            # the same one again, while the link retries, is not.
            new = self.last_error is None or str(error) != str(self.last_error)
            level = logging.WARNING if was_up or new else logging.DEBUG
            log.log(
                level,
                "broker connection %s client=%s broker=%s error=%s",
                "lost" if was_up else "failed",
                self.identifier,
                self.address,
                error,
            )
            self.last_error = error
        return was_up, idle

    def _client(self) -> aiomqtt.Client:
        opts = self.options
        # The user's credentials go to the broker they were configured for, and nowhere else.
        home = self.home
        username, password = (opts.username, opts.password) if home else (None, None)
        if username is None and opts.login is not None:
            username, password = opts.login(self.address.uri)  # fresh: tokens expire
        tls = None
        if self.address.tls:
            t = opts.tls
            tls = aiomqtt.TLSParameters(
                ca_certs=t.ca if t else None,
                certfile=t.cert if t and home else None,
                keyfile=t.key if t and home else None,
            )
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.identifier,
            username=username,
            password=password,
            will=will,
            clean_session=True,
            timeout=opts.timeout,
            keepalive=opts.keepalive,
            max_inflight_messages=opts.max_inflight,
            tls_params=tls,
        )
        # aiomqtt warns above 10 pending calls; our window is deliberate.
        client.pending_calls_threshold = opts.max_inflight + 8
        return client

    async def _resubscribe(self, client: aiomqtt.Client) -> None:
        # Loop: subscribe() may add filters while we wait for a SUBACK.
        done: set[str] = set()
        while pending := [p for p in self.owner.patterns if p not in done]:
            codes: Sequence[int | ReasonCode] = await client.subscribe([(p, 1) for p in pending])
            for pattern, code in zip(pending, codes, strict=False):
                # MQTT 3.1.1 gives ints in some paho paths, ReasonCode objects in others.
                if code.is_failure if isinstance(code, ReasonCode) else code >= 0x80:
                    log.warning("broker refused subscription filter=%s code=%s", pattern, code)
            done.update(pending)

    async def _receive(self, client: aiomqtt.Client) -> None:
        # Also the link's disconnect detector: the iterator raises MqttError when the
        # connection breaks, which tears the TaskGroup (and the in-flight publishes) down.
        async for m in client.messages:
            if not self.home:
                continue  # a publish-only link; see MqttTransport.wanted
            topic = m.topic.value
            payload = m.payload
            if not isinstance(payload, bytes):
                payload = bytes(payload) if isinstance(payload, bytearray) else b""
            self.owner.deliver(Message(topic, payload, bool(m.retain)))

    async def _send(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        opts = self.options
        window = asyncio.Semaphore(opts.max_inflight)
        while True:
            await window.acquire()
            try:
                item = await self._next(opts.link_idle)
            except BaseException:
                window.release()
                raise
            self.inflight[item.seq] = item
            self.inflight_bytes += len(item.payload)
            tg.create_task(self._send_one(client, item, window))

    async def _next(self, idle_after: float) -> Outgoing:
        if self.home:
            return await self.outbox.get()
        while True:
            try:
                async with asyncio.timeout(idle_after):
                    return await self.outbox.get()
            except TimeoutError:
                if not self.inflight and not self.outbox:
                    # Unroute before any await, so no publish lands in a closing link.
                    self.owner.forget(self)
                    raise _LinkIdle from None

    async def _send_one(
        self, client: aiomqtt.Client, item: Outgoing, window: asyncio.Semaphore
    ) -> None:
        opts = self.options
        size = len(item.payload)
        try:
            # Big payloads queue behind each other in paho's socket buffer: give them time.
            timeout = opts.timeout + self.inflight_bytes / opts.min_rate
            await client.publish(
                item.topic, item.payload, qos=item.qos, retain=item.retain, timeout=timeout
            )
        finally:
            window.release()
        # On failure the item stays in `inflight` and is requeued when the connection ends.
        if self.inflight.pop(item.seq, None) is not None:
            self.inflight_bytes -= size
        stats = self.stats
        stats.published_messages += 1
        stats.published_bytes += size
        if not self.inflight and not self.outbox:
            self.drained.set()

    def _requeue_inflight(self, max_attempts: int) -> None:
        if not self.inflight:
            return
        items = sorted(self.inflight.values(), key=lambda it: it.seq)
        self.inflight.clear()
        self.inflight_bytes = 0
        keep = []
        for item in items:
            item.attempts += 1
            if item.attempts >= max_attempts:
                self.owner.dropped(1, f"no acknowledgement from {self.address.uri} after retries")
            else:
                keep.append(item)
        self.outbox.requeue(keep)
        if not self.outbox:
            self.drained.set()
