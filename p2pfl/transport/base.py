"""The transport seam: a few async primitives every transport implements, and MQTT topic rules.

`MqttTransport` (real brokers) and `MemoryTransport` (the simulator's bus) both implement
`Transport`; the node never knows which one it has.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from p2pfl.transport.address import BrokerAddress

# MQTT's "remaining length" field caps a packet at 268,435,455 bytes; leave room for the header.
MAX_PAYLOAD = 268_435_455 - 65_536 - 8
MAX_INBOX = 10_000
"""Received messages a transport holds for a node that has not read them yet; more are dropped."""
MAX_INBOX_BYTES = 256 * 1024 * 1024
"""Payload bytes of those messages; more are dropped."""


class TransportError(Exception):
    """A transport cannot do what was asked (closed, not connected, broker unreachable)."""


Payload = bytes | bytearray
"""What can be published: the protocol encoder builds a `bytearray` in place, without a copy."""


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT application message; `retain` is set when it came from the retained store."""

    topic: str
    payload: Payload
    retain: bool = False


@dataclass(slots=True)
class TransportStats:
    """Counters of one transport since it was made."""

    published_messages: int = 0
    """Publishes accepted for sending (the broker or bus may still lose them: see `dropped`)."""
    published_bytes: int = 0
    received_messages: int = 0
    """Messages put in the received queue for the node (not those dropped on arrival)."""
    received_bytes: int = 0
    dropped: int = 0
    """Messages lost here, in either direction: a full queue, a broker given up on."""
    reconnects: int = 0


_CLOSED: Final = object()


