"""End-to-end: a `p2pfl run` node under hostile input and a broker outage, over real sockets."""

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

from p2pfl.identity import Identity
from p2pfl.learning.models import build_model
from p2pfl.protocol import topics
from p2pfl.protocol.codec import encode_tensor, parse_codec
from p2pfl.protocol.envelope import Envelope, pack_envelope
from p2pfl.protocol.model import encode_model, model_digest
from p2pfl.transport.mosquitto import MosquittoBroker
from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until

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


def nan_model(weights: dict[str, np.ndarray], *, net: str) -> bytes:
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
    env = Envelope.create("model", body, net=net, src="evil", seq=now_seq() + 4)
    return bytes(pack_envelope(env, EVIL))


def hostile_payloads(net: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    weights = mlp_weights()
    # The attacker signs with a key of its own (any LAN host can make one): under tofu its id
    # gets pinned, so these reach the checks behind the signature. Repeats are replays.
    seq = now_seq()
    sign = {"src": "evil", "round": 1, "age": 1.0, "signer": EVIL}
    valid = bytes(encode_model(weights, net=net, seq=seq + 1, **sign))  # type: ignore[arg-type]
    wrong_shape = {k: np.zeros((3, 3), np.float32) for k in weights}
    wrong = bytes(encode_model(wrong_shape, net=net, seq=seq + 2, **sign))  # type: ignore[arg-type]
    other_net = bytes(encode_model(weights, net="other", seq=seq + 3, **sign))  # type: ignore[arg-type]
    nan = nan_model(weights, net=net)
    payloads: list[bytes] = []
    payloads += [rng.bytes(int(rng.integers(1, 2000))) for _ in range(400)]
    payloads += [valid[: int(rng.integers(1, len(valid) - 1))] for _ in range(300)]
    payloads += [wrong] * 100
    payloads += [nan] * 100
    payloads += [other_net] * 80
    payloads += [os.urandom(MAX_MESSAGE + 100_000)] * 20
    assert len(payloads) == 1000
    return payloads


async def publish_all(port: int, topic: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="hostile", timeout=60) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


def test_a_thousand_malformed_payloads_are_counted_and_change_nothing(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = NodeProcess(
        "victim",
        ["--id", "victim", "--network", "hostile", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "victim"), "--max-message-size", str(MAX_MESSAGE),
         "--period", "0.2", *FAST],
        tmp_path,
    ).start()  # fmt: skip
    try:
        wait_until(lambda: node.last_round() >= 1, 60, "first round", node.tail)
        before = node.rounds()[-1]
        asyncio.run(
            publish_all(port, topics.inbox("hostile", "victim"), hostile_payloads("hostile"))
        )
        wait_until(lambda: node.rounds()[-1]["rejected"] >= 1000, 60, "1000 rejections", node.tail)
        wait_until(lambda: node.last_round() >= before["round"] + 2, 30, "more rounds", node.tail)
        assert node.alive(), node.tail()
        after = node.rounds()[-1]
        assert after["rejected"] == before["rejected"] + 1000
        # nothing was accepted as a model, so nothing was merged into ours
        assert after["models_received"] == before["models_received"] == 0
        assert all(r["merged"] == 0 for r in node.rounds())
        reasons = after["rejected_by_reason"]
        assert len(reasons) >= 4, reasons
    finally:
        node.stop()
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
        asyncio.run(asyncio.sleep(10))
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
        reconnected = [
            n for n in nodes if any("reconnected" in r.get("msg", "") for r in n.records())
        ]
        assert len(reconnected) == 3, logs()
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
    ckpts = sorted((tmp_path / "solo" / "checkpoints").glob("ckpt-*.npz"))
    assert ckpts and ckpts[-1].name == f"ckpt-{done['round']:06d}.npz"
