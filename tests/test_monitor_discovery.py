"""The Monitor on real brokers, with hand-written records (no training): it follows presence
records to other brokers, registers itself with role `monitor`, drops bad records, and leaves
nothing retained behind."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from p2pfl.config import StaticPeer
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.identity import Identity
from p2pfl.monitor.cli import MonitorConfigError, run_monitor
from p2pfl.monitor.monitor import Monitor
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import Envelope, Signer, pack_envelope, unpack_envelope
from p2pfl.transport.base import LocalBroker, Message
from p2pfl.transport.mqtt import MqttOptions, MqttTransport

pytestmark = pytest.mark.timeout(30)

WaitUntil = Callable[..., Awaitable[None]]
# The monitor's: it gives up on a dead broker quickly. The test's own clients wait generously.
FAST = MqttOptions(connect_timeout=1.5, drain_timeout=1.0, backoff_max=0.5)
CLIENT = MqttOptions(connect_timeout=10.0, drain_timeout=10.0, backoff_max=0.5)


@asynccontextmanager
async def client(uri: str, *subscriptions: str) -> AsyncIterator[MqttTransport]:
    transport = MqttTransport(uri, f"test-{uuid.uuid4().hex[:8]}", CLIENT)
    await transport.connect()
    try:
        for pattern in subscriptions:
            await transport.subscribe(pattern)
        yield transport
    finally:
        await transport.close()


@asynccontextmanager
async def running(monitor: Monitor) -> AsyncIterator[Monitor]:
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run_until(stop))
    try:
        yield monitor
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def receive(transport: MqttTransport, count: int, within: float = 10.0) -> list[Message]:
    """The first `count` messages with a payload (an empty one deletes a retained message)."""
    out: list[Message] = []
    async with asyncio.timeout(within):
        async for message in transport.messages():
            if message.payload:
                out.append(message)
                if len(out) == count:
                    break
    return out


async def drain(transport: MqttTransport, within: float) -> list[Message]:
    """Every message that arrives within `within` seconds."""
    out: list[Message] = []
    try:
        async with asyncio.timeout(within):
            async for message in transport.messages():
                out.append(message)
    except TimeoutError:
        pass
    return out


# Each fake node signs with its own key, as a node does; the monitor verifies.
KEYS: dict[str, Identity] = collections.defaultdict(Identity.generate)


def presence(net: str, node_id: str, broker: str, *, online: bool = True) -> bytes:
    return encode_presence(
        net, node_id, 1, online=online, role="trainer", broker=broker, round=3,
        signer=KEYS[node_id],
    )  # fmt: skip


def forged(net: str, node_id: str, seq: int, body: dict[str, Any], signer: Signer | None) -> bytes:
    """A telemetry envelope around any body, well-formed or not."""
    env = Envelope.create("telemetry", body, net=net, src=node_id, seq=seq)
    return bytes(pack_envelope(env, signer))


def telemetry(net: str, node_id: str, broker: str, **fields: object) -> bytes:
    body = {"id": node_id, "role": "trainer", "broker": broker, "round": 4, **fields}
    return forged(net, node_id, 1, body, KEYS[node_id])


async def test_the_monitor_follows_presence_records_to_other_brokers(
    make_broker: Callable[[str], LocalBroker], wait_until: WaitUntil
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"
    a, b = make_broker("mosquitto"), make_broker("mosquitto")
    monitor = Monitor(net, brokers=[a.uri], use_mdns=False, options=FAST)
    async with client(a.uri) as on_a, client(b.uri) as on_b:
        # x lives on broker b; a only carries x's presence (as a node announcing itself to a
        # peer's broker does). Its telemetry is on b alone.
        await on_a.publish(topics.presence(net, "x"), presence(net, "x", b.uri), retain=True)
        await on_b.publish(
            topics.telemetry(net, "x"),
            telemetry(net, "x", b.uri, accuracy=0.5, confusion=[[1, 1], [0, 2]]),
            retain=True,
        )
        await on_a.flush()
        await on_b.flush()
        async with running(monitor):
            await wait_until(lambda: monitor.brokers == sorted([a.uri, b.uri]), within=10)
            await wait_until(lambda: monitor.settled(), within=10)
            snap = monitor.snapshot()
            assert [(n["id"], n["round"], n["accuracy"]) for n in snap["nodes"]] == [("x", 4, 0.5)]
            assert snap["global"]["accuracy"] == 0.75
            assert monitor.expected == {"x"}
            # A live update on b arrives too; a record from another network is ignored.
            await on_b.publish(topics.telemetry(net, "x"), telemetry(net, "x", b.uri, round=5))
            await on_b.publish(topics.telemetry("other", "z"), telemetry("other", "z", b.uri))
            await wait_until(lambda: monitor.snapshot()["nodes"][0]["round"] == 5, within=10)
            assert [n["id"] for n in monitor.snapshot()["nodes"]] == ["x"]


async def test_bad_records_are_counted_and_dropped(
    mosquitto: LocalBroker, wait_until: WaitUntil
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"
    monitor = Monitor(net, brokers=[mosquitto.uri], use_mdns=False, options=FAST)
    async with running(monitor), client(mosquitto.uri) as pub:
        await wait_until(lambda: monitor.brokers == [mosquitto.uri], within=10)
        await pub.publish(topics.telemetry(net, "y"), b"\x00garbage")
        # Someone else's telemetry on y's topic: the sender does not match the topic.
        await pub.publish(topics.telemetry(net, "y"), telemetry(net, "z", mosquitto.uri))
        await pub.publish(
            topics.telemetry(net, "y"), telemetry(net, "y", mosquitto.uri, confusion=[[1], [2]])
        )
        await pub.publish(topics.log(net, "y"), telemetry(net, "y", mosquitto.uri))
        await pub.publish(topics.telemetry(net, "ok"), telemetry(net, "ok", mosquitto.uri))
        await wait_until(lambda: "ok" in monitor.state, within=10)
        snap = monitor.snapshot()
        assert [n["id"] for n in snap["nodes"]] == ["ok"]
        assert snap["rejected"] == {"log": 1, "telemetry": 3}


async def test_the_monitor_registers_as_a_monitor_and_leaves_nothing_retained(
    mosquitto: LocalBroker, wait_until: WaitUntil
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"
    monitor = Monitor(
        net,
        peers=[StaticPeer(id="s", broker=mosquitto.uri)],
        use_mdns=False,
        options=FAST,
    )
    async with client(mosquitto.uri, topics.presence_all(net)) as watcher:
        async with running(monitor):
            await wait_until(lambda: monitor.brokers == [mosquitto.uri], within=10)
            assert monitor.expected == {"s"} and not monitor.settled()  # s has not reported
        # Its hello and its bye (however long they take), and nothing after them.
        got = await receive(watcher, 2) + await drain(watcher, 0.5)
        records = [parse_presence(unpack_envelope(m.payload)) for m in got if m.payload]
    assert [(r.node_id, r.role, r.online, r.broker) for r in records] == [
        (monitor.monitor_id, "monitor", True, ""),
        (monitor.monitor_id, "monitor", False, ""),
    ]
    async with client(mosquitto.uri, topics.presence_all(net)) as late:
        assert await drain(late, 0.5) == []


async def test_a_broker_down_at_start_does_not_stop_the_monitor_and_is_retried(
    make_broker: Callable[[str], LocalBroker], wait_until: WaitUntil
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"
    up, late = make_broker("mosquitto"), make_broker("mosquitto")
    late.stop()
    monitor = Monitor(net, brokers=[up.uri, late.uri], use_mdns=False, options=FAST)
    async with running(monitor):
        await wait_until(lambda: monitor.brokers == [up.uri], within=10)
        await wait_until(lambda: monitor.settled(), within=10)  # gave up on the dead one
        late.start()  # same port
        await wait_until(lambda: monitor.brokers == sorted([up.uri, late.uri]), within=15)


def test_an_invalid_broker_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="invalid broker URI"):
        Monitor("net", brokers=["tcp://nowhere"], use_mdns=False)


def test_once_json_prints_a_snapshot_and_writes_the_export_and_the_plot(
    mosquitto: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"

    async def publish() -> None:
        async with client(mosquitto.uri) as pub:
            for node_id, confusion in (("p", [[2, 0], [0, 2]]), ("q", [[1, 1], [1, 1]])):
                # Presence makes them expected, so the monitor stops waiting once both reported.
                await pub.publish(
                    topics.presence(net, node_id),
                    presence(net, node_id, mosquitto.uri),
                    retain=True,
                )
                await pub.publish(
                    topics.telemetry(net, node_id),
                    telemetry(net, node_id, mosquitto.uri, confusion=confusion, sent_to=["p"]),
                    retain=True,
                )
            await pub.flush()

    asyncio.run(publish())
    export, plot = tmp_path / "snap.jsonl", tmp_path / "acc.png"
    code = run_monitor(
        net, [mosquitto.uri], once=True, json_out=True, export=export, plot=plot, wait=30.0,
        mdns=False,
    )  # fmt: skip
    assert code == 0
    snap = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in snap["nodes"]] == ["p", "q"]
    assert snap["global"]["accuracy"] == 0.75 and snap["overlay"] == [["p", "p"], ["q", "p"]]
    assert [json.loads(line)["global"] for line in export.read_text().splitlines()] == [
        snap["global"]
    ]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bad_options_are_refused_before_anything_starts() -> None:
    with pytest.raises(MonitorConfigError, match="ID=mqtt"):
        run_monitor("net", peers=["no-equals-sign"], once=True, mdns=False)
    with pytest.raises(MonitorConfigError, match="--wait"):
        run_monitor("net", once=True, wait=-1, mdns=False)


async def test_ghosts_do_not_enter_the_global_metrics(
    mosquitto: LocalBroker, wait_until: WaitUntil
) -> None:
    """An attacker's telemetry: unsigned ghosts, and an impostor signing for a real node's id
    with its own key. Neither is shown, and neither counts in the global accuracy."""
    net = f"m{uuid.uuid4().hex[:6]}"
    monitor = Monitor(net, brokers=[mosquitto.uri], use_mdns=False, options=FAST)
    perfect = [[10, 0], [0, 10]]
    async with client(mosquitto.uri) as real, client(mosquitto.uri) as attacker:
        mine = telemetry(net, "x", mosquitto.uri, confusion=[[1, 1], [1, 1]])
        await real.publish(topics.telemetry(net, "x"), mine, retain=True)
        async with running(monitor):
            await wait_until(lambda: [n["id"] for n in monitor.snapshot()["nodes"]] == ["x"])
            for i in range(5):
                body = {"id": f"ghost{i}", "role": "trainer", "round": 9, "confusion": perfect}
                await attacker.publish(
                    topics.telemetry(net, f"ghost{i}"),
                    forged(net, f"ghost{i}", 1, body, None),  # unsigned
                )
            impostor = Identity.generate()
            body = {"id": "x", "role": "trainer", "round": 9, "confusion": perfect}
            await attacker.publish(topics.telemetry(net, "x"), forged(net, "x", 2, body, impostor))
            await wait_until(lambda: sum(monitor.state.rejected.values()) >= 6)
            snap = monitor.snapshot()
            assert [n["id"] for n in snap["nodes"]] == ["x"]
            assert snap["global"]["accuracy"] == 0.5
            assert monitor.state.rejected["unsigned"] == 5
            assert monitor.state.rejected["untrusted"] == 1
