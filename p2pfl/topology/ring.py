"""Ring schedule: the live view sorted by id; send to a successor, expect the same predecessor.

Without walkers the hop doubles each round and starts over: round r sends to the
2^(r mod L)-th successor (L = ceil(log2 n), so hops 1, 2, 4, 8 on 16 nodes) and expects the
2^(r mod L)-th predecessor: the one-peer exponential graph (Ying et al. 2021, "Exponential
graph is provably efficient for decentralized deep training", NeurIPS), the hops of a Chord
finger table. Each node still sends one model and merges one per round, as on the classic
ring, but information crosses the network in L rounds instead of n, and a node hears L
different predecessors: a Byzantine one can no longer cut off the honest nodes after it (on
a fixed ring it is all they hear, and no merge rule can help them). With walkers the hop is
always 1, so a token visits every node in turn (cyclic incremental training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from p2pfl.topology.base import Plan, members


def hop(n: int, round: int) -> int:
    """How far ahead round ``round``'s successor is on an exponential ring of ``n`` nodes."""
    levels = max(1, (n - 1).bit_length())
    return 1 << (round % levels)


@dataclass(frozen=True)
class Ring:
    """Send to the ``hop``-th next id in sorted order (wrapping around), expect the ``hop``-th
    previous one; ``hops="one"`` is the classic ring (hop 1 every round)."""

    hops: Literal["exponential", "one"] = "exponential"

    @property
    def name(self) -> str:
        """``ring``."""
        return "ring"

    def plan(
        self, own_id: str, view: Sequence[str], round: int, *, holding_token: bool = True
    ) -> Plan:
        """Successor and predecessor of ``own_id``; an empty plan when it is alone.

        The predecessor is expected whether or not this node holds a token: it is where a
        token would come from.
        """
        ring = members(own_id, view)
        if len(ring) < 2:
            return Plan()
        step = hop(len(ring), round) if self.hops == "exponential" else 1
        position = ring.index(own_id)
        successor = ring[(position + step) % len(ring)]
        predecessor = ring[(position - step) % len(ring)]
        return Plan(send_to=(successor,) if holding_token else (), expect_from=(predecessor,))
