"""`overhead`: what the simulator costs on top of the training it simulates.

Baseline, measured in the same run: the same learners (built from the same node configs, on
the same partitions) fit and evaluated for the same rounds in a bare loop on the simulator's
own thread pool (`training_threads`), with no nodes, bus, encoding or merging. Then the
simulator runs the scenario on one schedule. The figure is the ratio of the two wall times
(1.0: the simulator is free). Dataset loading is outside both timings.
"""

from __future__ import annotations

import asyncio
from typing import Any

from p2pfl.bench.baseline import bare_loop
from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio, stopwatch
from p2pfl.simulation.engine import Simulation, node_ids
from p2pfl.simulation.scenario import load_scenario

SCHEDULE = "partial-mesh"
GOAL = "<= 1.2"


def run(options: BenchOptions) -> BenchResult:
    """The default scenario at 16, 64 and 256 nodes (`--quick`: 16 and 64): simulator wall time
    over bare-loop wall time. Start-up (nodes hearing each other) counts: at 256 nodes it
    dominates today (every node hears every other's presence; see `scale`)."""
    # (nodes, rounds): bigger networks run fewer rounds so the whole bench stays short.
    sizes: list[tuple[int, int]] = options.pick(
        [(4, 2)], [(16, 3), (64, 2)], [(16, 10), (64, 5), (256, 3)]
    )
    result = BenchResult(
        "overhead",
        "Simulator against the same training in a bare loop",
        ["nodes", "rounds", "model", "bare loop s", "simulator s", "ratio"],
    )
    for nodes, rounds in sizes:
        options.progress(f"overhead: {nodes} nodes, {rounds} rounds")
        row = asyncio.run(_measure(nodes, rounds))
        result.rows.append(row)
        result.figures.append(Figure(f"overhead, {nodes} nodes", row["ratio"], goal=GOAL))
    result.notes.append(
        f"Default scenario on {SCHEDULE}; both timings share one thread pool of one worker per "
        "core, torch on one thread per op."
    )
    return result


async def _measure(nodes: int, rounds: int) -> dict[str, Any]:
    scenario = load_scenario(None, {"nodes": nodes, "rounds": rounds, "schedule": SCHEDULE})
    sim = Simulation(scenario)
    await sim.load()  # the dataset, once, for both timings
    configs = [
        scenario.node_config(SCHEDULE, i, node_id)
        for i, node_id in enumerate(node_ids(scenario.nodes))
    ]
    bare = await bare_loop(configs, rounds, sim.workers)
    with stopwatch() as elapsed:
        await sim.run_schedule(SCHEDULE)
        simulated = elapsed()
    return {
        "nodes": nodes,
        "rounds": rounds,
        "model": scenario.node.model,
        "bare loop s": round(bare, 3),
        "simulator s": round(simulated, 3),
        "ratio": None if (r := ratio(simulated, bare)) is None else round(r, 3),
    }
