"""Schedules and graph files: every node must agree on the overlay without talking."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.topology import (
    SCHEDULES,
    PartialMesh,
    RandomWalk,
    Ring,
    effective_degree,
    initial_token_holders,
    load_graph,
    make_schedule,
    mesh_graph,
    overlay,
    should_regenerate,
    write_graph,
)
from p2pfl.topology.base import stable_seed
from p2pfl.topology.graph_file import dump_toml

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

node_ids = st.text(alphabet="abcdefgh0123456789-_.", min_size=1, max_size=6)
views = st.lists(node_ids, min_size=1, max_size=24, unique=True)


def sends(schedule: Ring | RandomWalk | PartialMesh, view: list[str], r: int = 0) -> set[tuple]:
    return {(a, b) for a in view for b in schedule.plan(a, view, r).send_to}


def expects(schedule: Ring | RandomWalk | PartialMesh, view: list[str], r: int = 0) -> set[tuple]:
    return {(a, b) for b in view for a in schedule.plan(b, view, r).expect_from}


# ---- ring ------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(view=views)
def test_ring_sender_and_receiver_agree_and_everyone_sends_once(view: list[str]) -> None:
    ring = Ring()
    assert sends(ring, view) == expects(ring, view)
    if len(view) == 1:
        assert ring.plan(view[0], view, 0).send_to == ()
        return
    for node in view:
        assert len(ring.plan(node, view, 0).send_to) == 1
    # One cycle through every node: following successors from any node visits them all.
    successor = {a: b for a, b in sends(ring, view)}
    seen, node = set(), view[0]
    while node not in seen:
        seen.add(node)
        node = successor[node]
    assert seen == set(view)


@given(view=views, data=st.data())
def test_ring_plan_does_not_depend_on_view_order_or_on_self_being_listed(
    view: list[str], data: st.DataObject
) -> None:
    own = view[0]
    shuffled = data.draw(st.permutations(view))
    without_self = [node for node in shuffled if node != own]
    assert Ring().plan(own, view, 3) == Ring().plan(own, without_self, 3)
    assert Ring(hops="one").plan(own, view, 3) == Ring(hops="one").plan(own, without_self, 7)


@settings(max_examples=60)
@given(view=views, r=st.integers(0, 10_000))
def test_exponential_ring_every_round_is_one_send_and_one_receive_each(
    view: list[str], r: int
) -> None:
    ring = Ring()
    assert sends(ring, view, r) == expects(ring, view, r)
    if len(view) > 1:
        assert sorted(b for _, b in sends(ring, view, r)) == sorted(view)  # a permutation
        assert all(a != b for a, b in sends(ring, view, r))


@settings(max_examples=60)
@given(view=views)
def test_exponential_ring_reaches_everyone_in_log_n_rounds(view: list[str]) -> None:
    # A model that every reached node passes on reaches the whole ring in ceil(log2 n) rounds
    # (the classic ring needs n - 1), and a node hears that many different predecessors.
    ring, n = Ring(), len(view)
    levels = max(1, (n - 1).bit_length())
    reached = {view[0]}
    for r in range(levels):
        reached |= {b for a, b in sends(ring, view, r) if a in reached}
    assert reached == set(view)
    heard = {p for r in range(levels) for p in ring.plan(view[0], view, r).expect_from}
    assert len(heard) == min(levels, n - 1)
    assert ring.plan(view[0], view, 5) == ring.plan(view[0], view, 5 + levels)


def test_ring_order_and_tokens() -> None:
    view = ["c", "a", "b"]
    assert Ring().plan("c", view, 0).send_to == ("a",)
    assert Ring().plan("c", view, 0).expect_from == ("b",)
    without_token = Ring().plan("c", view, 0, holding_token=False)
    assert without_token.send_to == ()
    assert without_token.expect_from == ("b",)
    assert Ring().plan("a", [], 0).send_to == ()


# ---- random walk -----------------------------------------------------------------------------


@settings(max_examples=60)
@given(view=views, seed=st.integers(0, 2**32), r=st.integers(0, 10_000))
def test_random_walk_picks_one_live_peer_never_itself_reproducibly(
    view: list[str], seed: int, r: int
) -> None:
    for node in view:
        plan = RandomWalk(seed).plan(node, view, r)
        assert plan.expect_from == ()
        if len(view) == 1:
            assert plan.send_to == ()
            continue
        (target,) = plan.send_to
        assert target != node
        assert target in view
        assert RandomWalk(seed).plan(node, list(reversed(view)), r) == plan


def test_random_walk_visits_every_peer_over_rounds() -> None:
    view = [f"n{i}" for i in range(6)]
    targets = [RandomWalk(7).plan("n0", view, r).send_to[0] for r in range(300)]
    assert set(targets) == set(view) - {"n0"}
    counts = [targets.count(peer) for peer in set(targets)]
    assert min(counts) > 30  # about 60 each if uniform
    assert targets != [RandomWalk(8).plan("n0", view, r).send_to[0] for r in range(300)]


def test_random_walk_without_a_token_sends_nothing() -> None:
    assert RandomWalk().plan("a", ["a", "b"], 0, holding_token=False).send_to == ()


# ---- partial mesh ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(view=views, degree=st.integers(1, 8), seed=st.integers(0, 1000), data=st.data())
def test_mesh_is_the_same_symmetric_regular_graph_from_every_viewpoint(
    view: list[str], degree: int, seed: int, data: st.DataObject
) -> None:
    edges: set[tuple[str, str]] = set()
    for node in view:
        # Each node has its own schedule object and sees the view in its own order.
        own_view = [n for n in data.draw(st.permutations(view)) if n != node]
        plan = PartialMesh(degree, seed).plan(node, own_view, 0)
        assert plan.send_to == plan.expect_from
        assert node not in plan.send_to
        assert len(plan.send_to) == effective_degree(len(view), degree)
        edges |= {(node, peer) for peer in plan.send_to}
    assert edges == {(b, a) for a, b in edges}
    reference = mesh_graph(view, degree, seed)
    assert {frozenset(e) for e in edges} == {frozenset(e) for e in reference.edges}
    if len(view) > degree and len(view) * degree % 2 == 0:
        assert all(d == degree for _, d in reference.degree)
    if effective_degree(len(view), degree) >= 2:
        assert nx.is_connected(reference)


@settings(max_examples=40, deadline=None)
@given(view=views.filter(lambda v: len(v) >= 3), degree=st.integers(1, 6), data=st.data())
def test_mesh_reforms_without_a_departed_node(
    view: list[str], degree: int, data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(view))
    remaining = [n for n in view if n != gone]
    mesh = PartialMesh(degree, seed=1)
    assert sends(mesh, remaining) == expects(mesh, remaining)
    for node in remaining:
        plan = mesh.plan(node, remaining, 5)
        assert gone not in plan.send_to
        assert gone not in plan.expect_from
        assert len(plan.send_to) == effective_degree(len(remaining), degree)


@pytest.mark.parametrize(
    ("n", "degree", "expected"),
    [(1, 4, 0), (2, 4, 1), (4, 4, 3), (5, 3, 4), (6, 3, 3), (16, 4, 4), (9, 2, 2), (7, 1, 2)],
)
def test_effective_degree(n: int, degree: int, expected: int) -> None:
    assert effective_degree(n, degree) == expected


def test_mesh_of_many_nodes_is_connected_and_regular() -> None:
    graph = mesh_graph([f"node-{i}" for i in range(500)], 6, seed=3)
    assert {d for _, d in graph.degree} == {6}
    assert nx.is_connected(graph)


def test_mesh_construction_is_pinned() -> None:
    # Nodes on different installs must build the same graph each round: the construction
    # depends only on sha256 and random.Random.random(), and this pins its output.
    assert stable_seed("partial-mesh", 0, 16, 4, 0) == 0xE0BDB98F3F41CE16
    shipped = load_graph(TOPOLOGIES / "mesh16-k4.graphml")
    built = mesh_graph([f"n{i:02d}" for i in range(1, 17)], 4, seed=0, round=0)
    assert {frozenset(e) for e in shipped.edges} == {frozenset(e) for e in built.edges}


def test_mesh_from_a_graph_file_uses_live_neighbours_only() -> None:
    mesh = PartialMesh(graph=load_graph(TOPOLOGIES / "ring8.toml"))
    view = [f"n{i:02d}" for i in range(1, 9)]
    assert mesh.plan("n01", view, 0).send_to == ("n02", "n08")
    assert mesh.plan("n01", [n for n in view if n != "n02"], 0).send_to == ("n08",)
    assert sends(mesh, view) == expects(mesh, view)
    assert mesh.plan("stranger", view, 0).send_to == ()


# ---- graph files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "nodes", "edges", "degrees"),
    [
        ("ring8.toml", 8, 8, {2}),
        ("two-sites8.toml", 8, 13, {3, 4}),
        ("mesh16-k4.graphml", 16, 32, {4}),
    ],
)
def test_shipped_topology_files_load(name: str, nodes: int, edges: int, degrees: set[int]) -> None:
    graph = load_graph(TOPOLOGIES / name)
    assert graph.number_of_nodes() == nodes
    assert graph.number_of_edges() == edges
    assert {d for _, d in graph.degree} == degrees
    assert nx.is_connected(graph)
    assert all(isinstance(node, str) for node in graph.nodes)


@pytest.mark.parametrize("suffix", [".toml", ".graphml"])
def test_graph_files_round_trip(tmp_path: Path, suffix: str) -> None:
    graph = mesh_graph([f"peer{i}" for i in range(10)], 3, seed=2)
    graph.add_node("loner")
    path = tmp_path / f"g{suffix}"
    write_graph(graph, path)
    loaded = load_graph(path)
    assert set(loaded.nodes) == set(graph.nodes)
    assert {frozenset(e) for e in loaded.edges} == {frozenset(e) for e in graph.edges}


def test_directed_graphml_is_read_as_undirected(tmp_path: Path) -> None:
    path = tmp_path / "d.graphml"
    nx.write_graphml(nx.DiGraph([("a", "b")]), path)
    assert PartialMesh(graph=load_graph(path)).plan("b", ["a"], 0).send_to == ("a",)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("g.toml", 'edges = [["a", "a"]]', "self-loop on node 'a'"),
        ("g.toml", 'edges = [["a", "b", "c"]]', "edge 0 must be two node ids"),
        ("g.toml", 'edges = [["a", 1]]', "edge 0 must be two node ids"),
        ("g.toml", 'nodes = ["a"]', "needs edges"),
        ("g.toml", 'edge = [["a", "b"]]', "unknown key 'edge'"),
        ("g.toml", "edges = [", "not valid TOML"),
        ("g.graphml", "<graphml", "not a readable GraphML"),
        ("g.csv", "a,b", "use .toml"),
    ],
)
def test_bad_graph_files_are_explained(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_graph(path)


def test_dump_toml_lists_isolated_nodes() -> None:
    graph = nx.Graph([("b", "a")])
    graph.add_node("z")
    assert dump_toml(graph) == 'nodes = ["z"]\nedges = [\n  ["a", "b"],\n]\n'


# ---- walkers ---------------------------------------------------------------------------------


@settings(max_examples=60)
@given(view=views, k=st.integers(1, 5), seed=st.integers(0, 100), data=st.data())
def test_every_node_agrees_on_exactly_k_initial_holders(
    view: list[str], k: int, seed: int, data: st.DataObject
) -> None:
    holders = initial_token_holders(view, k, seed)
    assert len(holders) == min(k, len(view))
    assert holders <= set(view)
    assert initial_token_holders(data.draw(st.permutations(view)), k, seed) == holders


@settings(max_examples=40)
@given(view=views, k=st.integers(1, 3))
def test_only_designated_nodes_regenerate_and_only_after_the_timeout(
    view: list[str], k: int
) -> None:
    regenerators = {
        node
        for node in view
        if should_regenerate(node, [n for n in view if n != node], 31.0, timeout=30.0, k=k)
    }
    assert regenerators == initial_token_holders(view, k)
    assert not any(should_regenerate(node, view, 29.0, timeout=30.0, k=k) for node in view)


def test_walkers_need_at_least_one_token() -> None:
    with pytest.raises(ValueError, match="k >= 1"):
        initial_token_holders(["a"], 0)


# ---- factory ---------------------------------------------------------------------------------


def test_make_schedule_builds_each_schedule() -> None:
    assert [make_schedule(name).name for name in SCHEDULES] == list(SCHEDULES)
    mesh = make_schedule("partial-mesh", degree=2, seed=5)
    assert mesh == PartialMesh(degree=2, seed=5)


def test_make_schedule_explains_bad_input() -> None:
    with pytest.raises(ValueError, match="choose one of: ring, random-walk, partial-mesh"):
        make_schedule("star")
    with pytest.raises(ValueError, match="partial-mesh only"):
        make_schedule("ring", graph=nx.Graph())
    with pytest.raises(ValueError, match="degree >= 1"):
        make_schedule("partial-mesh", degree=0)


def test_overlay_of_a_ring_is_one_directed_cycle() -> None:
    graph = overlay(Ring(), ["a", "b", "c", "d"])
    assert sorted(graph.edges) == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a")]
