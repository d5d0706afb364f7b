"""What a link sends: messages waiting for their publish, in a FIFO bounded by count and bytes."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from p2pfl.transport.base import Payload


class Outgoing:
    """A message waiting for, or in, its publish; `attempts` counts broken connections."""

    __slots__ = ("attempts", "payload", "qos", "retain", "seq", "topic")

    def __init__(self, seq: int, topic: str, payload: Payload, qos: int, retain: bool) -> None:
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.attempts = 0


class Outbox:
    """A FIFO bounded by messages and bytes, whose failed sends go back to the front."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: deque[Outgoing] = deque()
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing) -> bool:
        """Append `item`; False (and nothing queued) when a bound would be exceeded."""
        size = len(item.payload)
        if len(self._items) >= self.max_messages or self.nbytes + size > self.max_bytes:
            return False
        self._items.append(item)
        self.nbytes += size
        self._nonempty.set()
        return True

    def requeue(self, items: Iterable[Outgoing]) -> None:
        """Put `items` (oldest first) back at the front; they were accepted once, so no bound."""
        for item in reversed(list(items)):
            self._items.appendleft(item)
            self.nbytes += len(item.payload)
            self._nonempty.set()

    async def get(self) -> Outgoing:
        """Wait for and remove the oldest item."""
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        item = self._items.popleft()
        self.nbytes -= len(item.payload)
        return item

    def clear(self) -> int:
        """Remove everything; returns how many items were removed."""
        count = len(self._items)
        self._items.clear()
        self.nbytes = 0
        return count
