"""End-to-end: a `p2pfl run` node under hostile input, a Sybil flood and a broker outage, over
real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from p2pfl.discovery.presence import encode_presence
from p2pfl.identity import Identity
from p2pfl.learning.models import build_model
from p2pfl.protocol import topics
from p2pfl.protocol.codec import encode_tensor, parse_codec
from p2pfl.protocol.envelope import Envelope, pack_envelope
from p2pfl.protocol.model import encode_model, model_digest
from p2pfl.transport.base import LocalBroker
from p2pfl.transport.mosquitto import MosquittoBroker
from tests.nodeproc import NodeProcess, free_ports, run_dir, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

# mDNS stays on loopback in tests (network rule)
FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--interface", "127.0.0.1"]
MAX_MESSAGE = 1_500_000


EVIL = Identity.generate()


def now_seq() -> int:
    return time.time_ns() // 1000


def mlp_weights() -> dict[str, np.ndarray]:
    model = build_model("mlp", (40,), 10)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def nan_model(weights: dict[str, np.ndarray], *, net: str, seq: int) -> bytes:
    """A well-formed model message (right names, shapes, valid digest) carrying a NaN."""
    raw = parse_codec("raw")
    entries = []
    for name, array in weights.items():
        poisoned = array.copy()
        poisoned.flat[0] = np.nan
        entry = encode_tensor(name, np.zeros_like(array), raw)
        entries.append(dataclasses.replace(entry, data=poisoned.tobytes()))
    body = {
        "round": 1,
        "age": 10.0,
        "codec": "raw",
        "tensors": [e.to_wire() for e in entries],
        "digest": model_digest(entries),
    }
    env = Envelope.create("model", body, net=net, src="evil", seq=seq)
    return bytes(pack_envelope(env, EVIL))


def hostile_payloads(net: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    weights = mlp_weights()
    # The attacker signs with a key of its own (any LAN host can make one): under tofu its id
    # gets pinned, so these reach the checks behind the signature. Repeats of older ones are
    # replays.
    seq = now_seq()
    sign = {"src": "evil", "round": 1, "age": 1.0, "signer": EVIL}
    valid = bytes(encode_model(weights, net=net, seq=seq + 1, **sign))  # type: ignore[arg-type]
    wrong_shape = {k: np.zeros((3, 3), np.float32) for k in weights}
    wrong = bytes(encode_model(wrong_shape, net=net, seq=seq + 2, **sign))  # type: ignore[arg-type]
    # Sequence numbers rise in the order the payloads go out: each first copy is new to the
    # victim's replay window (its checks behind it are reached). The repeats that follow are of
    # records older than the last one taken, so each is a replay: a copy of the last one taken
    # (other_net here) would be a duplicate delivery, dropped as harmless and not counted.
    nan = nan_model(weights, net=net, seq=seq + 3)
    other_net = bytes(encode_model(weights, net="other", seq=seq + 4, **sign))  # type: ignore[arg-type]
    payloads: list[bytes] = []
    payloads += [rng.bytes(int(rng.integers(1, 2000))) for _ in range(415)]
    payloads += [valid[: int(rng.integers(1, len(valid) - 1))] for _ in range(300)]
    payloads += [wrong, nan, other_net]
    payloads += [wrong] * 139
    payloads += [nan] * 138
    payloads += [os.urandom(MAX_MESSAGE + 100_000)] * 5  # each costs the sender its connection
    assert len(payloads) == 1000
    return payloads


async def publish_all(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish each payload to ``topic`` anonymously (a shared open broker)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="hostile", timeout=60) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


def presence_of(
    net: str, peer_id: str, key: Identity, broker: str, round: int = 1, seq: int | None = None
) -> bytes:
    """A verified presence record: `peer_id` is a trainer reached at `broker`."""
    return encode_presence(
        net, peer_id, now_seq() if seq is None else seq, online=True, role="trainer",
        broker=broker, round=round, signer=key,
    )  # fmt: skip


def test_a_thousand_malformed_payloads_are_counted_and_change_nothing(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    # A shared open Mosquitto delivers every payload (the embedded broker would refuse the
    # anonymous attacker at CONNECT: tests/test_e2e_attack.py).
    node = NodeProcess(
        "victim",
        ["--id", "victim", "--network", "hostile", "--broker", mosquitto.uri,
         "--state-dir", str(tmp_path / "victim"), "--max-message-size", str(MAX_MESSAGE),
         "--period", "0.2", *FAST],
        tmp_path,
    ).start()  # fmt: skip
    try:
        wait_until(lambda: node.last_round() >= 1, 60, "first round", node.tail)
        before = node.rounds()[-1]
        # "evil" announces itself first (a low seq: its models that follow are not replays),
        # so that its models reach the checks behind the view: layout, NaN, network.
        nowhere = "mqtt://127.0.0.1:1"
        hello = presence_of("hostile", "evil", EVIL, nowhere, seq=1)
        asyncio.run(publish_all(mosquitto.port, topics.presence("hostile", "evil"), [hello]))
        wait_until(lambda: node.rounds()[-1]["peers"] == 1, 30, "evil in the view", node.tail)
        payloads = hostile_payloads("hostile")
        asyncio.run(publish_all(mosquitto.port, topics.inbox("hostile", "victim"), payloads))
        wait_until(lambda: node.rounds()[-1]["rejected"] >= 1000, 60, "1000 rejections", node.tail)
        wait_until(lambda: node.last_round() >= before["round"] + 2, 30, "more rounds", node.tail)
        assert node.alive(), node.tail()
        after = node.rounds()[-1]
        assert after["rejected"] == before["rejected"] + 1000
        # nothing was accepted as a model, so nothing was merged into ours
        assert after["models_received"] == before["models_received"] == 0
        assert all(r["merged"] == 0 for r in node.rounds())
        reasons = after["rejected_by_reason"]
        assert {"layout", "non-finite", "network", "replay", "oversize"} <= set(reasons), reasons
    finally:
        node.stop()
    assert node.proc is not None and node.proc.returncode == 0, node.tail()


def test_a_sybil_flood_neither_takes_the_view_nor_moves_the_round(tmp_path: Path) -> None:
    """100 presence records signed by 100 self-made keys (they verify under tofu), each
    claiming round 10**6, then a model from each at that round: the view takes them only at
    the new-peer rate, and nothing of theirs moves the round or is merged."""
    # A shared open Mosquitto, where anyone may publish anything: the Sybils announce it as
    # their broker too.
    shared = MosquittoBroker(port=0)
    shared.start()
    port = shared.port
    node = NodeProcess(
        "victim",
        ["--id", "victim", "--network", "sybil", "--broker", shared.uri,
         "--state-dir", str(tmp_path / "victim"), "--period", "0.2",
         "--presence-ttl", "60", *FAST],  # a peer is established after 20 s
        tmp_path,
    ).start()  # fmt: skip
    keys = {f"sybil{i:03d}": Identity.generate() for i in range(100)}
    reasons = lambda: node.rounds()[-1]["rejected_by_reason"]  # noqa: E731
    try:
        wait_until(lambda: node.last_round() >= 1, 60, "first round", node.tail)
        started = time.monotonic()

        async def flood() -> None:
            async with aiomqtt.Client("127.0.0.1", port, identifier="sybils") as client:
                for sybil, key in keys.items():
                    record = presence_of("sybil", sybil, key, shared.uri, round=10**6)
                    await client.publish(topics.presence("sybil", sybil), record, qos=1)

        asyncio.run(flood())
        wait_until(
            lambda: node.rounds()[-1]["peers"] + reasons().get("new-peer-rate", 0) == 100,
            30,
            "every record admitted or refused",
            node.tail,
        )
        elapsed = time.monotonic() - started
        peers = node.rounds()[-1]["peers"]
        assert 32 <= peers <= 32 + elapsed / 2 + 1, (peers, elapsed)

        weights = mlp_weights()
        models = [
            bytes(encode_model(weights, net="sybil", src=sybil, seq=now_seq(), round=10**6,
                               age=1.0, signer=key))
            for sybil, key in keys.items()
        ]  # fmt: skip
        asyncio.run(publish_all(port, topics.inbox("sybil", "victim"), models))
        wait_until(
            lambda: reasons().get("future", 0) + reasons().get("unknown-sender", 0) == 100,
            30,
            "every Sybil model refused",
            node.tail,
        )
        assert reasons()["future"] == peers  # in the view, but fresh: the ceiling stays
        assert reasons()["unknown-sender"] == 100 - peers
        mark = node.last_round()
        wait_until(lambda: node.last_round() >= mark + 2, 30, "more rounds", node.tail)
        assert node.alive(), node.tail()
        last = node.rounds()[-1]
        assert last["round"] == last["rounds"], "one round per step: none adopted"
        assert last["models_received"] == 0
        assert all(r["merged"] == 0 for r in node.rounds())
    finally:
        node.stop()
        shared.stop()
    assert node.proc is not None and node.proc.returncode == 0, node.tail()


def test_nodes_ride_out_a_mosquitto_outage(tmp_path: Path) -> None:
    broker = MosquittoBroker(port=0)
    broker.start()
    nodes: list[NodeProcess] = []
    try:
        for i in range(3):
            args = [
                "--id", f"m{i}", "--network", "outage", "--broker", broker.uri,
                "--state-dir", str(tmp_path / f"m{i}"), "--num-partitions", "3",
                "--partition-index", str(i), "--presence-ttl", "30", "--period", "0.3", *FAST,
            ]  # fmt: skip
            nodes.append(NodeProcess(f"m{i}", args, tmp_path).start())
        logs = lambda: "\n".join(n.tail() for n in nodes)  # noqa: E731
        wait_until(lambda: all(n.last_round() >= 2 for n in nodes), 90, "round 2", logs)
        broker.stop()
        marks = {n.name: n.last_round() for n in nodes}
        received = {n.name: n.rounds()[-1]["models_received"] for n in nodes}
        time.sleep(10)  # the outage under test: the nodes must live through 10 s of it
        assert all(n.alive() for n in nodes), logs()
        broker.start()  # same port
        wait_until(
            lambda: all(
                n.last_round() >= marks[n.name] + 3
                and n.rounds()[-1]["models_received"] > received[n.name] + 1
                for n in nodes
            ),
            90,
            "training and gossip to resume",
            logs,
        )
        assert all(n.alive() for n in nodes), logs()

        def links() -> str:  # each node's connection story, without its round lines
            return "\n".join(
                f"{n.name}: {r.get('msg')}"
                for n in nodes
                for r in n.records()
                if r.get("logger", "").startswith("p2pfl.transport")
            )

        wait_until(
            lambda: all(any("reconnected" in r.get("msg", "") for r in n.records()) for n in nodes),
            30,
            "every node to log its reconnection",
            links,
        )
    finally:
        stop_all(nodes)
        broker.stop()
    for n in nodes:
        assert n.proc is not None and n.proc.returncode == 0, n.tail()


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = NodeProcess(
        "solo", ["--id", "solo", "--listen", f"127.0.0.1:{port}", "--state-dir",
                 str(tmp_path / "solo"), *FAST], tmp_path
    ).start()  # fmt: skip
    wait_until(lambda: node.last_round() >= 2, 60, "round 2", node.tail)
    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0, node.tail()
    done = node.done()
    assert done is not None
    ckpts = sorted((run_dir(tmp_path / "solo") / "checkpoints").glob("ckpt-*.npz"))
    assert ckpts and ckpts[-1].name == f"ckpt-{done['round']:06d}.npz"