class ReceivedMessages:
    """Messages a transport received and its node has not read yet, bounded in number and in
    payload bytes (0: no bound); once closed, every reader ends, now and later."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.bytes = 0
        self._queue: asyncio.Queue[Message | object] = asyncio.Queue()

    def put(self, message: Message) -> str | None:
        """Queue `message`; or why not, when it would overflow a bound (the caller drops it)."""
        size = len(message.payload)
        if 0 < self.max_messages <= self._queue.qsize():
            return "inbox is full (the node reads too slowly)"
        if 0 < self.max_bytes < self.bytes + size:
            return "inbox holds too many bytes (the node reads too slowly)"
        self.bytes += size
        self._queue.put_nowait(message)
        return None

    async def get(self) -> Message | None:
        """The next message; None once closed."""
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # later readers end too
            return None
        assert isinstance(item, Message)
        self.bytes -= len(item.payload)
        return item

    def close(self) -> None:
        self._queue.put_nowait(_CLOSED)


class Transport(ABC):
    """Publish/subscribe with MQTT semantics: wildcards, retained messages, a will.

    `MqttTransport` (real brokers) and `MemoryTransport` (the simulator's bus) share this base:
    it checks every topic, filter and payload against MQTT's rules and the payload limit, keeps
    the subscriptions and the bounded queue of received messages; each transport moves the
    bytes (the `_connect`, `_subscribe`, `_unsubscribe` and `_publish` steps).
    """

    def __init__(self, client_id: str, max_inbox: int, max_inbox_bytes: int, max_payload: int):
        self.client_id = client_id
        self.max_payload = max_payload
        self.stats = TransportStats()
        self._inbox = ReceivedMessages(max_inbox, max_inbox_bytes)
        self._patterns: dict[str, None] = {}
        self._will: Message | None = None
        self._state = "new"  # -> (connecting ->) connected -> (closing ->) closed

    @property
    def inbox_bytes(self) -> int:
        """Payload bytes received and not yet taken by `messages()`."""
        return self._inbox.bytes

    async def connect(self, will: Message | None = None) -> None:
        """Connect; `will` is published by the broker if this client vanishes without `close`."""
        if self._state != "new":
            raise TransportError(f"{self.client_id}: connect() called twice")
        if will is not None:
            validate_topic(will.topic)
        self._will = will
        await self._connect()

    async def subscribe(self, pattern: str) -> None:
        """Receive messages whose topic matches `pattern` (MQTT `+`/`#` wildcards)."""
        self._check_open()
        validate_pattern(pattern)
        if pattern not in self._patterns:
            self._patterns[pattern] = None
            await self._subscribe(pattern)

    async def unsubscribe(self, pattern: str) -> None:
        """Stop receiving messages for `pattern`."""
        self._check_open()
        if pattern in self._patterns:
            del self._patterns[pattern]
            await self._unsubscribe(pattern)

    async def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 1,
        retain: bool = False,
        broker: str | None = None,
    ) -> None:
        """Send `payload` to `topic` on `broker` (a URI; None = the home broker)."""
        self._check_open()
        validate_publish(topic, payload, qos, self.max_payload)
        await self._publish(topic, payload, qos, retain, broker)

    async def messages(self) -> AsyncIterator[Message]:
        """Messages for this client's subscriptions; ends when the transport closes."""
        while (message := await self._inbox.get()) is not None:
            yield message

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every message published so far was accepted by its broker (or dropped)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect gracefully: queued messages are flushed and the will is not published."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop the connection abruptly, as a crash would: the broker publishes the will."""

    @abstractmethod
    async def _connect(self) -> None:
        """Connect (with `self._will`), ending in state `connected` or raising TransportError."""

    @abstractmethod
    async def _subscribe(self, pattern: str) -> None:
        """Subscribe to a new, valid `pattern`."""

    @abstractmethod
    async def _unsubscribe(self, pattern: str) -> None:
        """Unsubscribe from `pattern`, which was subscribed."""

    @abstractmethod
    async def _publish(
        self, topic: str, payload: Payload, qos: int, retain: bool, broker: str | None
    ) -> None:
        """Send a publish already checked against MQTT's rules and `max_payload`."""

    def _receive(self, message: Message) -> str | None:
        """Queue a received message and count it; or why not (the caller counts it dropped)."""
        refused = self._inbox.put(message)
        if refused is None:
            self.stats.received_messages += 1
            self.stats.received_bytes += len(message.payload)
        return refused

    def _check_open(self) -> None:
        if self._state != "connected":
            state = "closed" if self._state in ("closing", "closed") else "not connected"
            raise TransportError(f"{self.client_id}: transport is {state}")


TransportFactory = Callable[[str, str], Transport]
"""`(broker URI, client id) -> a Transport not yet connected`: how a component that opens its own
clients (the monitor, one per broker) gets them on MQTT or on the simulator's bus."""


class LocalBroker(ABC):
    """A broker this process starts and owns: `EmbeddedBroker` (amqtt) or `MosquittoBroker`.

    `with` runs `start()`/`close()` here, `async with` in a worker thread.
    """

    host: str
    tls: tuple[str | Path, str | Path] | None
    """(certificate file, key file) of a TLS listener (`mqtts://`)."""
    _port: int
    """0 until started on a free port; then kept across `stop`/`start`."""

    @property
    def uri(self) -> str:
        """`mqtt://host:port` (`mqtts://` with TLS) where it listens (known once started)."""
        return BrokerAddress(self.host, self.port, self.tls is not None).uri

    @property
    def port(self) -> int:
        """The listening port (known once started)."""
        if not self._port:
            raise TransportError(f"{type(self).__name__} has no port until start()")
        return self._port

    @abstractmethod
    def start(self) -> None:
        """Start serving; blocks until connections are accepted."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving; `start` again reuses the same port."""

    @abstractmethod
    def close(self) -> None:
        """Stop and release everything (temporary files)."""

    def restart(self) -> None:
        """Stop, then start on the same port (clients see the broker go away and return)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)


def validate_topic(topic: str) -> None:
    """Raise ValueError unless `topic` is a valid MQTT topic name to publish to."""
    if not topic:
        raise ValueError("MQTT topic must not be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"MQTT topic {topic!r} must not contain wildcards '+' or '#'")
    if "\x00" in topic:
        raise ValueError(f"MQTT topic {topic!r} must not contain NUL")


def validate_publish(topic: str, payload: Payload, qos: int, max_payload: int) -> None:
    """Raise ValueError for a publish no transport may send: a bad topic or QoS, or a payload
    above `max_payload` (the caller must chunk it)."""
    validate_topic(topic)
    if qos not in (0, 1, 2):
        raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos}")
    if len(payload) > max_payload:
        raise ValueError(
            f"payload of {len(payload)} bytes exceeds max_payload={max_payload}; chunk it"
        )


def validate_pattern(pattern: str) -> None:
    """Raise ValueError unless `pattern` is a valid MQTT topic filter."""
    if not pattern:
        raise ValueError("MQTT topic filter must not be empty")
    if "\x00" in pattern:
        raise ValueError(f"MQTT topic filter {pattern!r} must not contain NUL")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"MQTT topic filter {pattern!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"MQTT topic filter {pattern!r}: '+' must be a whole level")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT filter `pattern` (`+` one level, `#` the rest).

    As the MQTT spec says, `a/#` also matches `a`, and a filter starting with a wildcard does
    not match topics starting with `$`. Raises ValueError for an invalid filter.
    """
    validate_pattern(pattern)
    if "+" not in pattern and "#" not in pattern:
        return pattern == topic
    if topic.startswith("$") and pattern[0] in "+#":
        return False
    plevels = pattern.split("/")
    tlevels = topic.split("/")
    for i, level in enumerate(plevels):
        if level == "#":
            return True
        if i >= len(tlevels) or (level != "+" and level != tlevels[i]):
            return False
    return len(plevels) == len(tlevels)
