"""The brokers a node can start for itself: embedded amqtt and a private Mosquitto."""

from __future__ import annotations

import socket

import pytest

from p2pfl.transport.base import LocalBroker, TransportError
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto, mqtt_ping

pytestmark = pytest.mark.timeout(30)

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_fixture_broker_listens_and_restarts_on_the_same_port(broker: LocalBroker) -> None:
    port = broker.port
    assert broker.uri == f"mqtt://127.0.0.1:{port}"
    assert mqtt_ping("127.0.0.1", port)  # a real MQTT CONNACK, not just an open port
    broker.stop()
    assert not accepts(port)
    broker.start()
    assert broker.port == port
    assert accepts(port)
    broker.restart()
    assert mqtt_ping("127.0.0.1", port)


async def test_async_context_managers_start_and_stop() -> None:
    brokers: list[LocalBroker] = [EmbeddedBroker()]
    if find_mosquitto() is not None:
        brokers.append(MosquittoBroker())
    for b in brokers:
        async with b as running:
            port = running.port
            assert accepts(port)
        assert not accepts(port)


def test_embedded_broker_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(TransportError, match="failed to start"):
            EmbeddedBroker(port=busy.getsockname()[1]).start()


@needs_mosquitto
def test_mosquitto_reports_a_busy_port_with_its_log() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(TransportError, match="mosquitto exited"):
            MosquittoBroker(port=busy.getsockname()[1]).start()


def test_mosquitto_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(TransportError, match="cannot run mosquitto"):
        MosquittoBroker(binary="/nonexistent/mosquitto").start()


def test_port_is_unknown_before_start() -> None:
    with pytest.raises(TransportError, match="until start"):
        _ = EmbeddedBroker().port
    with pytest.raises(ValueError, match="IPv4"):
        EmbeddedBroker(host="::1")
