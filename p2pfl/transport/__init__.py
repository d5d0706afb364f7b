"""Transport: the publish/subscribe seam (`Transport`), MQTT and in-memory implementations,
and brokers a node can start for itself (embedded amqtt, private Mosquitto)."""

from p2pfl.transport.address import BrokerAddress, TlsOptions, parse_broker_uri
from p2pfl.transport.base import (
    LocalBroker,
    Message,
    Transport,
    TransportError,
    TransportFactory,
    TransportStats,
    topic_matches,
)
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.memory import DelayHook, MemoryBus, MemoryTransport
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto
from p2pfl.transport.mqtt import MqttOptions, MqttTransport

__all__ = [
    "BrokerAddress",
    "DelayHook",
    "EmbeddedBroker",
    "LocalBroker",
    "MemoryBus",
    "MemoryTransport",
    "Message",
    "MosquittoBroker",
    "MqttOptions",
    "MqttTransport",
    "TlsOptions",
    "Transport",
    "TransportError",
    "TransportFactory",
    "TransportStats",
    "find_mosquitto",
    "parse_broker_uri",
    "topic_matches",
]
