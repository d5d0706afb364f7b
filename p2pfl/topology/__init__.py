"""Schedules: who sends to whom each round (ring, random-walk, partial-mesh), plus graph files.

Schedules are pure functions of (own id, live view, round, seed), shared by the daemon and the
simulator.
"""

from __future__ import annotations

import networkx as nx

from p2pfl.config import NodeConfig
from p2pfl.topology.base import Plan, Schedule, overlay
from p2pfl.topology.graph_file import load_graph, write_graph
from p2pfl.topology.partial_mesh import PartialMesh, effective_degree, mesh_graph
from p2pfl.topology.random_walk import RandomWalk
from p2pfl.topology.ring import Ring
from p2pfl.topology.walkers import initial_token_holders, should_regenerate

SCHEDULES = ("ring", "random-walk", "partial-mesh")

__all__ = [
    "SCHEDULES",
    "PartialMesh",
    "Plan",
    "RandomWalk",
    "Ring",
    "Schedule",
    "effective_degree",
    "initial_token_holders",
    "load_graph",
    "make_schedule",
    "mesh_graph",
    "node_schedule",
    "overlay",
    "should_regenerate",
    "write_graph",
]


def make_schedule(
    name: str,
    *,
    degree: int = 4,
    seed: int = 0,
    graph: nx.Graph | None = None,
    walkers: int = 0,
    sampled: bool = False,
) -> Schedule:
    """The schedule called ``name``; ``degree`` and ``graph`` apply to partial-mesh only.

    With ``walkers`` the ring keeps hop 1 (a token visits every node in turn); without, its
    hop doubles each round (:class:`Ring`). ``sampled``: each node knows a partial view only
    (``view_size``): the ring keeps hop 1 (a far hop needs every id) and partial-mesh is the
    union of hashed rings (:func:`p2pfl.discovery.sampling.mesh_neighbours`).

    Raises ValueError for an unknown name, or a graph given to a schedule that ignores it.
    """
    if graph is not None and name != "partial-mesh":
        raise ValueError(f"a topology graph applies to partial-mesh only, not to {name!r}")
    if name == "ring":
        return Ring(hops="one" if walkers or sampled else "exponential")
    if name == "random-walk":
        return RandomWalk(seed=seed)
    if name == "partial-mesh":
        return PartialMesh(degree=degree, seed=seed, graph=graph, sampled=sampled)
    raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def node_schedule(config: NodeConfig) -> Schedule:
    """The schedule a node runs: ``config.schedule``, on ``config.topology_file``'s graph."""
    graph = None if config.topology_file is None else load_graph(config.topology_file)
    return make_schedule(
        config.schedule,
        degree=config.degree,
        seed=config.seed,
        graph=graph,
        walkers=config.walkers,
        sampled=config.view_size > 0,
    )
