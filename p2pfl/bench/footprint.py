"""`footprint`: what one idle daemon costs its machine, alone and with a monitor watching it.

Idle, as a user meets it: a `p2pfl run` node that is up (data and model loaded, its embedded
broker listening on 127.0.0.1, its presence announced, telemetry published every 5 s as by
default) and waiting for a peer to train with: sync mode, `--min-peers 1`, no peer yet. That
is the node started first on a network, or the one whose peers are down. (`--rounds 0` is not
idle: it means train until stopped; a node whose rounds are done exits.) mDNS is off.

For W seconds (60; `--quick` 30), once the node has started: its CPU time (user + system,
psutil, as percent of one core) and its resident memory, sampled every second (the peak, in
MB). Then `p2pfl monitor` attaches (given the node with `--peer`, mDNS off, exporting a
snapshot every second) and, once the monitor shows the node, the same window again. The
monitor's own CPU and RSS are in the table. The goals are absolute: under 1 % of one core and
under 300 MB, alone and watched; the node must not train meanwhile (the bench checks).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from p2pfl.bench.core import BenchOptions, BenchResult, Figure
from p2pfl.bench.processes import NO_MDNS, Process, Processes, wait_for
from p2pfl.transport.mosquitto import free_ports

CPU_GOAL = "< 1"
RSS_GOAL = "< 300"
NETWORK = "bench-footprint"
NODE = "idle"
START_UP = 120.0  # seconds a node (or monitor) may take to come up on a busy machine
SETTLE = 2.0  # seconds after start-up before measuring (tiny: less): the last of it is not idle


def run(options: BenchOptions) -> BenchResult:
    """One idle daemon for W seconds, then W more with a monitor attached."""
    window: float = options.pick(3.0, 30.0, 60.0)
    settle = min(SETTLE, window / 3)
    result = BenchResult(
        "footprint",
        "One idle daemon: CPU and memory, alone and with a monitor attached",
        ["setting", "seconds", "daemon CPU %", "daemon RSS MB", "monitor CPU %",
         "monitor RSS MB"],
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="p2pfl-bench-footprint-", dir=options.workdir) as tmp,
        Processes(Path(tmp)) as processes,
    ):
        workdir = Path(tmp)
        (port,) = free_ports(1)
        node = processes.run(
            NODE,
            ["--id", NODE, "--network", NETWORK, "--state-dir", str(workdir / NODE),
             "--listen", f"127.0.0.1:{port}", "--mode", "sync", "--min-peers", "1",
             "--round-timeout", str(10 * window + START_UP), *NO_MDNS],
        )  # fmt: skip
        options.progress("footprint: starting an idle daemon")
        wait_for(lambda: _started(node), START_UP, "node started", node)
        time.sleep(settle)
        options.progress(f"footprint: idle daemon, {window:g} s")
        alone = measure([node], window)
        export = workdir / "monitor.jsonl"
        monitor = processes.start(
            "monitor",
            ["monitor", "--network", NETWORK, "--peer", f"{NODE}=mqtt://127.0.0.1:{port}",
             "--no-mdns", "--export", str(export), "--state-dir", str(workdir / "monitor")],
        )  # fmt: skip
        options.progress("footprint: attaching a monitor")
        wait_for(lambda: _watched(export), START_UP, "node in the monitor's snapshot", monitor)
        time.sleep(settle)
        options.progress(f"footprint: idle daemon with a monitor, {window:g} s")
        watched = measure([node, monitor], window)
        if node.events("round"):
            raise RuntimeError(f"the idle daemon trained: not idle\n{node.tail()}")
    for setting, sample in (("alone", alone), ("with a monitor", watched)):
        daemon, other = sample[0], sample[1] if len(sample) > 1 else None
        result.rows.append(
            {
                "setting": setting,
                "seconds": round(daemon.seconds, 1),
                "daemon CPU %": round(daemon.cpu, 3),
                "daemon RSS MB": round(daemon.rss, 1),
                "monitor CPU %": None if other is None else round(other.cpu, 3),
                "monitor RSS MB": None if other is None else round(other.rss, 1),
            }
        )
        suffix = "" if setting == "alone" else f", {setting}"
        result.figures += [
            Figure(f"idle CPU{suffix}", daemon.cpu, "% of a core", CPU_GOAL),
            Figure(f"idle RSS{suffix}", daemon.rss, "MB", RSS_GOAL),
        ]
    result.notes.append(
        "idle: a started node waiting for its first peer (sync, --min-peers 1), embedded "
        "broker, default telemetry; RSS is the peak of samples every second"
    )
    return result


class Usage:
    """What one process used over a window: CPU as percent of one core, peak RSS in MB."""

    def __init__(self, seconds: float, cpu_seconds: float, rss_bytes: int) -> None:
        self.seconds = seconds
        self.cpu = 100 * cpu_seconds / seconds
        self.rss = rss_bytes / 2**20


def measure(processes: list[Process], window: float) -> list[Usage]:
    """Each process's CPU and peak RSS over the next `window` seconds."""
    handles = [psutil.Process(p.pid) for p in processes]
    started = time.monotonic()
    cpu0 = [_cpu_seconds(h) for h in handles]
    peak = [h.memory_info().rss for h in handles]
    deadline = started + window
    while (now := time.monotonic()) < deadline:
        time.sleep(min(1.0, deadline - now))
        for p in processes:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while measured\n{p.tail()}")
        peak = [max(old, h.memory_info().rss) for old, h in zip(peak, handles, strict=True)]
    seconds = time.monotonic() - started
    return [
        Usage(seconds, _cpu_seconds(h) - before, rss)
        for h, before, rss in zip(handles, cpu0, peak, strict=True)
    ]


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _started(node: Process) -> bool:
    return any(r.get("msg", "").startswith("node started") for r in node.records())


def _watched(export: Path) -> bool:
    """Whether the monitor's latest snapshot shows the node."""
    if not export.exists():
        return False
    lines = export.read_text().splitlines()
    if not lines:
        return False
    try:
        snapshot: dict[str, Any] = json.loads(lines[-1])
    except ValueError:  # a line being written
        return False
    return any(n.get("id") == NODE for n in snapshot.get("nodes", []))
