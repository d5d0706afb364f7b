"""In-process transport with MQTT semantics, for the simulator and for tests.

A `MemoryBus` plays the broker of one simulated network: it matches topics against a trie of
subscriptions, keeps retained messages, and publishes a client's will when the client aborts.
Payloads are never copied: every subscriber receives the same immutable `Message`.

Each client enforces the limits an `MqttTransport` enforces, with the same defaults: a payload
above `max_payload` is refused (the caller chunks it), and a client whose node reads too slowly
drops, and counts, what would overflow `max_inbox` messages or `max_inbox_bytes` bytes.
`tests/test_transport_contract.py` runs the same behaviour tests over this bus and real brokers.
Where brokers differ the bus is strict: a second client with an id already connected is refused
(Mosquitto disconnects the first, amqtt keeps both), and a message matching several filters of
one client reaches it once (as on Mosquitto).

The bus's `delay` hook, `(src_id, dst_id, payload_len) -> seconds | None`, lets a network model
delay a delivery (scheduled with `loop.call_later`, no task per message) or drop it (None).
Whatever the delays, one sender's messages reach one receiver in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from p2pfl.transport.base import (
    MAX_INBOX,
    MAX_INBOX_BYTES,
    MAX_PAYLOAD,
    Message,
    Payload,
    Transport,
    TransportError,
    topic_matches,
)

log = logging.getLogger(__name__)

DelayHook = Callable[[str, str, int], float | None]
"""`(src_id, dst_id, payload_len) -> delay in seconds`, or None to drop the message."""


class _TrieNode:
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        # A dict, not a set: delivery order must not depend on hashing, so runs are reproducible.
        self.subscribers: dict[MemoryTransport, None] = {}


class MemoryBus:
    """The broker of one simulated network: subscriptions, retained messages, wills."""

    def __init__(self, delay: DelayHook | None = None) -> None:
        self.delay = delay
        self._root = _TrieNode()
        self._retained: dict[str, tuple[Message, str]] = {}
        self._clients: dict[str, MemoryTransport] = {}
        # Messages the delay hook holds back, per (sender id, receiver): oldest first.
        self._in_flight: dict[tuple[str, MemoryTransport], deque[Message]] = {}

    @property
    def clients(self) -> list[str]:
        """Ids of the connected clients."""
        return list(self._clients)

    def retained(self, topic: str) -> Payload | None:
        """The retained payload on `topic`, if any."""
        entry = self._retained.get(topic)
        return entry[0].payload if entry else None

    def _attach(self, client: MemoryTransport) -> None:
        if client.client_id in self._clients:
            raise TransportError(f"client id {client.client_id!r} is already connected")
        self._clients[client.client_id] = client

    def _detach(self, client: MemoryTransport) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]
        for pattern in list(client._patterns):
            self._unsubscribe(pattern, client)

    def _subscribe(self, pattern: str, client: MemoryTransport) -> None:
        node = self._root
        for level in pattern.split("/"):
            node = node.children.setdefault(level, _TrieNode())
        node.subscribers[client] = None
        if "+" not in pattern and "#" not in pattern:
            # one topic (a sampled node watching a view member): no scan of every retained one
            retained = self._retained.get(pattern)
            if retained is not None:
                self._send(retained[1], client, retained[0])
            return
        for topic, (message, src) in self._retained.items():
            if topic_matches(pattern, topic):
                self._send(src, client, message)

    def _unsubscribe(self, pattern: str, client: MemoryTransport) -> None:
        path = [self._root]
        levels = pattern.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].subscribers.pop(client, None)
        # Prune empty branches so that churn does not grow the trie forever.
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def _route(self, src: str, topic: str, payload: Payload, retain: bool) -> int:
        """Deliver to every matching subscriber; returns how many copies the network dropped."""
        if retain:
            if payload:
                self._retained[topic] = (Message(topic, payload, True), src)
            else:
                self._retained.pop(topic, None)
        targets: dict[MemoryTransport, None] = {}
        levels = topic.split("/")
        _collect(self._root, levels, 0, topic.startswith("$"), targets)
        if not targets:
            return 0
        message = Message(topic, payload, False)
        return sum(not self._send(src, dst, message) for dst in targets)

    def _send(self, src: str, dst: MemoryTransport, message: Message) -> bool:
        if self.delay is None:
            dst._deliver(message)
            return True
        seconds = self.delay(src, dst.client_id, len(message.payload))
        if seconds is None:
            return False
        link = (src, dst)
        queue = self._in_flight.get(link)
        if seconds <= 0 and queue is None:
            dst._deliver(message)
            return True
        if queue is None:
            queue = self._in_flight[link] = deque()
        queue.append(message)
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._arrive, link)
        return True

    def _arrive(self, link: tuple[str, MemoryTransport]) -> None:
        # Each delivery timer hands over the link's *oldest* message: timers due microseconds
        # apart may fire in either order, and a link, like MQTT over TCP, must not reorder.
        queue = self._in_flight[link]
        message = queue.popleft()
        if not queue:
            del self._in_flight[link]
        link[1]._deliver(message)


def _collect(
    node: _TrieNode,
    levels: list[str],
    i: int,
    dollar: bool,
    out: dict[MemoryTransport, None],
) -> None:
    # MQTT: a filter starting with a wildcard does not match a topic starting with '$'.
    wild = not (i == 0 and dollar)
    hash_node = node.children.get("#")
    if hash_node is not None and wild:
        out.update(hash_node.subscribers)  # 'a/#' matches 'a' and everything below it
    if i == len(levels):
        out.update(node.subscribers)
        return
    plus = node.children.get("+")
    if plus is not None and wild:
        _collect(plus, levels, i + 1, dollar, out)
    child = node.children.get(levels[i])
    if child is not None:
        _collect(child, levels, i + 1, dollar, out)


class MemoryTransport(Transport):
    """A client of a `MemoryBus`. The `broker` argument of `publish` is ignored.

    The limits are those of `MqttOptions`; 0 means no bound for the inbox ones.
    """

    def __init__(
        self,
        bus: MemoryBus,
        client_id: str,
        *,
        max_inbox: int = MAX_INBOX,
        max_inbox_bytes: int = MAX_INBOX_BYTES,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        super().__init__(client_id, max_inbox, max_inbox_bytes, max_payload)
        self.bus = bus

    def __repr__(self) -> str:
        return f"MemoryTransport({self.client_id!r}, {self._state})"

    async def _connect(self) -> None:
        self.bus._attach(self)
        self._state = "connected"

    async def _subscribe(self, pattern: str) -> None:
        self.bus._subscribe(pattern, self)  # retained messages are delivered at once

    async def _unsubscribe(self, pattern: str) -> None:
        self.bus._unsubscribe(pattern, self)

    async def _publish(
        self, topic: str, payload: Payload, qos: int, retain: bool, broker: str | None
    ) -> None:
        self.stats.published_messages += 1
        self.stats.published_bytes += len(payload)
        self.stats.dropped += self.bus._route(self.client_id, topic, payload, retain)

    async def flush(self) -> None:
        """Nothing to wait for: the bus routes a message during `publish`."""

    async def close(self) -> None:
        """Leave the bus without publishing the will."""
        self._leave()

    async def abort(self) -> None:
        """Leave the bus as a crash would: the bus publishes the will."""
        will, connected = self._will, self._state == "connected"
        self._leave()
        if will is not None and connected:
            self.bus._route(self.client_id, will.topic, will.payload, will.retain)

    def _leave(self) -> None:
        if self._state == "closed":
            return
        if self._state == "connected":
            self.bus._detach(self)
        self._patterns.clear()
        self._state = "closed"
        self._inbox.close()

    def _deliver(self, message: Message) -> None:
        # A delayed delivery may land after this client left; the network lost it.
        if self._state != "connected":
            return
        if self._receive(message) is not None:
            self.stats.dropped += 1
