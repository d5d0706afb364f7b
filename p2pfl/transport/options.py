"""Settings of an `MqttTransport` and of its links, one per broker (`p2pfl.transport.link`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from p2pfl.transport.address import TlsOptions
from p2pfl.transport.base import MAX_INBOX, MAX_INBOX_BYTES, MAX_PAYLOAD


@dataclass(frozen=True, slots=True)
class MqttOptions:
    """Settings of an `MqttTransport`; the defaults suit a LAN with 1 MiB model chunks.

    ``username``/``password`` and a TLS client certificate are the user's credentials for
    the home broker they configured, and are presented to it only. Every other broker (a
    peer's) is dialled with ``login(uri)`` (user name, password): the node's key-based login
    (p2pfl.broker_auth), or anonymously when None. The home broker gets that login too when
    the user gave no user name.
    """

    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None
    login: Callable[[str], tuple[str, str]] | None = None
    # One connection and one operation.
    timeout: float = 30.0
    """Base timeout of one broker operation (connect, subscribe, publish acknowledgement)."""
    min_rate: float = 1e6
    """Bytes/s a broker is assumed to sustain at worst: a publish may take `len/min_rate` more."""
    connect_timeout: float = 10.0
    """How long `connect()` waits for the home broker before raising TransportError."""
    keepalive: int = 30
    """MQTT keep-alive in seconds (a broker drops a client silent for 1.5 times this)."""
    max_payload: int = MAX_PAYLOAD
    """The largest payload `publish` accepts (bigger ones are the caller's to chunk)."""
    # Reconnecting and giving up.
    backoff_min: float = 0.2
    """The first wait before reconnecting; it doubles (with jitter) up to `backoff_max`."""
    backoff_max: float = 5.0
    max_attempts: int = 5
    """A message in flight over this many broken connections is dropped."""
    link_give_up: float = 60.0
    """A remote broker unreachable for this long: its queued messages are dropped."""
    link_idle: float = 120.0
    """A remote-broker link with nothing to send for this long is closed (reopened on demand)."""
    # Queues, each way.
    max_queued_bytes: int = 256 * 1024 * 1024
    """Payload bytes waiting to go out on one link; more are dropped."""
    max_queued_messages: int = 10_000
    max_inflight: int = 16
    """Publishes awaiting the broker's acknowledgement at once, per link."""
    max_inbox: int = MAX_INBOX
    """Received messages waiting for the node to read them; more are dropped (0: no bound)."""
    max_inbox_bytes: int = MAX_INBOX_BYTES
    """Payload bytes of those waiting messages; more are dropped (0: no bound)."""
    # Closing.
    drain_timeout: float = 5.0
    """How long `close()` waits for queued messages to be acknowledged by brokers still up."""
    close_timeout: float = 3.0
    """How long `close()` then waits for the connections to end before cutting them."""
