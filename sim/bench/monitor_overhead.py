"""Does watching a network slow it down? Training seconds per round, without and with a monitor.

Runs three `p2pfl run` nodes (embedded brokers on 127.0.0.1, static peers, telemetry every
second, one torch thread each, 0.3 s between steps) for the same time: alone (the baseline)
and with `p2pfl monitor` attached and exporting snapshots, alternating. Prints the mean fit
seconds per round of each setting and their ratio (1.00 = no cost; the goal is within 1.05).
Measured on a 2-core machine: 0.99.

    python sim/bench/monitor_overhead.py [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pfl.transport.mosquitto import free_ports


def run(seconds: float, with_monitor: bool, workdir: Path) -> float:
    ports = free_ports(3)
    net = f"bench{int(time.time())}"
    procs, logs = [], []
    for i in range(3):
        peers = [a for j in range(3) if j != i
                 for a in ("--peer", f"b{j}=mqtt://127.0.0.1:{ports[j]}")]  # fmt: skip
        log = workdir / f"{'mon' if with_monitor else 'base'}-{i}.log"
        logs.append(log)
        cmd = [sys.executable, "-m", "p2pfl", "run", "--id", f"b{i}", "--network", net,
               "--listen", f"127.0.0.1:{ports[i]}", "--interface", "127.0.0.1",
               "--state-dir", str(workdir / f"{log.stem}-state"), "--num-partitions", "3",
               "--partition-index", str(i), "--duration", str(seconds),
               "--telemetry-interval", "1", "--log-format", "json", "--period", "0.3",
               *peers]  # fmt: skip
        # One torch thread per node and a pause between steps: three nodes sharing a small
        # machine would otherwise saturate it, and the comparison would measure CPU contention
        # (on a real network the monitor runs elsewhere).
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env))
    monitor = None
    if with_monitor:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", net, "--interface",
             "127.0.0.1", "--export", str(workdir / "snaps.jsonl")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    for p in procs:
        p.wait()
    if monitor is not None:
        monitor.send_signal(signal.SIGINT)
        monitor.wait(30)
    fits = []
    for log in logs:
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            # steady state: skip the rounds that overlap process start-ups
            if rec.get("event") == "round" and rec["round"] > 5:
                fits.append(rec["fit_seconds"])
    return statistics.mean(fits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--repeat", type=int, default=2, help="alternate runs per setting")
    args = parser.parse_args()
    bases, watched = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # alternate, so drift in machine load hits both alike
            bases.append(run(args.seconds, False, Path(tmp)))
            watched.append(run(args.seconds, True, Path(tmp)))
    base, seen = statistics.mean(bases), statistics.mean(watched)
    print(f"fit seconds per round, no monitor:   {base:.4f}  runs: {bases}")
    print(f"fit seconds per round, with monitor: {seen:.4f}  runs: {watched}")
    print(f"ratio with/without: {seen / base:.3f}")


if __name__ == "__main__":
    main()
