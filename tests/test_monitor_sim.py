"""The monitor in a simulation: given the simulator's bus as its transport, it watches simulated
nodes (the real `Node` on `MemoryTransport`, as `p2pfl sim` runs them) without any broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.torch_learner import build_learner
from p2pfl.monitor.monitor import Monitor
from p2pfl.node import Node
from p2pfl.topology import make_schedule
from p2pfl.transport.base import Transport
from p2pfl.transport.memory import MemoryBus, MemoryTransport

pytestmark = pytest.mark.timeout(60)

WaitUntil = Callable[..., Awaitable[None]]
NET = "simwatch"
# The bus ignores broker URIs: every client of the test shares it, under one home URI.
HOME = "mqtt://127.0.0.1:1"
IDS = ("n0", "n1", "n2")


def simulated_node(bus: MemoryBus, blobs: Dataset, index: int) -> Node:
    node_id = IDS[index]
    config = NodeConfig.model_validate(
        {
            "network": NET,
            "id": node_id,
            "model": "logreg",
            "local_epochs": 1,
            "mode": "sync",
            "discovery": ("presence",),
            "min_peers": len(IDS) - 1,
            "round_timeout": 5.0,
            "telemetry_interval": 0.2,
        }
    )
    train = np.arange(index * 40, (index + 1) * 40)
    learner = build_learner("logreg", blobs, train, init_seed=0, seed=index, local_epochs=1)
    return Node(
        config,
        learner,
        MemoryTransport(bus, f"{node_id}#0"),
        node_id=node_id,
        home_broker=HOME,
        schedule=make_schedule("ring"),
        limit_new_peers=False,
    )


@contextlib.asynccontextmanager
async def running(nodes: list[Node], monitor: Monitor) -> AsyncIterator[None]:
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(node.run(), name=f"node:{node.node_id}") for node in nodes]
        watching = tg.create_task(monitor.run_until(stop), name="monitor")
        try:
            yield
        finally:
            stop.set()
            for node in nodes:
                node.stop()
            async with asyncio.timeout(20):
                await asyncio.wait([*tasks, watching])


async def test_a_monitor_on_the_memory_bus_sees_the_simulated_nodes_telemetry(
    blobs: Dataset, wait_until: WaitUntil
) -> None:
    bus = MemoryBus()
    opened: list[str] = []

    def on_the_bus(uri: str, client_id: str) -> Transport:
        opened.append(uri)
        return MemoryTransport(bus, client_id)

    monitor = Monitor(NET, brokers=[HOME], use_mdns=False, transport=on_the_bus)
    nodes = [simulated_node(bus, blobs, i) for i in range(len(IDS))]
    async with running(nodes, monitor):

        def reported_a_round() -> bool:
            seen = monitor.snapshot()["nodes"]
            return monitor.settled() and len(seen) == len(IDS) and min(n["round"] for n in seen) > 0

        await wait_until(reported_a_round, within=40)
        snap = monitor.snapshot()
        assert monitor.expected == set(IDS)
        assert [n["id"] for n in snap["nodes"]] == list(IDS)
        assert all(n["accuracy"] is not None for n in snap["nodes"])
        assert snap["global"]["accuracy"] is not None
        assert monitor.brokers == [HOME]
        assert any(client.startswith(monitor.monitor_id) for client in bus.clients)
    assert opened == [HOME]  # one client, on the bus: no MQTT connection was attempted
