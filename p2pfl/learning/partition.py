"""Split a training set across peers: `iid`, `dirichlet:ALPHA`, `shards:K`.

Every partitioner is a pure function of (labels, number of partitions, spec, seed): the same
seed gives the same split on every machine, so peers can each compute their own part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["PartitionSpec", "parse_partition", "partition"]

PARTITIONS = ("iid", "dirichlet:ALPHA", "shards:K")


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec; `param` is ALPHA for dirichlet, K for shards."""

    kind: Literal["iid", "dirichlet", "shards"]
    param: float = 0.0


def parse_partition(spec: str) -> PartitionSpec:
    """Parse and validate a partition spec; ValueError names the problem."""
    kind, sep, arg = spec.partition(":")
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition {spec!r}: ALPHA must be a number, got {arg!r}") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"partition {spec!r}: ALPHA must be a finite number > 0")
        return PartitionSpec("dirichlet", alpha)
    if kind == "shards" and sep:
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"partition {spec!r}: K must be an integer, got {arg!r}") from None
        if k < 1:
            raise ValueError(f"partition {spec!r}: K must be >= 1")
        return PartitionSpec("shards", k)
    raise ValueError(f"unknown partition {spec!r}: choose one of {', '.join(PARTITIONS)}")


def partition(labels: np.ndarray, num_partitions: int, spec: str, *, seed: int) -> list[np.ndarray]:
    """Split the indices of `labels` into `num_partitions` disjoint, non-empty, sorted arrays.

    Together they cover every index exactly once. If a random draw leaves a partition empty,
    samples are moved to it from the largest one.
    """
    parsed = parse_partition(spec)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    if not 1 <= num_partitions <= n:
        raise ValueError(f"cannot split {n} samples into {num_partitions} non-empty partitions")
    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif parsed.kind == "dirichlet":
        parts = _dirichlet(labels, num_partitions, parsed.param, rng)
    else:
        parts = _shards(labels, num_partitions, int(parsed.param), rng)
    _fill_empty(parts, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, split its samples by proportions drawn from Dir(alpha).

    Hsu, Qi and Brown 2019, "Measuring the effects of non-identical data distribution for
    federated visual classification". Small alpha: each peer sees few classes; large: IID.
    """
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for part, piece in zip(chunks, np.split(idx, cuts), strict=True):
            part.append(piece)
    return [np.concatenate(c) for c in chunks]


def _shards(
    labels: np.ndarray, num_partitions: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sort by label, cut into num_partitions*k shards, deal k shards to each partition.

    McMahan et al. 2017, "Communication-efficient learning of deep networks from
    decentralized data" (2 shards per client gives each client about 2 classes).
    """
    n_shards = num_partitions * k
    if n_shards > len(labels):
        raise ValueError(
            f"shards:{k} needs at least {n_shards} samples for {num_partitions} partitions, "
            f"got {len(labels)}"
        )
    # Shuffle before the stable sort so that which samples of a class share a shard is random.
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, n_shards)
    dealt = rng.permutation(n_shards).reshape(num_partitions, k)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _fill_empty(parts: list[np.ndarray], rng: np.random.Generator) -> None:
    """Move one random sample from the largest partition into each empty one, in place."""
    for i, part in enumerate(parts):
        if len(part):
            continue
        # Pigeonhole: with n >= num_partitions and one partition empty, the largest holds >= 2.
        donor = max(range(len(parts)), key=lambda j: len(parts[j]))
        pick = int(rng.integers(len(parts[donor])))
        parts[i] = parts[donor][pick : pick + 1]
        parts[donor] = np.delete(parts[donor], pick)
