"""Ring schedule: the live view sorted by id; send to the successor, expect the predecessor.

With one walker this is cyclic incremental training (the model visits every node in turn);
with none, every node passes its model on every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from p2pfl.topology.base import Plan, members


@dataclass(frozen=True)
class Ring:
    """Send to the next id in sorted order (wrapping around), expect the previous one."""

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
        position = ring.index(own_id)
        successor = ring[(position + 1) % len(ring)]
        predecessor = ring[position - 1]
        return Plan(send_to=(successor,) if holding_token else (), expect_from=(predecessor,))
