"""How a node hands models to its merge rule: walker tokens and the ages `weighted` caps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pfl.inbox import ReceivedModel
from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.merge import ClippedGossip
from p2pfl.node import Node
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from tests.test_node import make_node

Weights = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_dataset("mnist1d", seed=0)


def walker(dataset: Dataset, merge: str) -> Node:
    overrides: dict[str, Any] = {"mode": "async", "walkers": 1, "merge": merge}
    return make_node(dataset, MemoryTransport(MemoryBus(), "w0"), "w0", 0, **overrides)


def token(weights: Weights, round: int, src: str = "w1") -> ReceivedModel:
    return ReceivedModel(src=src, round=round, age=100.0, weights=weights)


def shifted(weights: Weights, by: float) -> Weights:
    return {k: v + np.asarray(by, v.dtype) for k, v in weights.items()}


def distance(a: Weights, b: Weights) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]).astype(np.float64) ** 2) for k in a)))


async def adopt(node: Node, model: ReceivedModel) -> Weights:
    node.tokens.take = lambda: [model]  # type: ignore[method-assign]
    assert await node._adopt_tokens() == 1
    return node.learner.get_weights()


async def test_with_clipped_a_far_token_moves_the_node_by_at_most_tau(dataset: Dataset) -> None:
    node = walker(dataset, "clipped")
    own = node.learner.get_weights()
    near = shifted(own, 0.01)
    # The first token is within the radius it sets: it replaces the model, as it always did.
    assert distance(await adopt(node, token(near, 1)), near) < 1e-5
    rule = node._merge
    assert isinstance(rule, ClippedGossip) and rule.tau is not None
    tau = rule.tau
    assert rule.standing("w1") < 1.0  # trust is earned: one near token is not full standing
    # A Byzantine token far beyond the radius, of about the node's norm and aligned with it
    # (cosine ~0.55), moves the node by tau (w1 has not lost standing), not onto the token.
    rng = np.random.default_rng(0)
    noise = {k: rng.normal(size=v.shape) for k, v in near.items()}
    zero = {k: np.zeros_like(v) for k, v in near.items()}
    spread = 1.5 * distance(near, zero) / distance(noise, zero)
    far = {k: (v + spread * noise[k]).astype(v.dtype) for k, v in near.items()}
    assert distance(far, near) > 5 * tau
    after = await adopt(node, token(far, 2))
    assert distance(after, near) == pytest.approx(tau, rel=1e-3)
    assert rule.standing("w1") == 0.375 and rule.reach("w1") == 0.75  # far: halved
    # One out of shape (every weight shifted by 10: its norm is far off) is left out.
    assert distance(await adopt(node, token(shifted(near, 10.0), 3)), after) < 1e-5
    assert node.round == 3


async def test_with_average_a_token_still_replaces_the_model(dataset: Dataset) -> None:
    node = walker(dataset, "average")
    far = shifted(node.learner.get_weights(), 10.0)
    assert distance(await adopt(node, token(far, 1)), far) < 1e-5


async def test_a_node_names_each_token_sender_to_clipped_gossip(dataset: Dataset) -> None:
    # Standing is per sender: a far token costs the one who sent it, not everyone.
    node = walker(dataset, "clipped")
    own = node.learner.get_weights()
    rule = node._merge
    assert isinstance(rule, ClippedGossip)
    await adopt(node, token(shifted(own, 0.01), 1, src="w1"))
    await adopt(node, token(shifted(own, 10.0), 2, src="w2"))
    assert rule.standing("w1") == 0.75  # near: raised from the start of 1/2
    assert rule.standing("w2") == 0.25  # far: halved
