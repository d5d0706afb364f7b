"""A private Mosquitto broker run as a child process (`--broker local`, and the test fixtures).

The broker gets its own config in a temporary directory (loopback listener, anonymous access,
no persistence, an explicit `max_packet_size`), so the system's mosquitto.conf never matters.
`restart()` reuses the same port, which is how tests take a broker down and bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Self

from p2pfl.transport.base import LocalBroker, TransportError

log = logging.getLogger(__name__)

# Debian puts mosquitto in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/opt/homebrew/bin")


def find_mosquitto() -> str | None:
    """Path of the `mosquitto` binary, looking on PATH and then in the usual sbin folders."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _EXTRA_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a `preexec_fn` that has the kernel SIGTERM the child when its parent dies.

    `weakref.finalize` covers a clean exit only; after a `kill -9` of the node the broker would
    live on, holding its port. The death signal follows the thread that forked, so spawn from
    a thread that lives as long as the process (see `MosquittoBroker.__aenter__`).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands outgoing connections as their source port."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 65535  # covers the Linux and BSD defaults


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` right now, chosen outside the ephemeral range.

    A port the OS picked with bind(0) is an ephemeral one: any outgoing connection on the
    machine may take it as its source port before our broker binds it (EADDRINUSE, seen in CI).
    Ports below or above that range are only ever taken by a deliberate bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, high = _ephemeral_range()
    held: list[socket.socket] = []
    try:
        for _ in range(1000):
            if len(held) == n:
                break
            port = random.randrange(10000, 65536)
            if low <= port <= high:
                continue
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        while len(held) < n:  # everything outside the range is taken: let the OS choose
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (see `free_ports`)."""
    return free_ports(1, host)[0]


def mqtt_ping(
    host: str, port: int, timeout: float = 0.5, *, tls: bool = False, refused_ok: bool = False
) -> bool:
    """Whether an MQTT broker answers a CONNECT on `host:port` (not just any listener).

    With `tls`, the certificate is not checked: this asks "is it up?", not "is it trusted?".
    ``refused_ok``: a CONNACK that refuses the anonymous probe counts as an answer too.
    """
    client_id = b"p2pfl-probe"
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname=host))
            sock.sendall(bytes([0x10, len(body)]) + body)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so no will and no warning in the log
    except OSError:
        return False
    if refused_ok:
        return reply[:2] == b"\x20\x02"  # a CONNACK, whatever its verdict
    return reply == b"\x20\x02\x00\x00"  # CONNACK, accepted


class MosquittoBroker(LocalBroker):
    """A Mosquitto child process listening on `host:port` (port 0 = pick a free one).

    `tls=(certfile, keyfile)` makes it an `mqtts://` listener.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_packet_size: int = 16 * 1024 * 1024,
        max_queued_messages: int = 10_000,
        tls: tuple[str, str] | None = None,
        password_file: str | None = None,
        network: str | None = None,
        binary: str | None = None,
        start_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._port = port
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.tls = tls
        self.password_file = password_file
        self.network = network
        self._binary = binary
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        """The child process id while it runs (to signal it as a service manager would)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn mosquitto and block until it accepts connections."""
        self._spawn()
        self._wait_ready()

    def _spawn(self) -> None:
        if self.running:
            return
        binary = self._binary or find_mosquitto()
        if binary is None:
            raise TransportError(
                "mosquitto not found on PATH or in /usr/sbin; install it "
                "(apt install mosquitto / brew install mosquitto) or use the embedded broker"
            )
        if not self._port:
            self._port = free_port(self.host)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="p2pfl-mosquitto-")
        folder = Path(self._dir.name)
        conf = folder / "mosquitto.conf"
        if self.password_file is not None and self.network is not None:
            (folder / "acl").write_text(self._acl(self.network))
        conf.write_text(self._config(folder))
        with (folder / "mosquitto.log").open("ab") as err:
            try:
                self._proc = subprocess.Popen(
                    [binary, "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    preexec_fn=_die_with_parent(),
                )
            except OSError as exc:
                raise TransportError(f"cannot run mosquitto ({binary}): {exc}") from exc
        # The broker must not outlive its owner, even one that forgets stop() (also at exit).
        weakref.finalize(self, _terminate, self._proc)

    def _wait_ready(self) -> None:
        proc = self._proc
        if proc is None:
            return
        # Poll with a real MQTT handshake: a bare TCP connect could reach another program
        # that took the port, while mosquitto is failing to bind it.
        deadline = time.monotonic() + self._start_timeout
        secured = self.password_file is not None
        tls = self.tls is not None
        while not mqtt_ping(self.host, self._port, timeout=0.2, tls=tls, refused_ok=secured):
            if proc.poll() is not None:
                text = self.log_text().strip()
                self._proc = None
                raise TransportError(f"mosquitto exited at start on port {self._port}: {text}")
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError(
                    f"mosquitto did not accept MQTT connections on {self.host}:{self._port} "
                    f"within {self._start_timeout} s"
                )
            time.sleep(0.02)
        log.debug("mosquitto started pid=%d uri=%s", proc.pid, self.uri)

    def stop(self) -> None:
        """Terminate the child process (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _terminate(proc)
        log.debug("mosquitto stopped port=%s rc=%s", self._port, proc.returncode)

    def close(self) -> None:
        """Stop the broker and remove its temporary directory."""
        self.stop()
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self._dir.cleanup()
            self._dir = None

    def log_text(self) -> str:
        """What mosquitto logged so far (errors and warnings), for test failure messages."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _acl(net: str) -> str:
        """The embedded broker's topic rules as far as Mosquitto patterns go (a user may also
        publish to its own inbox; retained messages are not budgeted). Every rule is a
        ``pattern``: Mosquitto applies ``topic`` lines written before any ``user`` line to
        anonymous clients only. deploy/mosquitto.acl holds the same rules for network "lab"."""
        base = f"p2pfl/v1/{net}"
        kinds = ("presence", "telemetry", "log")
        return "\n".join(
            [
                f"pattern read {base}/node/%u/inbox",
                f"pattern write {base}/node/+/inbox",
                *(f"pattern write {base}/{kind}/%u" for kind in kinds),
                *(f"pattern read {base}/{kind}/+" for kind in kinds),
                f"pattern write {base}/seed/+/%u",
                f"pattern read {base}/seed/+/+",
                "",
            ]
        )

    def _config(self, folder: Path | None = None) -> str:
        tls = [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"] if self.tls else []
        access = ["allow_anonymous true"]
        if self.password_file is not None:
            access = ["allow_anonymous false", f"password_file {self.password_file}"]
            if folder is not None and self.network is not None:
                access.append(f"acl_file {folder / 'acl'}")
        # Started as root, mosquitto switches to the `mosquitto` user and then cannot read
        # files in our private folders; a private broker runs as whoever runs the node.
        user = ["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        return "\n".join(
            [
                f"listener {self._port} {self.host}",
                *user,
                *tls,
                *access,
                "persistence false",
                f"max_packet_size {self.max_packet_size}",
                f"max_queued_messages {self.max_queued_messages}",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "",
            ]
        )

    async def __aenter__(self) -> Self:
        # Spawn from the loop's thread, which lives as long as the process (a worker thread
        # may exit earlier and take the broker with it: the death signal follows the thread).
        self._spawn()
        await asyncio.to_thread(self._wait_ready)
        return self
