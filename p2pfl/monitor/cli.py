"""`p2pfl monitor`: run a monitor node and show what it sees.

Modes: the live dashboard (a terminal), one snapshot (`--once`, as JSON with `--json`), and
headless (no terminal: only `--export`, `--plot` and `--metrics-port` outputs). SIGINT and
SIGTERM end every mode cleanly: the monitor says bye, the export is flushed, the plot written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from p2pfl.certs import load_certificate
from p2pfl.config import StaticPeer, default_state_dir
from p2pfl.identity import load_identity, read_key_argument
from p2pfl.monitor.config import Bind, check_exposure
from p2pfl.monitor.dashboard import render_dashboard, render_report
from p2pfl.monitor.monitor import Monitor
from p2pfl.monitor.plot import write_plot
from p2pfl.monitor.prometheus import MetricsServer, MonitorCollector, serve_metrics
from p2pfl.monitor.web import WebDashboard
from p2pfl.trust import Trust

log = logging.getLogger(__name__)

REFRESH = 0.5
"""Seconds between dashboard redraws."""
EXPORT_EVERY = 1.0
SETTLE = 2.0
"""`--once` listens at least this long, so mDNS answers from every node can arrive."""


class MonitorConfigError(ValueError):
    """An option of `p2pfl monitor` is unusable; the message names it."""


def run_monitor(
    network: str,
    brokers: Sequence[str] = (),
    peers: Sequence[str] = (),
    interfaces: Sequence[str] = (),
    *,
    once: bool = False,
    json_out: bool = False,
    export: Path | None = None,
    plot: Path | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    wait: float = 5.0,
    mdns: bool = True,
    stale_after: float | None = None,
    forget_after: float = 60.0,
    trust: str = "tofu",
    state_dir: Path | None = None,
    ca_key: str | None = None,
    web: str | None = None,
    web_token: str | None = None,
) -> int:
    """Run the monitor until done (`once`) or signalled; the process exit code.

    `peers` are `ID=mqtt://HOST:PORT` strings. MonitorConfigError when an option is unusable
    (checked before anything starts); OSError when the metrics port cannot be bound.
    """
    try:
        if wait < 0:
            raise ValueError(f"--wait must be >= 0, got {wait}")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be 0-65535, got {metrics_port}")
        bind = None if web is None else Bind.parse(web)
        if bind is not None:
            check_exposure(bind, web_token)
        where = state_dir or default_state_dir(network, "monitor")
        identity = load_identity(where)  # one id and key across runs: nodes pin it once
        # Keys pinned on first use persist only in a state dir the user chose: a default one
        # would refuse every node of a network restarted with fresh keys, run after run.
        keep = state_dir is not None or trust == "allowlist"
        if trust == "ca" and ca_key is None:
            raise ValueError("--trust ca needs --ca-key, the network's public key")
        policy = Trust(
            trust,  # type: ignore[arg-type]
            state_dir=where if keep else None,
            ca_key=None if ca_key is None else read_key_argument(ca_key),
            certificate=load_certificate(where) if trust == "ca" else None,
        )
        monitor = Monitor(
            network,
            brokers=brokers,
            interfaces=interfaces,
            peers=[StaticPeer.parse(text) for text in peers],
            use_mdns=mdns,
            stale_after=stale_after,
            forget_after=forget_after,
            trust=policy,
            identity=identity,
        )
    except (ValueError, OSError) as exc:
        raise MonitorConfigError(str(exc)) from None
    session = _Session(monitor, export=export, plot=plot, json_out=json_out)
    if bind is not None:
        session.web = WebDashboard(bind, token=web_token)
    return asyncio.run(session.run(once=once, wait=wait, metrics=(metrics_host, metrics_port)))


class _Session:
    def __init__(
        self, monitor: Monitor, *, export: Path | None, plot: Path | None, json_out: bool
    ) -> None:
        self.monitor = monitor
        self.export = export
        self.plot = plot
        self.json_out = json_out
        self.latest: dict[str, Any] | None = None
        self.history: list[tuple[float, float | None, float | None]] = []
        self.stop = asyncio.Event()
        self.web: WebDashboard | None = None

    def _on_signal(self, sig: int) -> None:
        """First SIGINT/SIGTERM: leave gracefully (bye on every broker). Second: exit now."""
        if self.stop.is_set():
            os._exit(128 + sig)
        self.stop.set()

    async def run(self, *, once: bool, wait: float, metrics: tuple[str, int | None]) -> int:
        server = self._serve(*metrics)
        if self.web is not None:
            url = await self.web.start()
            hint = "?token=..." if self.web.token is not None else ""
            sys.stderr.write(f"dashboard: {url}{hint}\n")
            sys.stderr.flush()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        console = Console()
        try:
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(self.monitor.run_until(self.stop))
                try:
                    if once:
                        await self._once(wait)
                    elif console.is_terminal:
                        with _logs_into(self.monitor), Live(
                            console=console, screen=True, auto_refresh=False
                        ) as live:  # fmt: skip
                            await self._loop(live, console)
                    else:
                        await self._loop(None, console)
                finally:
                    self.stop.set()
                await runner
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if server is not None:
                await asyncio.to_thread(server.shutdown)
            if self.web is not None:
                await self.web.stop()
        if self.plot is not None:
            await asyncio.to_thread(write_plot, self.history, self.plot, self.monitor.network)
        if once:
            self._print(console)
        return 0

    def _serve(self, host: str, port: int | None) -> MetricsServer | None:
        if port is None:
            return None
        return serve_metrics(port, MonitorCollector(lambda: self.latest), host=host)

    async def _once(self, wait: float) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            elapsed = time.monotonic() - started
            if elapsed >= wait:
                break
            if elapsed >= min(SETTLE, wait) and self.monitor.expected and self.monitor.settled():
                break
            await asyncio.sleep(0.1)
        await self._tick(export=True)

    async def _loop(self, live: Live | None, console: Console) -> None:
        last_export = 0.0
        while not self.stop.is_set():
            due = time.monotonic() - last_export >= EXPORT_EVERY
            if due:
                last_export = time.monotonic()
            await self._tick(export=due, log_lines=console.size.height)
            if live is not None and self.latest is not None:
                live.update(render_dashboard(self.latest, height=console.size.height), refresh=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH):
                    await self.stop.wait()

    async def _tick(self, *, export: bool, log_lines: int = 20) -> None:
        snap = self.monitor.snapshot(log_lines=log_lines)
        self.latest = snap
        if self.web is not None:
            self.web.update(snap, self.monitor.state)
        if not export:
            return
        if self.plot is not None:
            glob = snap["global"]
            self.history.append((snap["time"], glob["accuracy"], glob["divergence"]))
        if self.export is not None:
            line = json.dumps(snap, separators=(",", ":")) + "\n"
            await asyncio.to_thread(_append, self.export, line)

    def _print(self, console: Console) -> None:
        snap = self.latest or self.monitor.snapshot()
        if self.json_out:
            sys.stdout.write(json.dumps(snap, indent=2) + "\n")
            sys.stdout.flush()
        else:
            console.print(render_report(snap))
        if not snap["nodes"]:
            log.warning("no node of network %s was found", self.monitor.network)


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)


class _LogsToState(logging.Handler):
    """The monitor's own warnings, shown in the dashboard's log panel instead of on stderr."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(level=logging.WARNING)
        self.monitor = monitor

    def emit(self, record: logging.LogRecord) -> None:
        body = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "time": record.created,
        }
        self.monitor.state.on_log(self.monitor.monitor_id, body, sent_at=record.created)


@contextlib.contextmanager
def _logs_into(monitor: Monitor) -> Iterator[None]:
    """While the full-screen dashboard runs, log records would garble it: route them to it."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [_LogsToState(monitor)]
    try:
        yield
    finally:
        root.handlers[:] = saved
