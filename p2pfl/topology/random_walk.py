"""Random-walk schedule: send to one uniformly random live peer; expect nothing.

This is gossip learning's push step (Ormándi et al. 2013, "Gossip learning with linear models
on fully distributed data"); with one walker it is a single model doing a random walk over the
nodes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from p2pfl.topology.base import Plan, stable_seed


@dataclass(frozen=True)
class RandomWalk:
    """Send to one peer drawn uniformly from the live view, reproducibly from (seed, id, round)."""

    seed: int = 0

    @property
    def name(self) -> str:
        """``random-walk``."""
        return "random-walk"

    def plan(
        self, own_id: str, view: Sequence[str], round: int, *, holding_token: bool = True
    ) -> Plan:
        """One random target other than ``own_id``; an empty plan when alone or without a token."""
        others = sorted(set(view) - {own_id})
        if not others or not holding_token:
            return Plan()
        rng = random.Random(stable_seed("random-walk", self.seed, own_id, round))
        # random() is the one draw Python promises to keep stable across versions for a seed;
        # choice() and randrange() are not, and simulations should replay on any Python.
        return Plan(send_to=(others[int(rng.random() * len(others))],))
