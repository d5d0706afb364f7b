"""The baseline the `overhead` and `daemon` benches divide by: the same nodes' training alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from p2pfl.bench.core import stopwatch
from p2pfl.config import NodeConfig
from p2pfl.learning.datasets import load_dataset
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import learner_from_config
from p2pfl.simulation.engine import training_threads


async def bare_loop(configs: Sequence[NodeConfig], rounds: int, workers: int) -> float:
    """Wall seconds of the learners `configs` describe (each on its partition) fitting and
    evaluating `rounds` times, side by side on `workers` threads with torch on one thread per
    op (the simulator's pool): no nodes, bus, encoding, signing or merging. Loading the data
    and building the learners are not timed."""
    first = configs[0]
    data = await asyncio.to_thread(load_dataset, first.dataset, seed=first.seed)
    parts = partition(data.y_train, first.num_partitions, first.partition, seed=first.seed)
    learners = [learner_from_config(c, data, parts[c.partition_index]) for c in configs]

    def step(i: int) -> None:
        learners[i].fit()
        learners[i].evaluate()

    with training_threads(workers), stopwatch() as elapsed:
        for _ in range(rounds):
            await asyncio.gather(*(asyncio.to_thread(step, i) for i in range(len(learners))))
        return elapsed()
