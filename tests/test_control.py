"""Local control (`p2pfl.control`): the request/reply protocol, the socket server on an event
loop, the blocking client, and the systemd notifications the daemon sends."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl import control
from p2pfl.control import (
    MAX_REQUEST,
    SOCKET_NAME,
    ControlError,
    ControlStatus,
    NodeControl,
    NoNode,
    answer,
    call,
    control_socket,
    wait_exit,
)
from p2pfl.sd_notify import notify
from p2pfl.status import NodeStatus


class FakeNode:
    """The node surface local control drives (`p2pfl.control.Steerable`)."""

    def __init__(self) -> None:
        self.held: str | None = None

    @property
    def paused(self) -> str | None:
        return self.held

    def status(self) -> NodeStatus:
        return NodeStatus(
            id="n1", run="lab-1", round=7, rounds=7, accuracy=0.75, peers=("n2", "n3"),
            rejected={"bad-signature": 2, "replay": 1}, paused=self.paused,
        )  # fmt: skip

    def pause(self, reason: str = "manual") -> None:
        self.held = reason

    def resume(self) -> None:
        self.held = None


def make_control() -> tuple[FakeNode, NodeControl, list[int]]:
    node, stops = FakeNode(), []
    return node, NodeControl(node, trust="tofu", stop=lambda: stops.append(1)), stops


# ---- the protocol -----------------------------------------------------------------------------


def test_status_carries_the_record_the_pause_reason_and_the_trust_mode() -> None:
    node, ctl, _ = make_control()
    reply = answer(b'{"command": "status"}\n', ctl)
    assert reply["ok"] is True
    record = ControlStatus.model_validate(reply["status"])
    assert (record.id, record.run, record.round, record.peers) == ("n1", "lab-1", 7, ("n2", "n3"))
    assert record.rejected == {"bad-signature": 2, "replay": 1}
    assert (record.accuracy, record.trust, record.paused) == (0.75, "tofu", None)
    assert record.pid == os.getpid()
    node.pause("window")
    assert answer(b'{"command": "status"}', ctl)["status"]["paused"] == "window"


def test_pause_resume_and_stop_act_on_the_node() -> None:
    node, ctl, stops = make_control()
    assert answer(b'{"command": "pause"}', ctl) == {"ok": True, "paused": "manual"}
    assert node.paused == "manual"
    assert answer(b'{"command": "resume"}', ctl) == {"ok": True, "paused": None}
    assert node.paused is None
    assert stops == []
    reply = answer(b'{"command": "stop"}', ctl)
    assert reply == {"ok": True, "stopping": True, "pid": os.getpid()}
    assert stops == [1]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"status\n", "not one JSON object"),
        (b"{not json", "not one JSON object"),
        (b"[1, 2]", "not one JSON object"),
        (b"", "not one JSON object"),
        (b"{}", "has no 'command'"),
        (b'{"command": "reboot"}', "unknown command 'reboot'"),
        (b'{"command": 3}', "unknown command"),
        (b'{"command": "status", "as": "root"}', "unknown field 'as'"),
        (b'{"command": "' + b"x" * MAX_REQUEST + b'"}', f"over {MAX_REQUEST} bytes"),
    ],
)
def test_a_bad_request_gets_an_error_reply(line: bytes, says: str) -> None:
    node, ctl, stops = make_control()
    reply = answer(line, ctl)
    assert reply["ok"] is False
    assert says in reply["error"]
    assert node.paused is None and stops == []


@given(st.binary(max_size=256))
def test_any_bytes_get_a_reply_and_only_a_valid_request_acts(line: bytes) -> None:
    node, ctl, stops = make_control()
    reply = answer(line, ctl)
    json.dumps(reply)  # a reply can always be sent
    try:
        valid = json.loads(line) in [{"command": c} for c in control.COMMANDS]
    except ValueError:
        valid = False
    assert reply["ok"] is valid
    if not valid:
        assert node.paused is None and stops == []


# ---- the server on a real socket --------------------------------------------------------------


def raw(path: Path, data: bytes, *, close_write: bool = True) -> dict[str, object]:
    """Send ``data`` as is and read the one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    return json.loads(reply)


async def test_the_socket_is_private_answers_and_survives_bad_clients(tmp_path: Path) -> None:
    node, ctl, _ = make_control()
    async with control_socket(tmp_path, ctl) as path:
        assert path == tmp_path / SOCKET_NAME
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        bad = await asyncio.to_thread(raw, path, b"hello\n")
        assert bad["ok"] is False
        big = await asyncio.to_thread(raw, path, b"x" * (3 * MAX_REQUEST), close_write=False)
        assert big == {"ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        reply = await asyncio.to_thread(call, tmp_path, "pause")
        assert reply == {"ok": True, "paused": "manual"}
        assert node.paused == "manual"
        with pytest.raises(ControlError, match="unknown command 'halt'"):
            await asyncio.to_thread(call, tmp_path, "halt")
        status = await asyncio.to_thread(call, tmp_path, "status")
        assert status["status"]["paused"] == "manual"
    assert not (tmp_path / SOCKET_NAME).exists()


async def test_a_silent_client_is_dropped_after_the_read_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)
    _, ctl, _ = make_control()
    async with control_socket(tmp_path, ctl) as path:
        assert path is not None
        silent = await asyncio.to_thread(raw, path, b"", close_write=False)
        assert silent == {"ok": False, "error": "no request line within 0.2 s"}
        assert (await asyncio.to_thread(call, tmp_path, "resume"))["ok"] is True


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / SOCKET_NAME))
    stale.close()  # a crashed run's socket: the file stays, nobody listens
    with pytest.raises(NoNode):
        call(tmp_path, "status")
    _, ctl, _ = make_control()
    async with control_socket(tmp_path, ctl) as path:
        assert path is not None
        assert (await asyncio.to_thread(call, tmp_path, "status"))["ok"] is True


async def test_a_state_dir_past_the_af_unix_limit_still_has_control(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(os.fsencode(deep / SOCKET_NAME)) > control.SUN_PATH_MAX
    _, ctl, _ = make_control()
    async with control_socket(deep, ctl) as path:
        assert path == deep / SOCKET_NAME
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        reply = await asyncio.to_thread(call, deep, "status")
        assert reply["status"]["id"] == "n1"
    assert not (deep / SOCKET_NAME).exists()


async def test_without_proc_a_long_path_runs_without_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(control, "PROC_FD", tmp_path / "no-proc")
    _, ctl, _ = make_control()
    async with control_socket(deep, ctl) as path:
        assert path is None
    assert "local control off" in caplog.text and "longer than 107 bytes" in caplog.text


def test_no_node_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoNode, match="no node running in"):
        call(tmp_path, "status")
    with pytest.raises(NoNode):
        call(tmp_path / "missing", "status")


def test_wait_exit_sees_a_process_end() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert not wait_exit(child.pid, 0.2)
        assert child.stdin is not None
        child.stdin.close()
        assert wait_exit(child.pid, 10)  # ended, not reaped yet
    finally:
        child.wait(10)


# ---- systemd notifications ----------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    name = f"\0p2pfl-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(name)
        systemd.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name[1:] if abstract else name)
        assert notify("READY=1")
        assert systemd.recv(100) == b"READY=1"


def test_notify_without_systemd_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
