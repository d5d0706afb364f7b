"""The fault plan: crashes and restarts, churn, stragglers, Byzantine peers, and pauses
(eligibility, as `--when` makes a daemon pause: scripted per node, or a fraction of the nodes
eligible each round, as in Gboard's federated learning).

Faults are placed by rounds, not seconds, so a sync run with a fixed seed stays deterministic.
Which nodes are stragglers or Byzantine, and when churn strikes, are pure functions of the seed.
The learner wrappers implement the `Learner` protocol by delegation, so the real `Node` runs
them unchanged; what a Byzantine node sends is `p2pfl.simulation.attacks`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from p2pfl.learning.learner import EvalResult, FitResult, Learner

__all__ = [
    "BEHAVIOURS",
    "Behaviour",
    "Byzantine",
    "Crash",
    "DelegatingLearner",
    "FaultPlan",
    "Pause",
    "StragglerLearner",
    "Stragglers",
    "choose_nodes",
    "churn_events",
    "resolve_node",
]

Behaviour = Literal["scaled", "sign-flip", "random", "alie", "ipm", "label-flip", "free-rider"]
"""What a Byzantine node does; `p2pfl.simulation.attacks` implements each."""
BEHAVIOURS: tuple[Behaviour, ...] = get_args(Behaviour)


class Crash(BaseModel):
    """Crash `node` (an id, or an index into the sorted ids) once it has finished round
    `at_round`, before it starts the next: its checkpoint of that round is where it restarts.

    With `restart_after_rounds`, it restarts from its checkpoint once the network has moved
    that many rounds past `at_round`; with None it stays down.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str | int
    at_round: int = Field(ge=0)
    restart_after_rounds: int | None = Field(default=None, ge=1)


