"""Partitioners: coverage, non-emptiness and determinism (hypothesis), skew, spec errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.learning.partition import PartitionSpec, parse_partition, partition

labels_st = st.lists(st.integers(0, 9), min_size=1, max_size=300).map(
    lambda xs: np.array(xs, dtype=np.int64)
)
spec_st = st.one_of(
    st.just("iid"),
    st.floats(0.01, 1000.0).map(lambda a: f"dirichlet:{a}"),
    st.integers(1, 4).map(lambda k: f"shards:{k}"),
)


@settings(max_examples=150, deadline=None)
@given(labels=labels_st, data=st.data(), spec=spec_st, seed=st.integers(0, 2**32 - 1))
def test_partitions_cover_every_index_once_and_none_is_empty(
    labels: np.ndarray, data: st.DataObject, spec: str, seed: int
) -> None:
    n = len(labels)
    parts_count = data.draw(st.integers(1, min(n, 20)))
    if spec.startswith("shards:") and parts_count * int(spec.split(":")[1]) > n:
        with pytest.raises(ValueError, match="needs at least"):
            partition(labels, parts_count, spec, seed=seed)
        return
    parts = partition(labels, parts_count, spec, seed=seed)
    assert len(parts) == parts_count
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    again = partition(labels, parts_count, spec, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _mean_classes(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([len(np.unique(labels[p])) for p in parts]))


def test_dirichlet_small_alpha_skews_labels_more_than_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    iid = partition(labels, 10, "iid", seed=0)
    skewed = partition(labels, 10, "dirichlet:0.1", seed=0)
    assert _mean_classes(iid, labels) == 10
    assert _mean_classes(skewed, labels) < 5


def test_shards_give_each_partition_at_most_k_classes_when_shards_fit_in_a_class() -> None:
    labels = np.repeat(np.arange(10), 100)  # 20 shards of 50: each inside one class
    parts = partition(labels, 10, "shards:2", seed=3)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_seed_changes_the_split() -> None:
    labels = np.repeat(np.arange(10), 20)
    a = partition(labels, 4, "iid", seed=0)
    b = partition(labels, 4, "iid", seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_empty_draw_is_repaired() -> None:
    # One class, tiny alpha: nearly all mass goes to one partition, the others need repair.
    labels = np.zeros(10, dtype=np.int64)
    parts = partition(labels, 5, "dirichlet:0.001", seed=0)
    assert all(len(p) >= 1 for p in parts)
    assert sum(len(p) for p in parts) == 10


@pytest.mark.parametrize(
    "spec",
    [
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "dirichlet:nan",
        "dirichlet:inf",
        "dirichlet",
        "shards:0",
        "shards:x",
        "shards:1.5",
        "shards",
        "iid:2",
        "random",
        "",
    ],
)
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="partition"):
        parse_partition(spec)
    with pytest.raises(ValueError):
        partition(np.zeros(10, dtype=np.int64), 2, spec, seed=0)


def test_parse_partition_values() -> None:
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", 0.5)
    assert parse_partition("shards:2") == PartitionSpec("shards", 2)


@pytest.mark.parametrize("count", [0, -1, 11])
def test_partition_count_must_fit_the_samples(count: int) -> None:
    with pytest.raises(ValueError, match="non-empty partitions"):
        partition(np.zeros(10, dtype=np.int64), count, "iid", seed=0)
