"""The service files in deploy/: the systemd unit verifies, the node config loads, and the shared
Mosquitto config starts (with test-made certificates) and carries two nodes that connect with
the documented flags, while its ACL keeps each node to its own topics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from p2pfl.config import NodeConfig, load_config
from p2pfl.transport.mosquitto import find_mosquitto, free_port, mqtt_ping
from tests.helpers import wait_until_blocking
from tests.nodeproc import NodeProcess, stop_all
from tests.test_transport_mqtt import _make_certs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NET = "lab"  # the network deploy/p2pfl.toml and deploy/mosquitto.acl are written for


# ---- systemd unit -----------------------------------------------------------------------------


def unit_settings() -> dict[str, str]:
    text = (DEPLOY / "p2pfl.service").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Za-z]+=", line))


def test_the_unit_has_what_the_issue_asks() -> None:
    unit = unit_settings()
    for key, value in {
        "Type": "notify", "DynamicUser": "yes", "StateDirectory": "p2pfl",
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "Restart": "on-failure",
    }.items():  # fmt: skip
        assert unit.get(key) == value, key
    families = unit["RestrictAddressFamilies"].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)


def test_the_units_command_line_uses_real_flags() -> None:
    command = unit_settings()["ExecStart"].split()
    assert command[0].endswith("/p2pfl") and command[1] == "run"
    flags = [word for word in command[2:] if word.startswith("--")]
    shown = subprocess.run(
        [sys.executable, "-m", "p2pfl", "run", "--help"], capture_output=True, text=True
    ).stdout
    assert flags == ["--config", "--state-dir"]
    for flag in flags:
        assert f"{flag} " in shown


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` with ExecStart pointing at the p2pfl installed here (verify
    wants an executable); every other line as shipped. Warnings count as failures."""
    installed = Path(sys.executable).parent / "p2pfl"
    if not installed.exists():
        pytest.skip(f"no p2pfl console script at {installed}")
    text = (DEPLOY / "p2pfl.service").read_text()
    assert text.count("/opt/p2pfl/bin/p2pfl ") == 1
    unit = tmp_path / "p2pfl.service"
    unit.write_text(text.replace("/opt/p2pfl/bin/p2pfl ", f"{installed} "))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "p2pfl" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


# ---- node config ------------------------------------------------------------------------------


def commented_keys(path: Path) -> dict[str, object]:
    """The settings shown commented out (``# key = value``), as TOML would read them."""
    found: dict[str, object] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^#\s*([a-z_]+\s*=.*)$", line)
        if match:
            setting = match.group(1).split("  #")[0]
            found.update(tomllib.loads(setting))
    return found


def test_the_node_config_loads_with_every_key_it_shows() -> None:
    path = DEPLOY / "p2pfl.toml"
    config = load_config(path, {})
    assert config.network == NET and config.broker == "embedded"
    assert "mdns" in config.discovery
    shown = commented_keys(path)
    assert set(shown) <= set(NodeConfig.model_fields), set(shown) - set(NodeConfig.model_fields)
    assert {"broker", "ca", "username", "password", "id"} <= set(shown)
    shared = load_config(path, shown)  # the shared-broker variant, uncommented
    assert shared.broker.startswith("mqtts://") and shared.username == shared.id


