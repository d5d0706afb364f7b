"""`scale`: how the simulator's cost grows with the number of nodes.

Each size runs `p2pfl sim sim/large.toml --nodes N --rounds R` (mlp, 4-regular partial mesh,
sync rounds) in a fresh child process, so one size's peak memory is not left over from the
last. Per size, from the child's metrics and its resource usage:
- start-up: seconds from the schedule's start until the last node began its first round
  (every node first waits to have heard every other's presence);
- wall per round: from then until the last node reported its last round, per round;
- peak RSS of the child process;
- membership messages (presence records and shuffles delivered) per node per round, start-up
  included, and per second of the run.
The baseline is the smallest size: each column's growth factor per doubling of N (1: flat,
2: linear in N, 4: quadratic). Each size has a time cap; a size past it says so in its row,
with whatever it measured before the cap, and the bench goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import p2pfl
from p2pfl.bench.core import BenchOptions, BenchResult, Figure, growth_per_doubling, python_command
from p2pfl.learning.datasets import load_dataset
from p2pfl.simulation.report import read_metrics
from p2pfl.simulation.scenario import load_scenario

SCENARIO = Path(p2pfl.__file__).resolve().parent.parent / "sim" / "large.toml"
COLUMNS = [
    "start-up s", "wall/round s", "peak RSS MB", "membership msgs/node/round",
    "membership msgs/node/s",
]  # fmt: skip


def run(options: BenchOptions) -> BenchResult:
    """The large scenario at growing sizes, each in its own process under a time cap."""
    if not SCENARIO.is_file():
        raise FileNotFoundError(f"scale runs {SCENARIO}, which only a source checkout has")
    sizes: list[int] = options.pick([8, 16], [16, 32, 64], [64, 256, 1024])
    if options.big:
        sizes = [*sizes, 4096]
    rounds: int = options.pick(1, 2, 5)
    # 1,024 nodes x 5 rounds is the scale issue's 10-minute run: the cap leaves it room
    cap: float = options.pick(60.0, 120.0, 900.0)
    # Generated (mnist1d:N) and cached here, once, so that no size's cap includes generating it.
    node = load_scenario(SCENARIO, {}).node_config("partial-mesh", 0, "n1")
    load_dataset(node.dataset, seed=node.seed)
    result = BenchResult(
        "scale",
        f"{SCENARIO.name} at growing sizes, {rounds} rounds, each in a fresh process",
        ["nodes", "rounds", *COLUMNS, "status"],
    )
    with TemporaryDirectory(prefix="p2pfl-bench-scale-", dir=options.workdir) as tmp:
        for nodes in sizes:
            result.rows.append(_measure(nodes, rounds, cap, Path(tmp) / f"n{nodes}", options))
    for column in COLUMNS:
        measured = [(r["nodes"], r[column]) for r in result.rows if r[column] is not None]
        growth = growth_per_doubling([n for n, _ in measured], [v for _, v in measured])
        span = f"{measured[0][0]} to {measured[-1][0]} nodes" if len(measured) > 1 else ""
        result.figures.append(Figure(f"{column}, growth per doubling", growth, note=span))
    result.notes.append(
        "Start-up and wall/round are timed inside the child from its metrics (process start "
        "and dataset loading excluded); peak RSS is the child's whole life. A growth of 4 per "
        "doubling is quadratic in N."
    )
    return result


def _measure(
    nodes: int, rounds: int, cap: float, out: Path, options: BenchOptions
) -> dict[str, Any]:
    """One size in a child `p2pfl sim`, killed at `cap` seconds."""
    out.mkdir(parents=True)
    command = [
        *python_command(), "sim", str(SCENARIO), "--nodes", str(nodes), "--rounds", str(rounds),
        "--out", str(out), "--json", "--no-plots",
    ]  # fmt: skip
    with (out / "sim.log").open("wb") as log:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def progress(seconds: float) -> None:
        options.progress(f"scale: {nodes} nodes, {seconds:.0f} s (cap {cap:.0f} s)")

    exit_code, peak_kb, capped = _wait(child, cap, progress)
    metrics = out / "metrics.jsonl"
    row = _from_records(read_metrics(metrics) if metrics.exists() else [], nodes)
    done = row.pop("done")
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak_mb = peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20
    if capped:
        status = f"did not finish in {cap:.0f} s ({done}/{rounds} rounds)"
    elif exit_code != 0:
        tail = (out / "sim.log").read_text(errors="replace").strip().splitlines()[-1:]
        status = f"failed (exit {exit_code}): {' '.join(tail)}"
    else:
        status = "ok"
    row["peak RSS MB"] = round(peak_mb, 1)
    return {"nodes": nodes, "rounds": rounds, **{c: row[c] for c in COLUMNS}, "status": status}


def _wait(
    child: subprocess.Popen[bytes], cap: float, progress: Callable[[float], None]
) -> tuple[int, int, bool]:
    """Reap `child` (killing it at `cap` seconds): its exit code, peak RSS and whether capped.

    `os.wait4` gives the resource usage of this one child, so the sizes' peaks stay apart."""
    started = time.monotonic()
    capped = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid == child.pid:
            break
        elapsed = time.monotonic() - started
        if elapsed >= cap and not capped:
            capped = True
            child.send_signal(signal.SIGKILL)
        progress(elapsed)
        time.sleep(0.2)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss, capped


def _from_records(records: list[dict[str, Any]], nodes: int) -> dict[str, Any]:
    """Start-up, wall per round and membership messages from a size's records (None where the
    run did not get that far); `done`: rounds every node completed."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS[:2] + COLUMNS[3:])
    latest: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        latest.setdefault(r["node"], {})[int(r["round"])] = r
    done = 0
    if len(latest) == nodes:
        done = min(max(by_round) for by_round in latest.values())
    row["done"] = done
    if done == 0:
        return row
    firsts = [by_round[min(by_round)] for by_round in latest.values()]
    # a node that caught up may skip a round number: its first record at or after `done`
    lasts = [by_round[min(r for r in by_round if r >= done)] for by_round in latest.values()]
    startup = max(r["t"] - r["round_seconds"] for r in firsts)
    finish = max(r["t"] for r in lasts)
    membership = sum(r["membership_received"] for r in lasts)
    row["start-up s"] = round(startup, 3)
    row["wall/round s"] = round((finish - startup) / done, 3)
    row["membership msgs/node/round"] = round(membership / nodes / done, 1)
    # per second too: membership timers run on the wall clock, and one process's rounds last
    # longer the more nodes share its cores, so per round grows where per second does not
    row["membership msgs/node/s"] = round(membership / nodes / finish, 2)
    return row
