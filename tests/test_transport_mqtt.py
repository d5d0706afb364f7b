"""MqttTransport against real brokers, Mosquitto (child process) and the embedded amqtt: what only
MQTT does (remote-broker links, outbox, TLS, broker limits). What every transport does is in
test_transport_contract.py."""

from __future__ import annotations

import ast
import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

import p2pfl.transport as transport_package
from p2pfl.transport.address import TlsOptions
from p2pfl.transport.base import LocalBroker, Message, Transport, TransportError
from p2pfl.transport.link import is_hopeless
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto, free_port
from p2pfl.transport.mqtt import MqttOptions, MqttTransport
from tests.receiving import receive

pytestmark = pytest.mark.timeout(30)

# Generous connect and drain bounds: a loaded machine is slow, and a test that waits them out
# (nothing reachable, nothing to flush) sets its own.
FAST = MqttOptions(backoff_min=0.05, backoff_max=0.3, connect_timeout=10.0, drain_timeout=10.0)
WaitUntil = Callable[..., Awaitable[None]]


@pytest.fixture
async def transports() -> AsyncIterator[Callable[..., Awaitable[MqttTransport]]]:
    """Factory for connected transports; every one is closed after the test."""
    made: list[MqttTransport] = []

    async def make(
        uri: str, cid: str, will: Message | None = None, options: MqttOptions = FAST
    ) -> MqttTransport:
        t = MqttTransport(uri, cid, options)
        made.append(t)
        await t.connect(will)
        return t

    yield make
    for t in made:
        await t.close()


def test_implements_the_transport_seam() -> None:
    assert isinstance(MqttTransport("mqtt://127.0.0.1:1", "x"), Transport)


async def test_publish_to_a_second_broker(make_broker, broker: LocalBroker, transports) -> None:
    other = make_broker("embedded")
    a = await transports(broker.uri, "a")  # home: broker
    c = await transports(other.uri, "c")  # home: other
    await c.subscribe("net/node/c/inbox")
    await a.publish("net/node/c/inbox", b"model", broker=other.uri)
    assert await receive(c) == [Message("net/node/c/inbox", b"model")]
    await a.publish("net/node/c/inbox", b"again", broker=other.uri)  # reuses the link
    assert await receive(c) == [Message("net/node/c/inbox", b"again")]


async def test_amqtt_foreign_retained_messages_are_filtered(
    broker: LocalBroker, transports
) -> None:
    # amqtt pushes retained messages matching any client's filter to each new client.
    a = await transports(broker.uri, "a")
    await a.subscribe("net/presence/+")
    await a.publish("net/presence/a", b"online", retain=True)
    await receive(a)  # stored now
    b = await transports(broker.uri, "b")
    await b.subscribe("net/telemetry/+")
    await a.publish("net/telemetry/a", b"t")
    assert await receive(b) == [Message("net/telemetry/a", b"t")]


async def test_full_outbox_drops_and_counts(mosquitto: LocalBroker, transports, wait_until) -> None:
    options = MqttOptions(
        backoff_min=0.05, backoff_max=0.3, max_queued_messages=2, drain_timeout=0.2
    )
    t = await transports(mosquitto.uri, "t", options=options)
    mosquitto.stop()
    await wait_until(lambda: not t.connected)
    for _ in range(5):
        await t.publish("x", b".")
    assert t.stats.dropped == 3
    await t.close()  # the two queued ones cannot be flushed either
    assert t.stats.dropped == 5


async def test_unreachable_remote_broker_gives_up_and_counts(
    mosquitto: LocalBroker, transports, wait_until: WaitUntil
) -> None:
    options = MqttOptions(backoff_min=0.05, backoff_max=0.1, link_give_up=0.3)
    t = await transports(mosquitto.uri, "t", options=options)
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    await t.publish("net/node/z/inbox", b"lost", broker=nowhere)
    await t.publish("net/node/z/inbox", b"lost", broker=nowhere)
    await wait_until(lambda: t.stats.dropped >= 2)
    assert t.stats.dropped == 2
    assert t.stats.published_messages == 0


async def test_idle_remote_link_closes_and_reopens(
    make_broker, mosquitto: LocalBroker, transports, wait_until: WaitUntil
) -> None:
    other = make_broker("mosquitto")
    c = await transports(other.uri, "c")
    await c.subscribe("in")
    t = await transports(mosquitto.uri, "t", options=MqttOptions(link_idle=0.2))
    await t.publish("in", b"1", broker=other.uri)
    assert t.brokers == [mosquitto.uri, other.uri]
    assert (await receive(c))[0].payload == b"1"
    await wait_until(lambda: t.brokers == [mosquitto.uri])  # idle: closed
    await t.publish("in", b"2", broker=other.uri)
    assert (await receive(c))[0].payload == b"2"


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
async def test_a_publish_above_the_brokers_packet_limit_is_dropped_and_counted(
    transports, wait_until: WaitUntil
) -> None:
    """Mosquitto cuts a client that sends a packet above its `max_packet_size`: the transport
    retries it `max_attempts` times, then drops and counts it, and goes on working. (The node
    keeps its `max_payload` below its broker's limit so that this does not happen.)"""
    with MosquittoBroker(max_packet_size=64 * 1024) as small:
        options = MqttOptions(backoff_min=0.05, backoff_max=0.1, max_attempts=3)
        t = await transports(small.uri, "t", options=options)
        await t.subscribe("x")
        await t.publish("x", bytes(100_000))
        await wait_until(lambda: t.stats.dropped == 1, within=20)
        assert t.stats.reconnects >= 2  # each attempt broke the connection; it came back
        await t.publish("x", b"small")
        assert await receive(t) == [Message("x", b"small")]
        await t.close()


