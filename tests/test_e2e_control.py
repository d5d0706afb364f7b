"""End-to-end: a real `p2pfl run` node asked through its control socket with
`p2pfl status | pause | resume | stop`, as an operator on that machine would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.control import SOCKET_NAME, NodeControl, call, control_socket
from p2pfl.discovery.presence import PresenceRecord, parse_presence
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.transport.base import LocalBroker
from tests.helpers import wait_until
from tests.nodeproc import NodeProcess, run_dir, stop_all
from tests.test_control import FakeNode

pytestmark = pytest.mark.timeout(180)

NET = "ctl"


def p2pfl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `p2pfl ARGS` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=60
    )


async def presence_of(port: int, node_id: str, seen: list[PresenceRecord]) -> None:
    """Collect every presence record ``node_id`` publishes on the broker at ``port``."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="watcher") as client:
        await client.subscribe(f"p2pfl/v1/{NET}/presence/{node_id}", qos=1)
        async for message in client.messages:
            if isinstance(message.payload, bytes) and message.payload:
                seen.append(parse_presence(unpack_envelope(message.payload)))


async def test_status_pause_resume_and_stop_a_running_node(
    tmp_path: Path, mosquitto: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # as under Type=notify
    node = NodeProcess(
        "c1",
        ["--id", "c1", "--network", NET, "--broker", mosquitto.uri, "--rounds", "0",
         "--discovery", "static,presence", "--model", "mlp", "--local-epochs", "1",
         "--dataset", "mnist1d:1000", "--seed", "0", "--period", "0.1",
         "--state-dir", str(state), "--interface", "127.0.0.1"],
        tmp_path,
    ).start()  # fmt: skip
    seen: list[PresenceRecord] = []
    watcher = asyncio.create_task(presence_of(mosquitto.port, "c1", seen))
    try:
        await wait_until(lambda: bool(node.rounds()), 90, what="a first round", logs=node.tail)
        sock = state / SOCKET_NAME
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        asked = time.monotonic()
        reply = await asyncio.to_thread(call, state, "status")
        assert time.monotonic() - asked < 1.0
        assert reply["status"]["id"] == "c1"
        started = time.monotonic()
        shown = await asyncio.to_thread(p2pfl, "status", "--state-dir", str(state), "--json")
        took = time.monotonic() - started
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert record["id"] == "c1" and record["pid"] == node.proc.pid  # type: ignore[union-attr]
        assert record["round"] >= 1 and record["accuracy"] is not None
        assert record["peers"] == [] and record["paused"] is None
        assert record["trust"] == "tofu" and isinstance(record["rejected"], dict)
        assert "run" in record
        print(f"p2pfl status --json: {took:.2f} s wall, process start included")

        paused = await asyncio.to_thread(p2pfl, "pause", "--state-dir", str(state))
        assert paused.returncode == 0 and "paused: manual" in paused.stdout, paused.stderr
        again = await asyncio.to_thread(p2pfl, "status", "--state-dir", str(state), "--json")
        assert json.loads(again.stdout)["paused"] == "manual"
        text = await asyncio.to_thread(p2pfl, "status", "--state-dir", str(state))
        assert "paused: manual" in text.stdout and "c1" in text.stdout

        resumed = await asyncio.to_thread(p2pfl, "resume", "--state-dir", str(state))
        assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
        text = await asyncio.to_thread(p2pfl, "status", "--state-dir", str(state))
        assert "eligible" in text.stdout and "paused" not in text.stdout

        stopped = await asyncio.to_thread(p2pfl, "stop", "--state-dir", str(state))
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert node.wait(5) == 0, node.tail()
        assert list((run_dir(state) / "checkpoints").glob("ckpt-*.npz")), node.tail()
        assert not sock.exists()
        await wait_until(lambda: any(not r.online for r in seen), 10, what="a bye on the broker")
        bye = next(r for r in seen if not r.online)
        assert bye.graceful, bye
        systemd.settimeout(5)
        told = [systemd.recv(100) for _ in range(2)]
        assert told == [b"READY=1", b"STOPPING=1"]

        gone = await asyncio.to_thread(p2pfl, "status", "--state-dir", str(state))
        assert gone.returncode == 1
        assert gone.stderr.strip().count("\n") == 0 and "no node running" in gone.stderr
        assert "Traceback" not in gone.stderr
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await watcher
        systemd.close()
        stop_all([node], grace=5)


async def test_without_state_dir_the_one_running_node_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default state root (`XDG_STATE_HOME`) holding one node: found; two: listed."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    dirs = [tmp_path / "p2pfl" / "lab" / name for name in ("n1", "n2")]
    for d in dirs:
        d.mkdir(parents=True)
    node = FakeNode()
    runner = CliRunner()

    def cli(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args))
        return result.exit_code, result.output

    code, out = await asyncio.to_thread(cli, "status")
    assert code == 1 and "no node running" in out
    async with control_socket(dirs[0], NodeControl(node, trust="ca", stop=lambda: None)):
        code, out = await asyncio.to_thread(cli, "pause")
        assert code == 0 and node.paused == "manual", out
        async with control_socket(dirs[1], NodeControl(node, trust="ca", stop=lambda: None)):
            code, out = await asyncio.to_thread(cli, "status")
            assert code == 2 and "several nodes" in out
            assert str(dirs[0]) in out and str(dirs[1]) in out
