"""MqttTransport against real brokers: Mosquitto (child process) and the embedded amqtt."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
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
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.link import is_hopeless
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto, free_port
from p2pfl.transport.mqtt import MqttOptions, MqttTransport

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


async def receive(t: MqttTransport, count: int = 1, within: float = 5.0) -> list[Message]:
    out: list[Message] = []
    async with asyncio.timeout(within):
        async for message in t.messages():
            out.append(message)
            if len(out) == count:
                break
    return out


async def collect(t: MqttTransport, seconds: float = 0.3) -> list[Message]:
    """Everything that arrives within `seconds`."""
    out: list[Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in t.messages():
                out.append(message)
    return out


async def nothing_arrives(t: MqttTransport, seconds: float = 0.3) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await anext(t.messages())
    except TimeoutError:
        return True
    return False


def test_implements_the_transport_seam() -> None:
    assert isinstance(MqttTransport("mqtt://127.0.0.1:1", "x"), Transport)


async def test_publish_subscribe_round_trip(broker: LocalBroker, transports) -> None:
    a = await transports(broker.uri, "a")
    b = await transports(broker.uri, "b")
    await b.subscribe("net/node/+/inbox")
    await a.publish("net/node/b/inbox", b"hello")
    await a.publish("net/other", b"not for b")
    await a.publish("net/node/c/inbox", b"for c")
    got = await receive(b, 2)
    assert [(m.topic, m.payload) for m in got] == [
        ("net/node/b/inbox", b"hello"),
        ("net/node/c/inbox", b"for c"),
    ]
    # Stats count acknowledged publishes; the one nobody receives may still await its PUBACK.
    await a.flush()
    assert a.stats.published_messages == 3
    assert b.stats.received_bytes == len(b"hello") + len(b"for c")


async def test_retained_presence_reaches_late_subscriber(broker: LocalBroker, transports) -> None:
    a = await transports(broker.uri, "a")
    await a.subscribe("net/presence/+")
    await a.publish("net/presence/a", b"online", retain=True)
    await a.publish("net/presence/gone", b"online", retain=True)
    await a.publish("net/presence/gone", b"", retain=True)  # an empty retained payload deletes
    # Our own echo proves the broker has processed (and stored) all three.
    assert [m.payload for m in await receive(a, 3)] == [b"online", b"online", b""]
    late = await transports(broker.uri, "late")
    await late.subscribe("net/presence/+")
    got = await receive(late) + await collect(late)  # the first may take a while, then the rest
    assert set(got) == {Message("net/presence/a", b"online", retain=True)}
    # amqtt may send it twice (see p2pfl.transport.embedded); Mosquitto sends it once.
    assert len(got) == 1 or isinstance(broker, EmbeddedBroker)


async def test_will_fires_on_abort_but_not_on_close(broker: LocalBroker, transports) -> None:
    watcher = await transports(broker.uri, "watcher")
    await watcher.subscribe("net/presence/+")
    will = Message("net/presence/x", b"offline", retain=True)

    polite = await transports(broker.uri, "x", will)
    await polite.close()
    assert await nothing_arrives(watcher)

    crashing = await transports(broker.uri, "x", will)
    await crashing.abort()
    assert await receive(watcher) == [Message("net/presence/x", b"offline")]
    # The will was retained, so a newcomer learns that x is offline.
    late = await transports(broker.uri, "late")
    await late.subscribe("net/presence/x")
    assert await receive(late) == [Message("net/presence/x", b"offline", retain=True)]


async def test_five_megabyte_payload_arrives_intact(broker: LocalBroker, transports) -> None:
    a = await transports(broker.uri, "a")
    b = await transports(broker.uri, "b")
    await b.subscribe("big")
    payload = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    await a.publish("big", payload)
    (got,) = await receive(b, within=15)
    assert len(got.payload) == len(payload)
    assert got.payload == payload


async def test_publish_to_a_second_broker(make_broker, broker: LocalBroker, transports) -> None:
    other = make_broker("embedded")
    a = await transports(broker.uri, "a")  # home: broker
    c = await transports(other.uri, "c")  # home: other
    await c.subscribe("net/node/c/inbox")
    await a.publish("net/node/c/inbox", b"model", broker=other.uri)
    assert await receive(c) == [Message("net/node/c/inbox", b"model")]
    await a.publish("net/node/c/inbox", b"again", broker=other.uri)  # reuses the link
    assert await receive(c) == [Message("net/node/c/inbox", b"again")]


async def test_reconnects_resubscribes_and_delivers_queued_messages(
    broker: LocalBroker, transports, wait_until: WaitUntil
) -> None:
    t = await transports(broker.uri, "t")
    await t.subscribe("net/node/t/inbox")
    broker.stop()
    await wait_until(lambda: not t.connected)
    await t.publish("net/node/t/inbox", b"queued while down")  # waits in the outbox
    await asyncio.sleep(0.2)
    await asyncio.to_thread(broker.start)  # same port
    got = await receive(t, within=10)
    assert got == [Message("net/node/t/inbox", b"queued while down")]
    assert t.connected
    assert t.stats.reconnects >= 1
    assert t.stats.dropped == 0


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


async def test_close_flushes_queued_messages(broker: LocalBroker, transports) -> None:
    sink = await transports(broker.uri, "sink")
    await sink.subscribe("x/+")
    a = await transports(broker.uri, "a")
    for i in range(50):
        await a.publish(f"x/{i}", bytes(10_000))
    await a.close()  # without flush() first: close() itself flushes
    assert a.stats.published_messages == 50
    assert a.stats.dropped == 0
    got = await receive(sink, 50)
    assert {m.topic for m in got} == {f"x/{i}" for i in range(50)}


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


async def test_connect_to_nothing_raises() -> None:
    t = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "t", MqttOptions(connect_timeout=0.5))
    with pytest.raises(TransportError, match="cannot connect"):
        await t.connect()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("x", b"")


async def test_closed_transport_refuses_work(mosquitto: LocalBroker, transports) -> None:
    t = await transports(mosquitto.uri, "t")
    await t.close()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("x", b"")
    with pytest.raises(TransportError, match="closed"):
        await t.subscribe("x")
    assert [m async for m in t.messages()] == []


async def test_oversized_payload_and_bad_topic_are_caller_errors(mosquitto, transports) -> None:
    t = await transports(mosquitto.uri, "t", options=MqttOptions(max_payload=10))
    with pytest.raises(ValueError, match="chunk"):
        await t.publish("x", bytes(11))
    with pytest.raises(ValueError, match="wildcards"):
        await t.publish("x/#", b"")


async def test_subscribe_while_down_takes_effect_after_reconnect(
    mosquitto: LocalBroker, transports, wait_until: WaitUntil
) -> None:
    t = await transports(mosquitto.uri, "t")
    mosquitto.stop()
    await wait_until(lambda: not t.connected)
    await t.subscribe("late/x")  # recorded; the broker hears of it after the reconnect
    await asyncio.to_thread(mosquitto.start)
    other = await transports(mosquitto.uri, "other")
    await wait_until(lambda: t.connected)
    await other.publish("late/x", b"now")
    assert await receive(t) == [Message("late/x", b"now")]


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


async def test_inbox_is_bounded_in_bytes(
    broker: LocalBroker, transports, wait_until: WaitUntil
) -> None:
    """A flood at a node that reads too slowly: what would overflow the bytes bound is dropped."""
    bounded = MqttOptions(
        backoff_min=0.05, backoff_max=0.3, drain_timeout=10.0, max_inbox_bytes=1_000_000
    )
    slow = await transports(broker.uri, "slow", options=bounded)
    await slow.subscribe("net/node/slow/inbox")
    flooder = await transports(broker.uri, "flooder")
    queued: list[int] = []

    def all_arrived() -> bool:
        queued.append(slow.inbox_bytes)
        return slow.stats.received_messages + slow.stats.dropped == 20

    for i in range(20):  # 4 MB, far below the message count bound: only bytes can stop it
        await flooder.publish("net/node/slow/inbox", bytes([i]) * 200_000)
    await wait_until(all_arrived, within=20)
    assert slow.stats.received_messages == 5 and slow.stats.dropped == 15
    assert max(queued) <= 1_000_000 and slow.inbox_bytes == 1_000_000
    got = await receive(slow, 5)
    assert {len(m.payload) for m in got} == {200_000}
    assert slow.inbox_bytes == 0  # taken messages no longer count
    await flooder.publish("net/node/slow/inbox", b"room again")
    assert [m.payload for m in await receive(slow)] == [b"room again"]


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
