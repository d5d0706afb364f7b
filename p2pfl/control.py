"""A running node's local control: a Unix socket in its state dir, one JSON line each way.

`p2pfl run` listens on ``<state dir>/control.sock`` (mode 0600: only the node's user, and
root, may connect); `p2pfl status | pause | resume | stop` are its clients. A request is one
line ``{"command": "status" | "pause" | "resume" | "stop"}``; the reply is one line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. A request is at most
:data:`MAX_REQUEST` bytes and must arrive within :data:`READ_TIMEOUT` seconds; anything else
gets an error reply and the connection closes, the node carries on.

The server runs on the node's event loop, so it reads the node's state where the node changes
it (``Node.status()`` builds a frozen record there), never from another thread.

AF_UNIX addresses hold at most 107 bytes. A longer socket path is reached through the state
dir's file descriptor (``/proc/self/fd/N/control.sock``, Linux), by the node and its clients
alike; where that is not possible the node runs without local control and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from p2pfl.status import Count, NodeStatus, Text

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096
"""Bytes of one request line, newline included."""
MAX_REPLY = 1024 * 1024
READ_TIMEOUT = 2.0
"""Seconds a client has to send its request line (and to take the reply)."""
SUN_PATH_MAX = 107
"""Bytes of an AF_UNIX socket path (108 with the terminating NUL)."""
PROC_FD = Path("/proc/self/fd")
"""Where Linux shows a process's descriptors: a short way to a long socket path."""

Command = Literal["status", "pause", "resume", "stop"]
COMMANDS: tuple[str, ...] = get_args(Command)


class Request(BaseModel):
    """One request line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Command


class ControlStatus(NodeStatus):
    """The answer to `status`: the node's status record, and what only the node itself says."""

    trust: Text = ""
    """The node's trust policy (tofu, allowlist, ca, open)."""
    pid: Count = 0


class Steerable(Protocol):
    """What local control drives: `p2pfl.node.Node`."""

    @property
    def paused(self) -> str | None: ...

    def status(self) -> NodeStatus: ...

    def pause(self, reason: str = "manual") -> None: ...

    def resume(self) -> None: ...


class NodeControl:
    """The commands, on a node (call on its event loop); ``stop`` ends it gracefully."""

    def __init__(self, node: Steerable, *, trust: str, stop: Callable[[], None]) -> None:
        self.node, self.trust, self._stop = node, trust, stop

    def status(self) -> ControlStatus:
        record = self.node.status()
        return ControlStatus.model_construct(**dict(record), trust=self.trust, pid=os.getpid())

    def run(self, command: Command) -> dict[str, Any]:
        """Carry out ``command``; the reply's fields besides ``ok``."""
        if command == "status":
            hidden = {"confusion", "projection"}  # big, and what a monitor is for
            return {"status": self.status().model_dump(mode="json", exclude=hidden)}
        if command == "pause":
            self.node.pause("manual")
        elif command == "resume":
            self.node.resume()
        else:
            self._stop()
            return {"stopping": True, "pid": os.getpid()}
        return {"paused": self.node.paused}


def answer(line: bytes, control: NodeControl) -> dict[str, Any]:
    """The reply to one request line; a bad request gets an error reply, never an exception."""
    if len(line) > MAX_REQUEST:
        return _error(f"request over {MAX_REQUEST} bytes")
    try:
        request = Request.model_validate_json(line)
    except ValidationError as exc:
        return _error(_why(exc))
    try:
        return {"ok": True, **control.run(request.command)}
    except Exception as exc:  # a bug of ours: say so, and keep the node and its socket up
        log.exception("local control: %s failed", request.command)
        return _error(f"{request.command} failed in the node: {exc}")


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _why(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    expected = ", ".join(COMMANDS)
    if err["type"] == "literal_error":
        return f"unknown command {str(err['input'])[:40]!r}: expected one of {expected}"
    if err["type"] == "missing":
        return f"request has no {where!r} (one of {expected})"
    if err["type"] == "extra_forbidden":
        return f"unknown field {where[:40]!r} in the request"
    if err["type"] in ("json_invalid", "model_type"):
        return 'request is not one JSON object like {"command": "status"}'
    return f"bad request: {err['msg']}"


# ---- server (on the node's event loop) ------------------------------------------------------


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits AF_UNIX: itself, or via its directory's descriptor."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    if not PROC_FD.is_dir():
        raise OSError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes")
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"{PROC_FD}/{fd}/{path.name}"
    finally:
        os.close(fd)


def _listening_socket(path: Path) -> socket.socket:
    """A socket bound at ``path``, mode 0600 before it listens (so never reachable wider)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            # Left by a run that crashed: the state dir's lock says no other node uses it.
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(path) as address:
            sock.bind(address)
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return sock


async def _serve_one(
    control: NodeControl, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            line = await reader.readline()
        reply = answer(line, control)
    except ValueError:  # the line ran past the reader's limit
        reply = _error(f"request over {MAX_REQUEST} bytes")
    except TimeoutError:
        reply = _error(f"no request line within {READ_TIMEOUT:g} s")
    except OSError:  # the client went away
        writer.close()
        return
    try:
        writer.write(json.dumps(reply).encode() + b"\n")
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()
    except (OSError, TimeoutError):
        pass  # a client that does not read its reply loses it
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def control_socket(state_dir: Path, control: NodeControl) -> AsyncIterator[Path | None]:
    """Serve local control on ``<state_dir>/control.sock`` while the block runs; yield the
    socket's path, or None when it cannot listen (the node then runs without local control)."""
    path = state_dir / SOCKET_NAME
    try:
        sock = _listening_socket(path)
        server = await asyncio.start_unix_server(
            partial(_serve_one, control), sock=sock, limit=MAX_REQUEST
        )
    except OSError as exc:
        log.warning("local control off (p2pfl status/stop will not reach this node) error=%s", exc)
        yield None
        return
    log.info("local control listening socket=%s", path)
    try:
        yield path
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await server.wait_closed()


# ---- client (the p2pfl status | pause | resume | stop commands) ------------------------------


class ControlError(Exception):
    """The node could not be asked, or answered with an error."""


class NoNode(ControlError):
    """No node listens in that state dir."""


def call(state_dir: Path, command: str, *, timeout: float = 1.0) -> dict[str, Any]:
    """Send ``command`` to the node of ``state_dir``; its reply (``ok`` true). Blocking."""
    path = state_dir / SOCKET_NAME
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _reachable(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NoNode(f"no node running in {state_dir} (no control socket there)") from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run this as the node's user (or root)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the node at {path}: {exc}") from None
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = _read_line(sock, deadline)
        except OSError as exc:  # a timeout too
            raise ControlError(f"the node at {path} did not answer: {exc or 'timed out'}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the node at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        error = reply.get("error") if isinstance(reply, dict) else None
        raise ControlError(f"the node refused {command!r}: {error or reply!r}")
    return reply


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise OSError(f"reply over {MAX_REPLY} bytes")
    return data


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ended within ``timeout`` seconds (a zombie counts as ended)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):  # no pidfd here: poll for the pid
        return _poll_exit(pid, timeout)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _poll_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # another user's process: alive
        time.sleep(0.05)
    return False
