"""Peer sampling (p2pfl.discovery.sampling): bounded views that find each node's ring
neighbours by shuffles alone."""

from __future__ import annotations

import random

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.discovery import sampling as S

ids_strategy = st.sets(
    st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=40
)


def test_around_walks_the_ring_both_ways_with_wrap_around() -> None:
    ids = ["a", "b", "c", "d", "e"]
    assert S.around("a", ids, S.by_id, 2) == (["b", "c"], ["e", "d"])
    assert S.around("e", ids, S.by_id, 1) == (["a"], ["d"])
    # fewer others than asked for: each appears once per side
    assert S.around("a", ["a", "b"], S.by_id, 3) == (["b"], ["b"])
    assert S.around("a", [], S.by_id, 2) == ([], [])


def test_ring_keys_per_schedule() -> None:
    assert S.ring_keys("ring") == (S.by_id,)
    assert S.ring_keys("random-walk") == ()
    assert len(S.ring_keys("partial-mesh", degree=4)) == 2
    assert len(S.ring_keys("partial-mesh", degree=5)) == 3
    one, two = S.ring_keys("partial-mesh", degree=4, seed=7)
    ids = [f"n{i:03d}" for i in range(50)]
    # distinct random orders, neither of them the order by id, the same on every call
    assert sorted(ids, key=one) != sorted(ids, key=two) != ids
    assert sorted(ids, key=one) == sorted(ids, key=S.ring_keys("partial-mesh", seed=7)[0])


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, degree=st.integers(1, 6), seed=st.integers(0, 3))
def test_mesh_from_full_knowledge_is_symmetric_connected_and_bounded(
    ids: set[str], degree: int, seed: int
) -> None:
    neighbours = {p: S.mesh_neighbours(p, ids, degree, seed) for p in ids}
    graph = nx.Graph()
    graph.add_nodes_from(ids)
    for p, ns in neighbours.items():
        assert p not in ns
        assert len(ns) <= 2 * ((degree + 1) // 2)
        for q in ns:
            assert p in neighbours[q], f"{p} -> {q} but not back"
            graph.add_edge(p, q)
    assert nx.is_connected(graph)  # each ring alone is a cycle through every id
    assert S.mesh_adjacency(ids, degree, seed) == neighbours  # all at once, the same


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, size=st.integers(4, 20), count=st.integers(1, 2), seed=st.integers())
def test_select_keeps_the_near_part_and_the_bound(
    ids: set[str], size: int, count: int, seed: int
) -> None:
    own = sorted(ids)[0]
    rings = S.ring_keys("ring")
    keep = sorted(ids)[-3:]
    view = S.select(
        own, ids, size=size, rings=rings, count=count, keep=keep, rng=random.Random(seed)
    )
    assert view == sorted(set(view))
    assert own not in view
    assert len(view) == min(size, len(ids) - 1)
    assert set(S.near(own, ids, rings, count)) <= set(view)
    if len(ids) - 1 <= size:
        assert set(view) == ids - {own}


def test_select_refuses_a_view_too_small_for_its_rings() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        S.select(
            "a", "bcdef", size=3, rings=S.ring_keys("partial-mesh"), count=1, rng=random.Random()
        )


