"""amqtt 0.12 glue for a `BrokerGate`: auth and topic plugins, and a broker with limits.

Imported only by the embedded broker's thread (amqtt takes a while to import). amqtt reads a
whole packet into memory once its header names the length, and keeps every retained message;
`GatedBroker` refuses a packet longer than the gate's limit before reading its body, and keeps
retained messages within the gate's count and byte budget.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from p2pfl.broker_auth import BrokerGate

_ACTIONS = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe", Action.RECEIVE: "receive"}


class GateAuthPlugin(BaseAuthPlugin):
    """Logins checked by the gate (see p2pfl.broker_auth)."""

    @dataclass
    class Config:
        gate: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        gate: BrokerGate = self.config.gate
        password = session.password
        if isinstance(password, bytes | bytearray):
            password = bytes(password).decode("utf-8", "replace")
        will = session.will_topic if session.will_flag else None
        return gate.authenticate(session.username, password, session.client_id or "", will)


class GateTopicPlugin(BaseTopicPlugin):
    """The gate's topic ACL."""

    @dataclass
    class Config:
        gate: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool:
        gate: BrokerGate = self.config.gate
        if gate.open:
            return True
        what = _ACTIONS.get(action)
        if what is None or not topic or session is None:
            return False
        return gate.allowed(session.username, topic, what)  # type: ignore[arg-type]


class _BoundedReader(StreamReaderAdapter):
    """Refuses to read a packet part longer than the gate allows (before allocating it)."""

    def __init__(self, reader: Any, gate: BrokerGate) -> None:
        super().__init__(reader)
        self._gate = gate
        self._cut = False

    async def read(self, n: int = -1) -> bytes:
        if self._cut:  # the stream is mid-packet: amqtt sees an end of stream and hangs up
            raise asyncio.IncompleteReadError(b"", n if n > 0 else None)
        if n > self._gate.max_packet or n < -1:
            self._cut = True
            self._gate.refuse("?", f"oversize packet: {n} bytes")
            raise MQTTError(f"packet larger than {self._gate.max_packet} bytes")
        return await super().read(n)


class GatedBroker(Broker):
    """An amqtt Broker that applies a gate's packet and retained-message limits."""

    def __init__(self, config: dict[str, Any], gate: BrokerGate) -> None:
        super().__init__(config)
        self.gate = gate
        self._retained_bytes = 0

    async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        await self._client_connected(
            listener_name, _BoundedReader(reader, self.gate), StreamWriterAdapter(writer)
        )

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        retained = self._retained_messages
        old = retained.get(topic_name) if topic_name is not None else None
        old_size = len(old.data) if old is not None and old.data else 0
        if data and topic_name is not None:
            grows = len(data) - old_size
            count = len(retained) + (old is None)
            if count > self.gate.max_retained or (
                grows > 0 and self._retained_bytes + grows > self.gate.max_retained_bytes
            ):
                who = source_session.username if source_session is not None else None
                self.gate.refuse(who or "?", f"retained budget full: {topic_name[:120]!r}")
                return
            self._retained_bytes += grows
        elif old is not None:
            self._retained_bytes -= old_size
        await super().retain_message(source_session, topic_name, data, qos)
