"""`daemon`: what real `p2pfl run` processes cost on top of the training they do.

N daemons (8; `--quick` 4) run as separate processes on this machine in sync mode for R rounds
(10; `--quick` 4), learning with the defaults of `p2pfl run` (cnn1d on MNIST-1D, 3 local
epochs), the dataset cut into N shares, one per daemon. Each runs on two brokers:
- `mosquitto`: one shared Mosquitto (`--broker mqtt://...`), peers found by their presence;
- `embedded`: each daemon's own embedded home broker (`--listen`), peers given by `--peer`;
and on two schedules: ring, and partial-mesh of degree N/2 (at most 4). mDNS is off
(`--discovery static,presence`); everything listens on 127.0.0.1. (The tests' tiny size: 2
daemons, 2 rounds, the mlp for 1 epoch, the ring only.)

Wall per round, read from the daemons' JSON logs: from the first daemon's start of round 1 to
the last daemon's end of round R, divided by R (start-up, imports and data loading are outside;
they are the `start-up s` column). `fit+eval s/round` is the training inside the daemons, from
the same logs (the mean over the daemons): the rest of a round is messaging and waiting.

Baseline, measured in the same run: the same N learners (same model, data share, epochs) fit
and evaluated for R rounds in one process, on a pool of one thread per core, torch on one
thread per op (each daemon gets one torch thread too), with no broker, encoding, signing,
waiting or merging. The figure is the ratio of the two walls per round (1.0: the daemons are
free); the goal is 1.5.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.bench.baseline import bare_loop
from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio
from p2pfl.bench.processes import NO_MDNS, Processes
from p2pfl.config import load_config
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto, free_ports

GOAL = "<= 1.5"
SCHEDULES = ["ring", "partial-mesh"]
NETWORK = "bench-daemon"
ROUND_TIMEOUT = 60.0
# Start-up (torch import, data, model) of N processes sharing the cores, then the rounds.
START_UP_ALLOWANCE = 120.0


def run(options: BenchOptions) -> BenchResult:
    """Each broker x schedule: the daemons' wall per round / the bare loop's."""
    daemons: int = options.pick(2, 4, 8)
    rounds: int = options.pick(2, 4, 10)
    # Two daemons make one graph whatever the schedule: tiny runs the ring only.
    schedules = SCHEDULES[:1] if daemons == 2 else SCHEDULES
    # tiny is for the tests: a model that trains in no time
    recipe: dict[str, Any] = options.pick({"model": "mlp", "local_epochs": 1}, {}, {})
    result = BenchResult(
        "daemon",
        "Real p2pfl run processes against the same training in a bare loop",
        ["broker", "schedule", "daemons", "rounds", "start-up s", "bare s/round",
         "daemon s/round", "fit+eval s/round", "ratio"],
    )  # fmt: skip
    load = os.getloadavg()[0]
    options.progress(f"daemon: bare loop, {daemons} learners, {rounds} rounds")
    configs = [load_config(None, training(daemons, i, recipe)) for i in range(daemons)]
    bare = asyncio.run(bare_loop(configs, rounds, os.cpu_count() or 1)) / rounds
    brokers = ["mosquitto", "embedded"] if find_mosquitto() else ["embedded"]
    if "mosquitto" not in brokers:
        result.notes.append("mosquitto not found: the embedded brokers only")
    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-daemon-", dir=options.workdir) as tmp:
        for broker in brokers:
            for schedule in schedules:
                options.progress(f"daemon: {daemons} daemons, {broker}, {schedule}")
                workdir = Path(tmp) / f"{broker}-{schedule}"
                workdir.mkdir()
                timing = run_daemons(workdir, broker, schedule, daemons, rounds, recipe)
                per_round = timing.wall / rounds
                row_ratio = ratio(per_round, bare)
                result.rows.append(
                    {
                        "broker": broker,
                        "schedule": schedule,
                        "daemons": daemons,
                        "rounds": rounds,
                        "start-up s": round(timing.start_up, 2),
                        "bare s/round": round(bare, 3),
                        "daemon s/round": round(per_round, 3),
                        "fit+eval s/round": round(timing.train, 3),
                        "ratio": None if row_ratio is None else round(row_ratio, 3),
                    }
                )
                result.figures.append(
                    Figure(f"daemon wall per round, {broker}, {schedule}", row_ratio, goal=GOAL)
                )
    model = load_config(None, training(daemons, 0, recipe))
    result.notes.append(
        f"load average at the start: {load:.1f} on {os.cpu_count()} cores (the ratio wants a "
        "quiet machine: under others' load the daemons, one process each, get more CPU "
        "than the bare loop's one process)"
    )
    result.notes.append(
        f"sync mode, {model.model}, {model.local_epochs} local epochs, "
        f"partial-mesh degree {mesh_degree(daemons)}; one torch thread per daemon and per "
        f"bare-loop worker ({os.cpu_count()} workers)"
    )
    return result


def mesh_degree(daemons: int) -> int:
    """Partial-mesh degree: half the daemons, at most 4 (the default), at least 1."""
    return max(1, min(4, daemons // 2))


def training(daemons: int, index: int, recipe: dict[str, Any]) -> dict[str, Any]:
    """The config keys that decide what daemon `index` trains (the rest: `p2pfl run`'s
    defaults, unless `recipe` sets them). The daemons get them as flags, the bare loop as a
    `NodeConfig`."""
    return {"num_partitions": daemons, "partition_index": index, "seed": 0, **recipe}


def flags(keys: dict[str, Any]) -> list[str]:
    """Config keys as `p2pfl run` flags."""
    return [
        arg for key, value in keys.items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]


@dataclass(frozen=True)
class Timing:
    """One run of the daemons, from their JSON logs."""

    start_up: float  # launch of the first process to the start of round 1
    wall: float  # start of the first daemon's round 1 to the end of the last daemon's last
    train: float  # fit + eval seconds per round, the mean over the daemons


def run_daemons(
    workdir: Path, broker: str, schedule: str, daemons: int, rounds: int, recipe: dict[str, Any]
) -> Timing:
    """Run the daemons to the end of their rounds; their timing."""
    ids = [f"d{i}" for i in range(daemons)]
    common = [
        "--network", NETWORK, "--mode", "sync", "--rounds", str(rounds),
        "--round-timeout", str(ROUND_TIMEOUT), "--min-peers", str(daemons - 1),
        "--schedule", schedule, "--degree", str(mesh_degree(daemons)), *NO_MDNS,
    ]  # fmt: skip
    with Processes(workdir) as processes:
        shared = MosquittoBroker(port=0) if broker == "mosquitto" else None
        ports = free_ports(daemons)
        try:
            if shared is not None:
                shared.start()
            for i, node_id in enumerate(ids):
                if shared is not None:
                    where = ["--broker", shared.uri]
                else:
                    where = ["--listen", f"127.0.0.1:{ports[i]}"]
                    where += [
                        arg
                        for j, other in enumerate(ids)
                        if j != i
                        for arg in ("--peer", f"{other}=mqtt://127.0.0.1:{ports[j]}")
                    ]
                args = ["--id", node_id, "--state-dir", str(workdir / node_id), *common, *where]
                processes.run(node_id, [*args, *flags(training(daemons, i, recipe))])
            processes.wait_all(START_UP_ALLOWANCE + rounds * ROUND_TIMEOUT)
        finally:
            processes.stop()
            if shared is not None:
                shared.close()
        logs = [p.events("round") for p in processes.all]
        done = [r[-1]["round"] if r else 0 for r in logs]
        if min(done) < rounds:
            raise RuntimeError(
                f"daemons stopped at rounds {done}, expected {rounds}\n{processes.tails()}"
            )
        launched = min(p.started for p in processes.all)
    first = min(r[0]["ts"] - r[0]["seconds"] for r in logs)
    last = max(r[-1]["ts"] for r in logs)
    train = statistics.mean(
        statistics.mean(x["fit_seconds"] + x["eval_seconds"] for x in r) for r in logs
    )
    return Timing(start_up=first - launched, wall=last - first, train=train)
