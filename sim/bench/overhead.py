"""How much the simulator costs on top of the training it simulates.

Baseline, measured in the same run: the same N learners trained and evaluated for the same
rounds in a plain loop on the same thread pool, with no nodes, bus, encoding or merging. Then
the simulator runs the scenario. Printed: both wall times and their ratio (1.0 = free).

    python sim/bench/overhead.py [--nodes 16] [--rounds 5] [--model cnn1d] [--schedule ring]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from p2pfl.learning.datasets import load_dataset
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import build_learner
from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.scenario import load_scenario


def baseline(nodes: int, rounds: int, model: str, workers: int) -> float:
    data = load_dataset("mnist1d", seed=0)
    parts = partition(data.y_train, nodes, "dirichlet:0.5", seed=0)
    learners = [
        build_learner(model, data, parts[i], init_seed=0, seed=i, local_epochs=3)
        for i in range(nodes)
    ]

    def step(i: int) -> None:
        learners[i].fit()
        learners[i].evaluate()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(rounds):
            list(pool.map(step, range(nodes)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cnn1d")
    parser.add_argument("--schedule", default="ring")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workers = os.cpu_count() or 1
    base = baseline(args.nodes, args.rounds, args.model, workers)
    scenario = load_scenario(
        None,
        {"nodes": args.nodes, "rounds": args.rounds, "schedule": args.schedule,
         "model": args.model},
    )  # fmt: skip
    started = time.perf_counter()
    asyncio.run(Simulation(scenario, workers=workers).run())
    sim = time.perf_counter() - started
    print(f"nodes={args.nodes} rounds={args.rounds} model={args.model} schedule={args.schedule}")
    print(f"baseline (train+eval only): {base:.2f} s")
    print(f"simulator:                  {sim:.2f} s  (includes dataset load and start-up)")
    print(f"ratio simulator/baseline:   {sim / base:.2f}")


if __name__ == "__main__":
    main()
