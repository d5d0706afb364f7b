"""What every schedule shares: the plan it returns and the interface it implements.

A schedule is a pure function of (own id, live view, round) plus its own parameters and seed,
so the daemon and the simulator share it and every node computes the same overlay from the
same view without talking about it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import networkx as nx


@dataclass(frozen=True)
class Plan:
    """Where a node sends its model this round, and whose round-r models a sync node waits for."""

    send_to: tuple[str, ...] = ()
    expect_from: tuple[str, ...] = ()


class Schedule(Protocol):
    """A communication schedule: ring, random-walk or partial-mesh."""

    @property
    def name(self) -> str:
        """The schedule's config name, e.g. ``ring``."""
        ...

    def plan(
        self, own_id: str, view: Sequence[str], round: int, *, holding_token: bool = True
    ) -> Plan:
        """Targets for ``own_id`` at ``round`` given the live trainer ids in ``view``.

        ``view`` may or may not contain ``own_id``. With walkers, a node that holds no model
        token sends nothing (``holding_token=False``).
        """
        ...


def members(own_id: str, view: Iterable[str]) -> list[str]:
    """The view with ``own_id`` added, deduplicated and sorted: the order every node agrees on."""
    return sorted({*view, own_id})


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts``, identical across processes, machines and Python versions.

    Python's ``hash`` of a string changes per process (PYTHONHASHSEED), so it cannot be used to
    make independent nodes agree.
    """
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def overlay(schedule: Schedule, view: Sequence[str], round: int = 0) -> nx.DiGraph:
    """The directed graph of who sends to whom at ``round``, for display and analysis."""
    graph = nx.DiGraph()
    graph.add_nodes_from(sorted(set(view)))
    for node in sorted(set(view)):
        for target in schedule.plan(node, view, round).send_to:
            graph.add_edge(node, target)
    return graph