def broker_max_packet() -> int:
    conf = (DEPLOY / "mosquitto.conf").read_text()
    match = re.search(r"^max_packet_size (\d+)$", conf, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def test_the_brokers_packet_limit_takes_what_a_node_may_send() -> None:
    config = load_config(DEPLOY / "p2pfl.toml", {})
    largest = max(config.max_message_size, config.max_chunk + 64 * 1024)  # as p2pfl.daemon
    assert broker_max_packet() == largest + 64 * 1024


# ---- the shared Mosquitto ---------------------------------------------------------------------


def broker_config(tmp: Path, port: int) -> Path:
    """deploy/mosquitto.conf with only its file paths and listener changed, for this test."""
    ca, cert, key = _make_certs(tmp)
    passwd = tmp / "p2pfl.passwd"
    for user in ("n1", "n2"):
        flags = ["-b", "-c"] if user == "n1" else ["-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwd), user, f"pw-{user}"], check=True)
    shutil.copy(DEPLOY / "mosquitto.acl", tmp / "p2pfl.acl")
    text = (DEPLOY / "mosquitto.conf").read_text()
    swaps = {
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^certfile .*$": f"certfile {cert}",
        r"^keyfile .*$": f"keyfile {key}",
        r"^password_file .*$": f"password_file {passwd}",
        r"^acl_file .*$": f"acl_file {tmp / 'p2pfl.acl'}",
    }
    for pattern, line in swaps.items():
        text, n = re.subn(pattern, line, text, flags=re.MULTILINE)
        assert n == 1, pattern
    # Run as whoever runs the test: started as root, mosquitto would switch to its own user,
    # which cannot read the test's private folders.
    if os.geteuid() == 0:
        text += "user root\n"
    conf = tmp / "mosquitto.conf"
    conf.write_text(text)
    assert ca.exists()
    return conf


@pytest.fixture
def shared_broker(tmp_path: Path) -> Iterator[int]:
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed (apt install mosquitto)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    port = free_port()
    conf = broker_config(tmp_path, port)
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_blocking(
            lambda: (
                proc.poll() is not None or mqtt_ping("127.0.0.1", port, tls=True, refused_ok=True)
            ),
            10,
            "mosquitto to listen",
        )
        if proc.poll() is not None:
            assert proc.stdout is not None
            raise AssertionError(f"mosquitto -c exited: {proc.stdout.read().decode()}")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_shared_broker_refuses_strangers_and_keeps_nodes_to_their_topics(
    tmp_path: Path, shared_broker: int
) -> None:
    import ssl

    tls = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    def login(user: str, password: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", shared_broker, username=user, password=password, tls_context=tls,
            identifier=f"{user}-probe", timeout=10,
        )  # fmt: skip

    with pytest.raises(aiomqtt.MqttError):
        async with login("n1", "wrong"):
            pass
    base = f"p2pfl/v1/{NET}"
    async with login("n1", "pw-n1") as n1, login("n2", "pw-n2") as n2:
        for topic in ("node/n1/inbox", "node/n2/inbox", "presence/+"):
            await n1.subscribe(f"{base}/{topic}", qos=1)
        await n1.subscribe("p2pfl/v1/other/#", qos=1)
        sent = {
            f"{base}/node/n1/inbox": b"to n1",  # delivered
            f"{base}/node/n2/inbox": b"to n2",  # n1 may not read another's inbox
            f"{base}/presence/n1": b"forged",  # n2 may not write as n1
            "p2pfl/v1/other/presence/n2": b"elsewhere",  # nor in another network
            f"{base}/presence/n2": b"n2 here",  # delivered, and the last one
        }
        for topic, payload in sent.items():
            await n2.publish(topic, payload, qos=1)
        got = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):  # the last one came: nothing else is on its way
                async for message in n1.messages:
                    got.append((str(message.topic)[len(base) + 1 :], message.payload))
                    if message.payload == b"n2 here":
                        break
    assert got == [("node/n1/inbox", b"to n1"), ("presence/n2", b"n2 here")]


@pytest.mark.timeout(180)
def test_two_nodes_gossip_through_the_shared_broker(tmp_path: Path, shared_broker: int) -> None:
    """Two nodes started with the documented flags find each other and merge each other's
    models through the shared broker, under its ACL."""
    nodes = []
    for j, node in enumerate(("n1", "n2")):
        args = ["--config", str(DEPLOY / "p2pfl.toml"),
                "--broker", f"mqtts://127.0.0.1:{shared_broker}", "--ca", str(tmp_path / "ca.pem"),
                "--id", node, "--username", node, "--password", f"pw-{node}",
                "--discovery", "static,presence", "--interface", "127.0.0.1",
                "--state-dir", str(tmp_path / node), "--log-format", "json",
                "--model", "mlp", "--dataset", "mnist1d:1000", "--local-epochs", "1",
                "--period", "0.2", "--num-partitions", "2", "--partition-index", str(j),
                "--telemetry-detail", "metrics"]  # fmt: skip
        nodes.append(NodeProcess(node, args, tmp_path).start())

    def logs() -> str:
        return "\n".join(n.tail() for n in nodes)

    try:
        for node in nodes:
            wait_until_blocking(
                lambda n=node: any(r["merged"] >= 1 for r in n.rounds()), 120,
                f"{node.name} merging a model through the shared broker", logs,
            )  # fmt: skip
        assert not any(r.get("rejected") for n in nodes for r in n.rounds()), logs()
    finally:
        stop_all(nodes)


def test_the_shared_brokers_rules_are_the_embedded_mosquittos() -> None:
    from p2pfl.transport.mosquitto import MosquittoBroker

    lines = (DEPLOY / "mosquitto.acl").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules == MosquittoBroker._acl("lab").splitlines()
