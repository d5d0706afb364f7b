"""Acceptance of the trust issue: a default `p2pfl run` node attacked by a client with no key
of the network, over real sockets.

1. On its own embedded broker: the broker refuses the attacker at CONNECT, whatever it tries
   (anonymous, a password, a token for the node's id made with another key, a 100 MB packet),
   and counts every refusal; the node keeps training, alone, and the monitor sees only it.
2. On a shared, open Mosquitto (where the attacker can publish anything): unsigned and forged
   models, 200 forged presence records (one naming the attacker's broker and round 10**6),
   chunk headers claiming 32 MiB, five ghost trainers' telemetry: nothing is merged, the view
   and the round do not move, nothing dials the attacker's broker, memory stays put, and the
   monitor shows no ghost. Every refusal is counted by reason in round lines and telemetry.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt
import psutil
import pytest

from p2pfl.broker_auth import login_password
from p2pfl.discovery.presence import encode_presence
from p2pfl.identity import Identity
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import Envelope, pack_envelope
from p2pfl.transport.base import LocalBroker
from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until
from tests.test_e2e_hostile import mlp_weights

pytestmark = pytest.mark.timeout(300)

NET = "attack"
FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--interface", "127.0.0.1",
        "--discovery", "static,presence", "--telemetry-interval", "1", "--rounds", "400",
        "--period", "0.3", "--network", NET]  # fmt: skip
EVIL = Identity.generate()
MiB = 1024 * 1024


def seq() -> int:
    return time.time_ns() // 1000


# ---- the attacker's few lines -------------------------------------------------------------


def _utf8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connect(port: int, client_id: str, user: str | None = None, password: str | None = None,
                extra: bytes = b"") -> int:  # fmt: skip
    """MQTT 3.1.1 CONNECT by hand; the CONNACK return code, or -1 if the broker hung up."""
    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + _utf8(client_id)
    if user is not None:
        body += _utf8(user)
    if password is not None:
        body += _utf8(password)
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x10" + _remaining(len(body)) + body)
            reply = sock.recv(4)
            if extra:  # keep pushing: a 100 MB publish after a refused CONNECT
                topic = _utf8(topics.inbox(NET, "victim"))
                sock.sendall(b"\x30" + _remaining(100 * MiB) + topic)
                for _ in range(100):
                    sock.sendall(b"\0" * MiB)
    except OSError:
        pass
    return reply[3] if len(reply) == 4 else -1


def huge_connect(port: int) -> bool:
    """A CONNECT claiming 200 MB: True if the broker hung up before taking it all (it reads
    the CONNECT's fields, each at most 64 KiB, refuses the login and closes)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x10" + _remaining(200 * MiB) + b"\x00\x04MQTT\x04\x02\x00\x3c")
            for _ in range(200):
                sock.sendall(b"\0" * MiB)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(4) == b""
    except OSError:
        return True


class FakeBroker:
    """A TCP listener that records every connection (and the first bytes: a CONNECT)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.seen.append(conn.recv(65536))
                except OSError:
                    self.seen.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def forged_messages(fake_port: int) -> list[tuple[str, bytes]]:
    """What an attacker with no key of the network sends to the victim's topics."""
    inbox = topics.inbox(NET, "victim")
    weights = {k: v.tolist() for k, v in mlp_weights().items()}
    out: list[tuple[str, bytes]] = []
    model = {"round": 1, "age": 1e9, "codec": "raw", "tensors": [], "digest": b"\0" * 32,
             "weights": weights}  # fmt: skip
    unsigned = Envelope.create("model", model, net=NET, src="peer1", seq=seq())
    out.append((inbox, bytes(pack_envelope(unsigned))))
    # the victim's own id, signed with the attacker's key
    as_victim = Envelope.create("model", model, net=NET, src="victim", seq=seq())
    out.append((inbox, bytes(pack_envelope(as_victim, EVIL))))
    # a signature that is not the key's
    signed = bytearray(pack_envelope(Envelope.create("model", model, net=NET, src="p2", seq=seq()),
                                     EVIL))  # fmt: skip
    signed[-40] ^= 0xFF
    out.append((inbox, bytes(signed)))
    # chunk headers claiming 32 MiB transfers
    for i in range(3):
        chunk = {"id": f"t{i}", "index": 0, "count": 32, "total": 32 * MiB,
                 "digest": b"\0" * 32, "data": b"x" * 100}  # fmt: skip
        env = Envelope.create("chunk", chunk, net=NET, src=f"c{i}", seq=seq())
        out.append((inbox, bytes(pack_envelope(env))))
    # 200 presence records: unsigned ghosts, and one naming the attacker's broker at 10**6
    for i in range(200):
        broker = f"mqtt://127.0.0.1:{fake_port}"
        payload = encode_presence(NET, f"ghost{i}", seq(), online=True, role="trainer",
                                  broker=broker, round=10**6)  # fmt: skip
        out.append((topics.presence(NET, f"ghost{i}"), payload))
    victim_presence = encode_presence(NET, "victim", seq(), online=False, graceful=False,
                                      role="trainer", broker="", signer=EVIL)  # fmt: skip
    out.append((topics.presence(NET, "victim"), victim_presence))
    # five ghost trainers with perfect scores
    for i in range(5):
        perfect = [[10**9 if r == c else 0 for c in range(10)] for r in range(10)]
        body = {"round": 10**6, "accuracy": 1.0, "loss": 0.0, "role": "trainer",
                "confusion": perfect}  # fmt: skip
        env = Envelope.create("telemetry", body, net=NET, src=f"ghost-t{i}", seq=seq())
        record = bytearray(pack_envelope(env, EVIL if i % 2 else None))
        if i % 2:  # signed, but not by the key it shows
            record[-(len(record) // 2)] ^= 0xFF
        out.append((topics.telemetry(NET, f"ghost-t{i}"), bytes(record)))
    return out


# ---- checks ---------------------------------------------------------------------------------


def rss(node: NodeProcess) -> int:
    assert node.proc is not None
    return int(psutil.Process(node.proc.pid).memory_info().rss)


def rejected(node: NodeProcess) -> dict[str, int]:
    rounds = node.rounds()
    return dict(rounds[-1].get("rejected_by_reason", {})) if rounds else {}


def monitor_once(args: list[str], home: Path) -> dict[str, Any]:
    env = dict(os.environ, HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    out = subprocess.run(
        [sys.executable, "-m", "p2pfl", "monitor", "--network", NET, "--no-mdns", "--once",
         "--json", "--wait", "4", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def no_ghost(snap: dict[str, Any]) -> None:
    ids = [n["id"] for n in snap["nodes"]]
    assert ids == ["victim"], ids
    assert snap["global"]["nodes"] <= 1


def start_victim(tmp_path: Path, *broker: str) -> NodeProcess:
    node = NodeProcess(
        "victim", [*FAST, "--id", "victim", "--state-dir", str(tmp_path / "victim"), *broker],
        tmp_path,
    ).start()  # fmt: skip
    wait_until(lambda: node.last_round() >= 3, 120, "victim training", node.tail)
    return node


# ---- 1. the node's own broker -----------------------------------------------------------------


def test_an_attacker_without_a_key_is_refused_at_connect(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = start_victim(tmp_path, "--listen", f"127.0.0.1:{port}")
    try:
        before_rss, before_round = rss(node), node.last_round()
        uri = f"mqtt://127.0.0.1:{port}"
        tries = {
            "anonymous": raw_connect(port, "evil-1"),
            "password": raw_connect(port, "victim-x", "victim", "hunter2"),
            "the victim's id, another key": raw_connect(
                port, "victim-y", "victim", login_password(EVIL, "victim", uri)),
            "a token for another broker": raw_connect(
                port, "ghost-1", "ghost", login_password(EVIL, "ghost", "mqtt://127.0.0.1:1")),
            "anonymous, then 100 MB": raw_connect(port, "evil-2", extra=b"go"),
        }  # fmt: skip
        assert all(code in (4, 5, -1) for code in tries.values()), tries
        assert tries["anonymous"] == 5, tries  # a CONNACK that says: not authorised
        assert huge_connect(port)
        wait_until(
            lambda: {"unsigned", "untrusted"} <= set(rejected(node)),
            30, "refusals in the round lines", node.tail,
        )  # fmt: skip
        counts = rejected(node)
        assert counts["unsigned"] >= 4 and counts["untrusted"] >= 2, counts
        wait_until(lambda: node.last_round() >= before_round + 3, 60, "training on", node.tail)
        assert all(r["peers"] == 0 for r in node.rounds()), "the view took a ghost"
        assert rss(node) - before_rss < 50 * MiB
        snap = monitor_once(["--broker", uri], tmp_path)
        no_ghost(snap)
        victim = snap["nodes"][0]
        assert victim["rejected_by_reason"]["unsigned"] >= 3, victim  # telemetry counts too
    finally:
        stop_all([node])


# ---- 2. a shared open broker ------------------------------------------------------------------


def test_forged_traffic_on_a_shared_open_broker_changes_nothing(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    node = start_victim(tmp_path, "--broker", mosquitto.uri)
    fake = FakeBroker()
    try:
        before_rss = rss(node)

        async def attack() -> None:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="evil") as c:
                for topic, payload in forged_messages(fake.port):
                    retain = "/inbox" not in topic
                    await c.publish(topic, payload, qos=1, retain=retain)
                with pytest.raises(aiomqtt.MqttError):  # the broker's own limit
                    await c.publish(topics.inbox(NET, "victim"), b"\0" * (100 * MiB), qos=1,
                                    timeout=30)  # fmt: skip

        asyncio.run(attack())
        wait_until(
            lambda: {"unsigned", "untrusted", "bad-signature"} <= set(rejected(node)),
            30, "refusals in the round lines", node.tail,
        )  # fmt: skip
        counts = rejected(node)
        assert counts["unsigned"] >= 200, counts  # the ghosts' presence, the chunks, a model
        round_now = node.last_round()
        wait_until(lambda: node.last_round() >= round_now + 3, 60, "training on", node.tail)
        rounds = node.rounds()
        assert all(r["peers"] == 0 and r["merged"] == 0 for r in rounds), "something got in"
        assert rounds[-1]["round"] < 1000, "the round jumped"
        assert fake.seen == [], "the node dialled the attacker's broker"
        assert rss(node) - before_rss < 50 * MiB
        snap = monitor_once(["--broker", mosquitto.uri], tmp_path)
        no_ghost(snap)
        assert snap["nodes"][0]["rejected_by_reason"]["unsigned"] >= 200
        assert snap["rejected"].get("unsigned", 0) + snap["rejected"].get("bad-signature", 0) >= 5
    finally:
        fake.close()
        stop_all([node])
