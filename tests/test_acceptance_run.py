"""Acceptance runs of the daemon issue (slow: `pytest -m slow`): four real `p2pfl run`
processes on one machine learn MNIST-1D together to a useful accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.transport.mosquitto import MosquittoBroker
from tests.test_e2e_run import finish, logs, start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

RECIPE = ["--model", "cnn1d", "--dataset", "mnist1d", "--partition", "dirichlet:0.5", "--seed", "0"]


def mean_final_accuracy(nodes: list) -> float:  # type: ignore[type-arg]
    accs = []
    for node in nodes:
        done = node.done()
        assert done is not None and done["accuracy"] is not None, node.tail()
        accs.append(done["accuracy"])
    print("final accuracies:", accs)
    return sum(accs) / len(accs)


def test_ring_sync_30_rounds_embedded(tmp_path: Path) -> None:
    nodes = start_cluster(
        tmp_path, 4, [*RECIPE, "--schedule", "ring", "--mode", "sync", "--rounds", "30"]
    )
    finish(nodes, 1000)
    assert all(n.done()["round"] == 30 for n in nodes), logs(nodes)  # type: ignore[index]
    assert mean_final_accuracy(nodes) >= 0.75


def test_ring_sync_30_rounds_on_mosquitto(tmp_path: Path) -> None:
    with MosquittoBroker(port=0) as broker:
        nodes = start_cluster(
            tmp_path,
            4,
            [*RECIPE, "--schedule", "ring", "--mode", "sync", "--rounds", "30", "--min-peers", "3"],
            broker=broker.uri,
        )
        finish(nodes, 1000)
    assert mean_final_accuracy(nodes) >= 0.75


@pytest.mark.parametrize(
    "schedule", [["--schedule", "partial-mesh", "--degree", "2"], ["--schedule", "random-walk"]]
)
def test_async_for_a_time_budget(tmp_path: Path, schedule: list[str]) -> None:
    nodes = start_cluster(
        tmp_path, 4, [*RECIPE, *schedule, "--mode", "async", "--duration", "60", "--min-peers", "3"]
    )
    finish(nodes, 300)
    assert mean_final_accuracy(nodes) >= 0.75
