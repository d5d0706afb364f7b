"""`convergence`: how fast each schedule learns, against centralized training in the same run.

The default scenario (16 nodes, MNIST-1D split Dirichlet 0.5, cnn1d, SGD with momentum, sync
rounds) runs once per schedule (ring, random-walk, partial-mesh). The baseline is centralized
training: one learner of the same model and optimizer settings on every node's data together,
given the same total number of sample-gradient steps (a round of all nodes is `local_epochs`
passes over their data; the centralized learner makes as many passes, evaluated after each
round's worth). Per run: rounds, seconds and bytes sent until the mean accuracy first reaches
0.80 and 0.90 ("not reached" otherwise), and the final mean and minimum accuracy over nodes.
The figures: each schedule's final mean accuracy as a fraction of the centralized one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio, stopwatch
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import learner_from_config
from p2pfl.simulation.engine import Simulation, training_threads
from p2pfl.simulation.report import first_reaching, summarize
from p2pfl.simulation.scenario import Scenario, load_scenario

TARGETS = (0.80, 0.90)
SCHEDULES = ("ring", "random-walk", "partial-mesh")
CENTRALIZED = "centralized"


def run(options: BenchOptions) -> BenchResult:
    """Each schedule of the default scenario, then centralized training of as many steps."""
    nodes: int = options.pick(4, 16, 16)
    rounds: int = options.pick(1, 10, 100)
    # The table shows each target's rounds, seconds and bytes in one cell; the JSON rows
    # also have them apart (`rounds to 0.80`, `s to 0.80`, `MB to 0.80`).
    result = BenchResult(
        "convergence",
        f"{nodes} nodes, Dirichlet 0.5, cnn1d: each schedule against centralized training",
        ["run", "rounds", *(f"to {t:.2f}" for t in TARGETS), "final mean acc", "final min acc"],
    )
    result.rows = asyncio.run(_measure(nodes, rounds, options))
    central = result.rows[-1]["final mean acc"]
    for row in result.rows[:-1]:
        share = ratio(row["final mean acc"], central)
        result.figures.append(
            Figure(
                f"{row['run']}: final mean accuracy / centralized", share, note=f"{rounds} rounds"
            )
        )
    result.notes.append(
        f"Centralized: one learner on all {nodes} nodes' data, the same optimizer settings and "
        "sample-gradient steps, in the same run; its bytes are 0. Seconds count from each "
        "schedule's start (start-up included); rows say 'not reached' where a target was not."
    )
    return result


async def _measure(nodes: int, rounds: int, options: BenchOptions) -> list[dict[str, Any]]:
    scenario = load_scenario(None, {"nodes": nodes, "rounds": rounds, "schedule": list(SCHEDULES)})
    config = scenario.node_config(SCHEDULES[0], 0, "n01")
    data = await asyncio.to_thread(load_dataset, config.dataset, seed=config.seed)
    sim = Simulation(scenario, dataset=data)
    await sim.load()
    rows = []
    for schedule in SCHEDULES:
        options.progress(f"convergence: {schedule}, {nodes} nodes, {rounds} rounds")
        run = await sim.run_schedule(schedule)
        summary = summarize(run.records, wall_seconds={schedule: run.wall_seconds})
        final = summary["schedules"][schedule]
        reached = {t: first_reaching(run.records, t)[schedule] for t in TARGETS}
        rows.append(_row(schedule, final["rounds"], reached, final["final_mean_accuracy"],
                         final["final_min_accuracy"]))  # fmt: skip
    options.progress(f"convergence: centralized, {rounds} rounds' worth of steps")
    # Torch on one thread per op, as each simulated node trains: more threads on a busy
    # machine can be many times slower, not faster.
    with training_threads(1):
        rows.append(await asyncio.to_thread(_centralized, scenario, data, rounds))
    return rows


def _centralized(scenario: Scenario, data: Dataset, rounds: int) -> dict[str, Any]:
    """One learner on every node's data, for the sample-gradient steps of `rounds` rounds."""
    config = scenario.node_config(SCHEDULES[0], 0, "n01")
    parts = partition(data.y_train, scenario.nodes, config.partition, seed=config.seed)
    everything = np.sort(np.concatenate(parts))
    # A round: every node makes `local_epochs` passes over its part; so does one fit here.
    steps = rounds * config.local_epochs * sum(len(p) for p in parts)
    fits = steps // (config.local_epochs * len(everything))
    learner = learner_from_config(config, data, everything)
    curve: list[tuple[int, float, float]] = []  # (round's worth, seconds, accuracy)
    with stopwatch() as elapsed:
        for r in range(1, fits + 1):
            learner.fit()
            curve.append((r, elapsed(), learner.evaluate().accuracy))
    reached = {
        t: next(({"round": r, "t": s, "bytes": 0} for r, s, a in curve if a >= t), None)
        for t in TARGETS
    }
    return _row(CENTRALIZED, fits, reached, curve[-1][2], curve[-1][2])


def _row(
    name: str,
    rounds: int,
    reached: dict[float, dict[str, float] | None],
    mean: float,
    low: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"run": name, "rounds": rounds}
    for target, point in reached.items():
        key = f"{target:.2f}"
        if point is None:
            row |= dict.fromkeys((f"rounds to {key}", f"s to {key}", f"MB to {key}"), "not reached")
            row[f"to {key}"] = "not reached"
        else:
            row[f"rounds to {key}"] = int(point["round"])
            row[f"s to {key}"] = round(point["t"], 2)
            row[f"MB to {key}"] = round(point["bytes"] / 1e6, 3)
            row[f"to {key}"] = (
                f"round {point['round']:.0f}, {point['t']:.1f} s, {point['bytes'] / 1e6:.1f} MB"
            )
    row["final mean acc"] = round(mean, 4)
    row["final min acc"] = round(low, 4)
    return row
