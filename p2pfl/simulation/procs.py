"""`p2pfl sim --broker URI --processes P`: the same scenario with its nodes spread over P OS
processes, all on one real MQTT broker, to check that results match the in-memory run. With
`--shard I/P` (p2pfl.simulation.shard) the workers run only this machine's shard of the nodes.

The parent starts P workers per schedule (`python -m p2pfl.simulation.procs`), hands each the
scenario as JSON on stdin and a share of the node indices, and follows the JSON lines each
worker appends to its records file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from p2pfl.simulation.engine import Record, ScheduleRun, Simulation
from p2pfl.simulation.scenario import Scenario


def run_in_processes(
    scenario: Scenario,
    *,
    broker: str,
    processes: int,
    on_record: Callable[[Record], None] | None = None,
) -> list[ScheduleRun]:
    """Every schedule of `scenario`, its nodes split round-robin over `processes` workers."""
    everyone = list(range(scenario.nodes))
    runs = []
    for schedule in scenario.compare:
        run = run_schedule_in_processes(
            scenario, schedule, broker=broker, indices=everyone, processes=processes,
            on_record=on_record,
        )  # fmt: skip
        runs.append(run)
    return runs


def run_schedule_in_processes(
    scenario: Scenario,
    schedule: str,
    *,
    broker: str,
    indices: list[int],
    processes: int,
    on_record: Callable[[Record], None] | None = None,
) -> ScheduleRun:
    """One schedule of `scenario` for the nodes `indices` (all of them, or one shard's), split
    round-robin over `processes` workers; the other nodes, if any, run elsewhere on `broker`."""
    processes = max(1, min(processes, len(indices)))
    # only what differs from defaults: the [node] table refuses keys that mean nothing in sim
    payload = scenario.model_dump_json(exclude_defaults=True)
    run = ScheduleRun(schedule)
    started = time.monotonic()
    workers: list[tuple[subprocess.Popen[bytes], IO[str]]] = []
    with tempfile.TemporaryDirectory(prefix="p2pfl-procs-") as tmp:
        for k in range(processes):
            share = ",".join(str(i) for i in indices[k::processes])
            out = Path(tmp) / f"{schedule}-{k}.jsonl"
            out.touch()
            proc = subprocess.Popen(
                [sys.executable, "-m", "p2pfl.simulation.procs", "--schedule", schedule,
                 "--indices", share, "--broker", broker, "--out", str(out)],
                stdin=subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(payload.encode())
            proc.stdin.close()
            workers.append((proc, out.open()))
        try:
            while True:
                finished = all(p.poll() is not None for p, _ in workers)
                for _, reader in workers:
                    for line in reader.readlines():
                        if line.endswith("\n"):
                            record = json.loads(line)
                            run.records.append(record)
                            if on_record is not None:
                                on_record(record)
                if finished:
                    break
                time.sleep(0.2)
        finally:
            for proc, reader in workers:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)
                reader.close()
    failed = [p.returncode for p, _ in workers if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} simulation worker(s) failed for {schedule}")
    run.wall_seconds = time.monotonic() - started
    return run


async def _work(
    scenario: Scenario, schedule: str, indices: set[int], broker: str, out: Path
) -> None:
    with out.open("a") as fh:

        def write(record: Record) -> None:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            fh.flush()

        simulation = Simulation(scenario, on_record=write, broker=broker, only=indices)
        await simulation.load()
        await simulation.run_schedule(schedule)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: one schedule, a share of the nodes, records to a file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--indices", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    scenario = Scenario.model_validate_json(sys.stdin.read())
    indices = {int(i) for i in args.indices.split(",") if i}
    asyncio.run(_work(scenario, args.schedule, indices, args.broker, args.out))


if __name__ == "__main__":
    main()