async def test_connect_to_nothing_raises() -> None:
    t = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "t", MqttOptions(connect_timeout=0.5))
    with pytest.raises(TransportError, match="cannot connect"):
        await t.connect()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("x", b"")


async def test_abort_is_prompt_while_reconnecting(
    mosquitto: LocalBroker, wait_until: WaitUntil
) -> None:
    t = MqttTransport(mosquitto.uri, "t", FAST)
    await t.connect()
    await t.publish("x", b"1", broker=f"mqtt://127.0.0.1:{free_port()}")  # never reachable
    mosquitto.stop()
    await wait_until(lambda: not t.connected)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await t.abort()
    assert loop.time() - start < 0.9  # no link waits for a connection that is not there
    assert t.stats.dropped == 1
    assert [m async for m in t.messages()] == []


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=p2pfl-test-ca",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not found")
async def test_mqtts_with_a_private_ca(tmp_path: Path, transports) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    ca, cert, key = await asyncio.to_thread(_make_certs, tmp_path)
    options = MqttOptions(tls=TlsOptions(ca=str(ca)), connect_timeout=5.0)
    with MosquittoBroker(tls=(str(cert), str(key))) as secure:
        assert secure.uri.startswith("mqtts://")
        a = await transports(secure.uri, "a", options=options)
        await a.subscribe("s")
        await a.publish("s", b"secret")
        assert await receive(a) == [Message("s", b"secret")]
        await a.close()
        # Without our CA the server certificate is not trusted: no retry can fix that, so
        # connect() says so at once instead of retrying until its (here very long) timeout.
        with pytest.raises(TransportError, match="certificate verify failed"):
            async with asyncio.timeout(30):
                await transports(secure.uri, "b", options=MqttOptions(connect_timeout=600.0))


async def test_flush_waits_for_acknowledgements(broker: LocalBroker, transports) -> None:
    a = await transports(broker.uri, "a")
    for _ in range(20):
        await a.publish("x", bytes(100_000))
    assert a.stats.published_messages < 20  # publish only queues
    async with asyncio.timeout(10):
        await a.flush()
    assert a.stats.published_messages == 20
    assert a.stats.published_bytes == 2_000_000


def test_only_configuration_errors_stop_the_first_connect_early() -> None:
    def wrapped(inner: BaseException) -> aiomqtt.MqttError:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise aiomqtt.MqttError(str(exc)) from None  # as aiomqtt does
        except aiomqtt.MqttError as outer:
            return outer

    untrusted = ssl.SSLCertVerificationError("certificate verify failed")
    assert is_hopeless(wrapped(untrusted))
    assert is_hopeless(MqttConnectError(4)) and is_hopeless(MqttConnectError(5))
    assert is_hopeless(MqttConnectError(ReasonCode(2, identifier=135)))  # MQTT 5: not authorized
    assert not is_hopeless(MqttConnectError(3))  # server unavailable: try again later
    assert not is_hopeless(wrapped(ConnectionRefusedError(111, "Connection refused")))
    assert not is_hopeless(None)


async def test_close_does_not_wait_on_a_broker_that_died(
    broker: LocalBroker, wait_until: WaitUntil
) -> None:
    """A node stopping as its broker dies (a machine shutdown) must not wait out the drain."""
    patient = MqttOptions(backoff_min=0.05, backoff_max=0.3, drain_timeout=120.0)
    t = MqttTransport(broker.uri, "t", patient)
    await t.connect()
    broker.stop()
    await wait_until(lambda: not t.connected)
    await t.publish("net/presence/t", b"bye")  # queued for a broker that is gone
    async with asyncio.timeout(30):  # far below the drain timeout
        await t.close()
    assert t.stats.dropped == 1
    assert [m async for m in t.messages()] == []


def _transport_imports() -> dict[str, set[str]]:
    """Each module of p2pfl.transport -> the p2pfl.transport modules it imports (even lazily)."""
    folder = Path(transport_package.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        name = f"p2pfl.transport.{path.stem}"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
    package = "p2pfl.transport"
    return {m: {i for i in deps if i.startswith(package + ".")} for m, deps in graph.items()}


def test_transport_modules_import_without_cycles() -> None:
    """A link talks to its transport through `LinkOwner`; it does not import `mqtt`."""
    graph = _transport_imports()
    assert "p2pfl.transport.mqtt" not in graph["p2pfl.transport.link"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