@settings(max_examples=40, deadline=None)
@given(ids=ids_strategy, length=st.integers(1, 10), seed=st.integers())
def test_entries_for_a_peer_come_from_the_view_never_name_it_and_fit(
    ids: set[str], length: int, seed: int
) -> None:
    view = sorted(ids)
    peer = view[len(view) // 2]
    sent = S.entries_for(
        view, peer, rings=S.ring_keys("ring"), count=1, length=length, rng=random.Random(seed)
    )
    assert peer not in sent
    assert set(sent) <= ids
    assert len(sent) == min(length, len(ids) - 1)
    assert len(set(sent)) == len(sent)


def _shuffled_network(
    n: int, schedule: str, rounds: int, *, size: int = 32
) -> tuple[dict[str, list[str]], int | None]:
    """Every node of an `n`-node network, started knowing only the few that started just
    before it, shuffles once per round; the views after `rounds`, and the first round at which
    every node's near part was its true ring neighbours (None: never)."""
    rng = random.Random(0)
    count, length = 4, 16
    ids = [f"n{i:04d}" for i in range(n)]
    rings = S.ring_keys(schedule, degree=4)
    order = rng.sample(ids, n)
    views = {p: order[max(0, i - 4) : i] or order[1:2] for i, p in enumerate(order)}
    truth = {p: S.near(p, ids, rings, 1) for p in ids}
    converged = None
    for tick in range(1, rounds + 1):
        for p in rng.sample(ids, n):
            q = S.partner(p, views[p], rings=rings, count=count, tick=tick, rng=rng)
            assert q is not None
            sent = [
                *S.entries_for(views[p], q, rings=rings, count=count, length=length - 1, rng=rng),
                p,
            ]
            back = S.entries_for(views[q], p, rings=rings, count=count, length=length, rng=rng)
            views[q] = S.merged(
                q, views[q], sent=back, received=sent, size=size, rings=rings, count=count, rng=rng
            )
            views[p] = S.merged(
                p, views[p], sent=sent, received=back, size=size, rings=rings, count=count, rng=rng
            )
        assert all(len(v) <= size for v in views.values())
        if converged is None and all(S.near(p, views[p], rings, 1) == truth[p] for p in ids):
            converged = tick
    return views, converged


@pytest.mark.parametrize("schedule", ["ring", "partial-mesh"])
def test_shuffles_find_every_nodes_true_ring_neighbours(schedule: str) -> None:
    views, converged = _shuffled_network(256, schedule, 40)
    # measured: 14 rounds (ring) for 256 nodes, 23 for 1,024: about log N
    assert converged is not None, "some node never found its ring neighbours in 40 rounds"
    ids = sorted(views)
    if schedule == "partial-mesh":
        # the overlay each node derives from its own view is the one of full knowledge
        for p in ids:
            assert S.mesh_neighbours(p, views[p], 4) == S.mesh_neighbours(p, ids, 4)


def test_random_parts_keep_every_node_known_and_mix() -> None:
    views, _ = _shuffled_network(256, "random-walk", 20)
    indegree = {p: 0 for p in views}
    for view in views.values():
        for q in view:
            indegree[q] += 1
    # nobody is forgotten, and nobody is in everyone's view (views are samples, not a star)
    assert min(indegree.values()) >= 1
    assert max(indegree.values()) < len(views) // 2


def test_sampled_schedules_need_only_a_nodes_own_near_view() -> None:
    from p2pfl.config import NodeConfig
    from p2pfl.topology import node_schedule

    ids = [f"n{i:03d}" for i in range(100)]
    mesh = node_schedule(NodeConfig(schedule="partial-mesh", view_size=16, seed=3))
    ring = node_schedule(NodeConfig(schedule="ring", view_size=16))
    for own in ids[:10]:
        # what a node plans from its near view alone is what full knowledge gives
        rings = S.ring_keys("partial-mesh", degree=4, seed=3)
        partial = S.near(own, ids, rings, 1)
        plan = mesh.plan(own, partial, round=5)
        assert plan.send_to == plan.expect_from == S.mesh_neighbours(own, ids, 4, seed=3)
        succ, pred = S.around(own, ids, S.by_id, 1)
        # the ring keeps hop 1 whatever the round: a far hop would need every id
        assert ring.plan(own, [*succ, *pred], round=3).send_to == tuple(succ)
        assert ring.plan(own, [*succ, *pred], round=3).expect_from == tuple(pred)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"view_size": 8}, "at least 10 peers"),
        ({"view_size": 16, "schedule": "partial-mesh", "degree": 8}, "at least 28 peers"),
        ({"view_size": 32, "walkers": 1, "mode": "async"}, "walkers"),
        ({"view_size": 32, "schedule": "random-walk", "mode": "sync"}, "sync random walk"),
        ({"view_size": 32, "discovery": ("mdns",)}, "presence"),
    ],
)
def test_view_size_refuses_what_a_partial_view_cannot_do(settings: dict, says: str) -> None:
    from pydantic import ValidationError

    from p2pfl.config import NodeConfig

    with pytest.raises(ValidationError, match=says):
        NodeConfig(**settings)
