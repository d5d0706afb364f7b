"""Walkers in process: K model tokens circulate over the memory bus, and a lost one comes back."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import FitResult, Learner
from p2pfl.node import Node
from p2pfl.simulation.faults import DelegatingLearner
from p2pfl.topology import initial_token_holders
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.test_node import (
    BUS,
    Reports,
    WaitUntil,
    make_learner,
    make_node,
    running,
)

pytestmark = pytest.mark.timeout(60)

IDS = ["w0", "w1", "w2"]
WALKERS: dict[str, Any] = {"mode": "async", "walkers": 1, "period": 0.0}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_dataset("mnist1d", seed=0)


def ring(dataset: Dataset, bus: MemoryBus, reports: Reports, **overrides: Any) -> list[Node]:
    return [
        make_node(
            dataset,
            MemoryTransport(bus, node_id),
            node_id,
            i,
            on_round=reports.hook(node_id),
            peers={p: BUS for p in IDS if p != node_id},
            **(WALKERS | overrides),
        )
        for i, node_id in enumerate(IDS)
    ]


async def test_one_token_visits_every_node_in_turn(dataset: Dataset) -> None:
    bus = MemoryBus()
    reports = Reports()
    nodes = ring(dataset, bus, reports, rounds=2)
    async with asyncio.timeout(40):
        await asyncio.gather(*(node.run() for node in nodes))
    # One token: each local step is one hop of the same model, so no two steps share a round.
    hops = sorted(r for node_id in IDS for r in reports.rounds(node_id))
    assert hops == list(range(1, 7))
    # The ring order: the holder's successor trains next.
    by_round = {r: node_id for node_id in IDS for r in reports.rounds(node_id)}
    first = by_round[1]
    assert first in initial_token_holders(IDS, 1)
    order = [by_round[r] for r in range(1, 7)]
    start = IDS.index(first)
    assert order == [IDS[(start + i) % 3] for i in range(6)]


class StuckLearner(DelegatingLearner):
    """Its first fit blocks until released: the node holds its token and never passes it on."""

    def __init__(self, inner: Learner) -> None:
        super().__init__(inner)
        self.fitting = threading.Event()
        self.release = threading.Event()

    def fit(self) -> FitResult:
        self.fitting.set()
        self.release.wait(30)
        return self.inner.fit()


async def test_a_token_lost_with_its_holder_is_regenerated(
    dataset: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    reports = Reports()
    (holder_id,) = initial_token_holders(IDS, 1)
    stuck = StuckLearner(make_learner(dataset, IDS.index(holder_id)))
    common: dict[str, Any] = WALKERS | {"token_timeout": 1.0, "discovery": ("static", "presence")}
    nodes = {
        node_id: make_node(
            dataset,
            MemoryTransport(bus, node_id),
            node_id,
            i,
            on_round=reports.hook(node_id),
            learner=stuck if node_id == holder_id else None,
            peers={p: BUS for p in IDS if p != node_id},
            **common,
        )
        for i, node_id in enumerate(IDS)
    }
    holder = nodes.pop(holder_id)
    others = list(nodes.values())
    try:
        async with asyncio.timeout(40), running(others[0]), running(others[1]):
            async with running(holder) as held:
                await asyncio.to_thread(stuck.fitting.wait, 20)
                # Everyone agreed who holds the token (a node still waiting for its start-up
                # peers when one crashes would wait out the round timeout instead).
                await wait_until(lambda: all(n.tokens.dealt for n in others), within=20)
                # It crashes holding the only token: its will tells the others it is gone.
                await holder.transport.abort()
                held.cancel()
            await wait_until(lambda: sum(n.counters.rounds for n in others) >= 4, within=30)
    finally:
        stuck.release.set()
    # A designated survivor made a new token after token_timeout, and it circulates again.
    assert holder.counters.rounds == 0
    assert all(reports.rounds(n.node_id) for n in others)
