"""Emulated LAN hosts: one Linux network namespace per host, all on one bridge.

Layout (everything lives in namespaces this module creates; the root namespace is never
touched, no default route is ever added, so nothing a test sends can leave the machine):

    <prefix>s   the "switch": bridge br0 (multicast snooping off, so mDNS floods), and one
                veth end hN per host, enslaved to br0
    <prefix>hN  host N: lo up, eth0 = 10.77.0.N/24 (the other end of hN)

`ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*: each host gets a hosts file in the
Debian style, ``127.0.1.1 <its hostname>``, so ``gethostbyname(gethostname())`` is a loopback
address there, as on a freshly installed Debian/Ubuntu machine. Commands run in a private UTS
namespace with that hostname set (when `unshare` works), else the hosts file names the real
hostname.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nodeproc import NodeProcess, stop_all

SUBNET = "10.77.0"
ETC_NETNS = Path("/etc/netns")
_counter = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can). Probes once per session."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"p2l{os.getpid() % 10000}probe"
    try:
        out = _ip("netns", "add", probe, check=False)
        if out.returncode != 0:
            return f"`ip netns add` failed: {out.stderr.strip()}"
        out = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if out.returncode != 0:
            return f"cannot create a bridge in a namespace: {out.stderr.strip()}"
        veth = ("link", "add", "name", "va", "type", "veth", "peer", "name", "vb")
        out = _ip("-n", probe, *veth, check=False)
        if out.returncode != 0:
            return f"cannot create a veth pair in a namespace: {out.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unavailable: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@functools.cache
def uts_works() -> bool:
    """Whether `unshare --uts` can give a command its own hostname."""
    if shutil.which("unshare") is None:
        return False
    out = subprocess.run(
        ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && hostname', "p2lprobe"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.returncode == 0 and out.stdout.strip() == "p2lprobe"


@dataclass
class Host:
    """One emulated machine: its namespace, its LAN address and its hostname."""

    index: int
    ns: str
    ip: str
    hostname: str


class NsNodeProcess(NodeProcess):
    """A `p2pfl run` child started inside a host's namespace (same log handling as
    NodeProcess). `ip netns exec`, `unshare` and `sh` all exec, so the pid is the node's."""

    def __init__(self, lan: Lan, host: Host, name: str, args: Sequence[str], workdir: Path) -> None:
        super().__init__(name, args, workdir)
        self.lan = lan
        self.host = host

    def start(self) -> NsNodeProcess:
        argv = [sys.executable, "-m", "p2pfl", "run", "--log-format", "json", *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.lan.wrap(self.host, argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.lan.env(),
            )
        return self


@dataclass
class Lan:
    """A switch namespace with a bridge and `n` host namespaces on 10.77.0.0/24."""

    n: int
    prefix: str = ""
    hosts: list[Host] = field(default_factory=list)
    uts: bool = False
    _nodes: list[NodeProcess] = field(default_factory=list)
    _popens: list[subprocess.Popen[Any]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _made_etc_netns: bool = False

    @property
    def switch(self) -> str:
        return f"{self.prefix}s"

    # ---- set-up and tear-down -----------------------------------------------------------------

    def create(self) -> Lan:
        global _counter
        _counter += 1
        self.prefix = self.prefix or f"p2l{os.getpid() % 10000}x{_counter}"
        self.uts = uts_works()
        self._made_etc_netns = not ETC_NETNS.exists()
        sw = self.switch
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i in range(1, self.n + 1):
            ns = f"{self.prefix}h{i}"
            hostname = f"{self.prefix}-h{i}" if self.uts else socket.gethostname()
            self._add_ns(ns)
            # created inside the host namespace, peer moved straight into the switch: the
            # root namespace never sees either end
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}",
                "netns", sw)  # fmt: skip
            _ip("-n", sw, "link", "set", f"h{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"h{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            etc = ETC_NETNS / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n"
            )
            self.hosts.append(Host(i, ns, f"{SUBNET}.{i}", hostname))
        self._wait_links_up()
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while "LOWER_UP" not in _ip("-n", host.ns, "link", "show", "eth0").stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"eth0 of {host.ns} did not come up")
                time.sleep(0.05)

    def close(self) -> None:
        """Stop what was started in the namespaces, delete them and their /etc/netns files."""
        with contextlib.suppress(Exception):
            stop_all(self._nodes, grace=15)
        for proc in self._popens:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(10)
        for ns in self._namespaces:
            # anything left in our namespaces was started by this test
            out = _ip("netns", "pids", ns, check=False)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self._namespaces.clear()
        if self._made_etc_netns:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only when empty, and only if we made it

    # ---- running things on a host -------------------------------------------------------------

    def wrap(self, host: Host, argv: Sequence[str]) -> list[str]:
        """`argv` as a command run on `host` (its namespace, /etc/netns files, hostname)."""
        cmd = ["ip", "netns", "exec", host.ns]
        if self.uts:
            cmd += ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                    host.hostname]  # fmt: skip
        return [*cmd, *argv]

    @staticmethod
    def env() -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def run(
        self, host: Host, argv: Sequence[str], *, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on `host` to completion; text stdout/stderr captured."""
        return subprocess.run(
            self.wrap(host, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=self.env(),
        )

    def p2pfl(
        self, host: Host, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`p2pfl ARGS` run on `host`."""
        return self.run(host, [sys.executable, "-m", "p2pfl", *args], timeout=timeout)

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` on `host`; killed at teardown if still running."""
        kwargs.setdefault("env", self.env())
        proc = subprocess.Popen(self.wrap(host, argv), **kwargs)
        self._popens.append(proc)
        return proc

    def popen_node(
        self, host: Host, name: str, args: Sequence[str], workdir: Path
    ) -> NsNodeProcess:
        """Start `p2pfl run --log-format json ARGS` on `host`, log in `workdir/name.log`."""
        node = NsNodeProcess(self, host, name, args, workdir)
        self._nodes.append(node)
        return node.start()

    def block_tcp_port(self, host: Host, port: int, *, from_lan_only: bool = True) -> None:
        """Drop TCP packets to `port` arriving at `host` (from the LAN only, by default: the
        host's own loopback connections keep working, as with a typical host firewall)."""
        match = 'iifname "eth0" ' if from_lan_only else ""
        if shutil.which("nft"):
            script = (
                "table inet p2ptest {\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy accept;\n"
                f"    {match}tcp dport {port} drop\n"
                "  }\n"
                "}\n"
            )
            out = subprocess.run(
                ["ip", "netns", "exec", host.ns, "nft", "-f", "-"],
                input=script, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if out.returncode == 0:
                return
            nft_error = out.stderr.strip()
        else:
            nft_error = "nft not installed"
        if shutil.which("iptables") is None:
            raise RuntimeError(f"cannot block a port: {nft_error}; iptables not installed")
        rule = ["-A", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
        if from_lan_only:
            rule[2:2] = ["-i", "eth0"]
        out = subprocess.run(
            ["ip", "netns", "exec", host.ns, "iptables", *rule],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"cannot block a port: nft: {nft_error}; iptables: {out.stderr}")