class Stragglers(BaseModel):
    """Some nodes train `slowdown` times slower than they could."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(default=0.0, ge=0, le=1)
    # An exact number of stragglers; overrides `fraction`.
    count: int | None = Field(default=None, ge=0)
    slowdown: float = Field(default=1.0, ge=1)


class Byzantine(BaseModel):
    """Some nodes send Byzantine models (see `p2pfl.simulation.attacks`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(default=0.0, ge=0, le=1)
    # An exact number of Byzantine nodes; overrides `fraction`.
    count: int | None = Field(default=None, ge=0)
    behaviour: Behaviour = "scaled"
    scale: float = Field(default=10.0, gt=0)  # scaled: scale * w
    # alie: how many honest standard deviations to shift; None: Baruch et al.'s z_max for the
    # scenario's numbers of nodes and attackers.
    z: float | None = Field(default=None, ge=0)
    epsilon: float = Field(default=0.1, gt=0)  # ipm: send -epsilon * the honest mean


class Pause(BaseModel):
    """`node` (an id, or an index into the sorted ids) does not train the network's rounds
    `from_round` to `to_round - 1`: it pauses at its round boundary once the network is about
    to start `from_round`, and resumes (catching up) once it is about to start `to_round`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str | int
    from_round: int = Field(ge=1)
    to_round: int = Field(ge=2)


class FaultPlan(BaseModel):
    """Everything that goes wrong during a run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    crashes: tuple[Crash, ...] = ()
    # Probability per live node per round of crashing; it restarts `churn_downtime` rounds later.
    churn: float = Field(default=0.0, ge=0, le=1)
    churn_downtime: int = Field(default=5, ge=1)
    stragglers: Stragglers = Field(default_factory=Stragglers)
    byzantine: Byzantine = Field(default_factory=Byzantine)
    pauses: tuple[Pause, ...] = ()
    # Each round a seeded draw of this fraction of the nodes is eligible; the others pause.
    eligible_fraction: float = Field(default=1.0, gt=0, le=1)

    def paused(
        self, node_id: str, next_round: int, node_ids: Sequence[str], seed: int
    ) -> str | None:
        """Why `node_id` does not train the network's round `next_round` (None: it does)."""
        for p in self.pauses:
            if (
                resolve_node(p.node, node_ids) == node_id
                and p.from_round <= next_round < p.to_round
            ):
                return "scripted"
        if self.eligible_fraction < 1:
            drawn = choose_nodes(node_ids, fraction=self.eligible_fraction, seed=seed,
                                 salt=f"eligible:{next_round}")  # fmt: skip
            if node_id not in drawn:
                return "not-drawn"
        return None

    def crash_events(self, node_ids: Sequence[str], rounds: int, seed: int) -> list[Crash]:
        """The explicit crashes plus churn, with node ids resolved, ordered by round then id."""
        explicit = [
            Crash(
                node=resolve_node(c.node, node_ids),
                at_round=c.at_round,
                restart_after_rounds=c.restart_after_rounds,
            )
            for c in self.crashes
        ]
        churn = churn_events(node_ids, rounds, self.churn, self.churn_downtime, seed)
        return sorted([*explicit, *churn], key=lambda c: (c.at_round, str(c.node)))

    def straggler_ids(self, node_ids: Sequence[str], seed: int) -> list[str]:
        """The nodes that train slowly."""
        s = self.stragglers
        if s.slowdown == 1.0:
            return []
        return choose_nodes(
            node_ids, fraction=s.fraction, count=s.count, seed=seed, salt="stragglers"
        )

    def byzantine_ids(self, node_ids: Sequence[str], seed: int) -> list[str]:
        """The nodes that send poisoned models."""
        b = self.byzantine
        return choose_nodes(
            node_ids, fraction=b.fraction, count=b.count, seed=seed, salt="byzantine"
        )


def resolve_node(node: str | int, node_ids: Sequence[str]) -> str:
    """The id named by `node`: an id, or an index into the sorted ids; ValueError if neither."""
    ids = sorted(node_ids)
    if isinstance(node, int):
        if not 0 <= node < len(ids):
            raise ValueError(f"node index {node} is out of range 0..{len(ids) - 1}")
        return ids[node]
    if node not in ids:
        raise ValueError(f"unknown node id {node!r}")
    return node


def _unit(seed: int, *parts: object) -> float:
    """A uniform in [0, 1) that depends only on the arguments (not on Python's hash())."""
    key = "\x00".join(str(p) for p in (seed, *parts)).encode()
    (a,) = struct.unpack("<Q", hashlib.blake2b(key, digest_size=8).digest())
    return (a >> 11) / 2.0**53


def choose_nodes(
    node_ids: Sequence[str],
    spec: Stragglers | Byzantine | None = None,
    *,
    fraction: float = 0.0,
    count: int | None = None,
    seed: int,
    salt: str,
) -> list[str]:
    """A deterministic subset of `count` nodes (or round(fraction * n)), in sorted id order.

    `spec`, when given, supplies `fraction` and `count`.

    Each node gets a pseudo-random key from (seed, salt, id) and the lowest keys are chosen, so
    the choice does not depend on the order of `node_ids`, and a larger count adds nodes
    without replacing any. Different salts give independent choices.
    """
    if spec is not None:
        fraction, count = spec.fraction, spec.count
    ids = sorted(set(node_ids))
    k = count if count is not None else math.floor(fraction * len(ids) + 0.5)
    if not 0 <= k <= len(ids):
        raise ValueError(f"cannot choose {k} of {len(ids)} nodes")
    ranked = sorted(ids, key=lambda node: (_unit(seed, salt, node), node))
    return sorted(ranked[:k])


def churn_events(
    node_ids: Sequence[str], rounds: int, rate: float, downtime: int, seed: int
) -> list[Crash]:
    """Crashes drawn for churn: each live node crashes in round r (1..rounds-1) with `rate`.

    A crashed node restarts `downtime` rounds later and may crash again after that. Ordered by
    round, then id.
    """
    if not 0 <= rate <= 1 or downtime < 1:
        raise ValueError(f"need 0 <= rate <= 1 and downtime >= 1, got {rate}, {downtime}")
    events: list[Crash] = []
    if rate == 0:
        return events
    for node in sorted(set(node_ids)):
        r = 1
        while r < rounds:
            if _unit(seed, "churn", node, r) < rate:
                events.append(Crash(node=node, at_round=r, restart_after_rounds=downtime))
                r += downtime
            r += 1
    return sorted(events, key=lambda c: (c.at_round, str(c.node)))


class DelegatingLearner:
    """A learner that hands everything to `inner`; the fault wrappers change what they need."""

    def __init__(self, inner: Learner) -> None:
        self.inner = inner

    @property
    def num_samples(self) -> int:
        """Number of local training samples."""
        return self.inner.num_samples

    def get_weights(self) -> dict[str, np.ndarray]:
        """The inner learner's weights."""
        return self.inner.get_weights()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set the inner learner's weights."""
        self.inner.set_weights(weights)

    def fit(self) -> FitResult:
        """Train the inner learner."""
        return self.inner.fit()

    def evaluate(self) -> EvalResult:
        """Evaluate the inner learner."""
        return self.inner.evaluate()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the protocol (e.g. TorchLearner.reset_optimizer) is the inner one's.
        # Only called for missing attributes; before __init__ sets `inner`, there is nothing.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class StragglerLearner(DelegatingLearner):
    """Wraps a learner so that fit takes `slowdown` times as long (it sleeps the difference).

    Sleeping rather than burning CPU keeps other simulated nodes running at full speed; fit runs
    in a worker thread, so the sleep blocks no event loop.
    """

    def __init__(self, inner: Learner, slowdown: float) -> None:
        if slowdown < 1:
            raise ValueError(f"slowdown must be >= 1, got {slowdown}")
        super().__init__(inner)
        self.slowdown = slowdown

    def fit(self) -> FitResult:
        """Train, then wait (slowdown - 1) times the training time."""
        started = time.perf_counter()
        result = self.inner.fit()
        took = time.perf_counter() - started
        time.sleep((self.slowdown - 1.0) * took)
        return replace(result, seconds=time.perf_counter() - started)
