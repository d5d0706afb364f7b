"""`batched`: one round of the batched engine's work against the same nodes one at a time.

Baseline, measured in the same run: the node engine's bare work for one round of
`sim/batched.toml` (cnn1d, Dirichlet 0.5, 3 local epochs) - every node's learner, built as the
simulator builds it on its shard, fits its local epochs and evaluates on the test set, side by
side on one worker per core with torch on one thread per op (`bare_loop`; no nodes, bus or
merging). Then the same nodes and shards as the batched engine holds them (`StackedModels`):
one round's training and evaluation, through `vmap` and through the forward written out as
channels-last grouped convolutions (`stacked_layers`). Each figure is the baseline's seconds
over the batched engine's (above 1: faster). Each size uses about 100 generated MNIST-1D
samples a node (`mnist1d:N`, the scenario's own data at 1,024 nodes).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import torch

import p2pfl
from p2pfl.bench.baseline import bare_loop
from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio, stopwatch
from p2pfl.learning.datasets import load_dataset
from p2pfl.simulation.batched import _BatchedRun, eval_dtype
from p2pfl.simulation.engine import node_ids
from p2pfl.simulation.scenario import Scenario, load_scenario

SCENARIO = Path(p2pfl.__file__).resolve().parent.parent / "sim" / "batched.toml"
SCHEDULE = "partial-mesh"


def run(options: BenchOptions) -> BenchResult:
    """One round at 32 nodes (`tiny`), 256 (`quick`) or 1,024 (`full`: the scenario's size)."""
    if not SCENARIO.is_file():
        raise FileNotFoundError(f"batched runs {SCENARIO}, which only a source checkout has")
    nodes: int = options.pick(32, 256, 1024)
    scenario = load_scenario(
        SCENARIO, {"nodes": nodes, "dataset": f"mnist1d:{100 * nodes}", "schedule": SCHEDULE}
    )
    options.progress(f"batched: {nodes} nodes, generating the data")
    node = scenario.node_config(SCHEDULE, 0, node_ids(nodes)[0])
    dataset = load_dataset(node.dataset, seed=node.seed)
    result = BenchResult(
        "batched",
        f"One round of {SCENARIO.name} at {nodes} nodes: batched engine vs one node at a time",
        ["engine", "nodes", "training s", "evaluation s", "round s", "speed-up"],
    )
    options.progress(f"batched: {nodes} learners one at a time (baseline)")
    configs = [scenario.node_config(SCHEDULE, i, n) for i, n in enumerate(node_ids(nodes))]
    baseline = asyncio.run(bare_loop(configs, 1, os.cpu_count() or 1))
    result.rows.append(_row("node engine's learners, one per node", nodes, None, None, baseline))
    for written_out in (False, True):
        path = "written out" if written_out else "vmap"
        options.progress(f"batched: {nodes} nodes stacked, {path}")
        fit, evaluate = _batched_round(scenario, dataset, written_out=written_out)
        row = _row(f"batched engine, {path}", nodes, fit, evaluate, baseline)
        result.rows.append(row)
        result.figures.append(Figure(f"batched ({path}) vs one node at a time", row["speed-up"]))
    vmapped, written = result.rows[1]["round s"], result.rows[2]["round s"]
    result.figures.append(Figure("written out vs vmap", ratio(vmapped, written)))
    result.notes.append(
        f"cnn1d, Dirichlet 0.5, {scenario.node.local_epochs} local epochs of batch "
        f"{scenario.node.batch_size}, every node evaluated on {min(1000, len(dataset.y_test)):,} "
        "test samples; loading the data and building the models are not timed. sim/batched.toml "
        "runs 100 such rounds (and the merges, ~0.1 s a round) at 1,024 nodes."
    )
    evaluates = str(eval_dtype(scenario)).removeprefix("torch.")
    result.notes.append(
        f"The batched engine trains in {scenario.train_precision} and evaluates in {evaluates} "
        "here (the scenario's train_precision and eval_precision: see README, Two engines); "
        "the learners train and evaluate in float32."
    )
    return result


def _batched_round(scenario: Scenario, dataset: Any, *, written_out: bool) -> tuple[float, float]:
    """Seconds of one round's training and evaluation of every node, stacked."""
    run = _BatchedRun(scenario, SCHEDULE, dataset, None, written_out=written_out)
    models, c = run.models, run.config
    nodes = torch.arange(models.n)
    with stopwatch() as elapsed:
        models.fit(
            nodes, epochs=c.local_epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum
        )
        fit = elapsed()
    with stopwatch() as elapsed:
        models.evaluate(nodes, run.x_test, run.y_test)
        return fit, elapsed()


def _row(
    engine: str, nodes: int, fit: float | None, evaluate: float | None, baseline: float
) -> dict[str, Any]:
    seconds = baseline if fit is None or evaluate is None else fit + evaluate
    speedup = ratio(baseline, seconds)
    return {
        "engine": engine,
        "nodes": nodes,
        "training s": None if fit is None else round(fit, 3),
        "evaluation s": None if evaluate is None else round(evaluate, 3),
        "round s": round(seconds, 3),
        "speed-up": None if speedup is None else round(speedup, 3),
    }
