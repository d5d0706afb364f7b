"""Walkers: only K model tokens circulate (ring and random-walk); K=1 is cyclic/random transfer.

Pure helpers that let every node agree, without talking, on who starts with a token and who
regenerates one that was lost with a crashed node. Adopting, training and passing a token on is
node logic.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pfl.topology.base import stable_seed


def initial_token_holders(view: Sequence[str], k: int, seed: int = 0) -> set[str]:
    """The ``k`` nodes that start with a token: the same set on every node given the same view.

    ``view`` is every live trainer, self included. Holders are the first ``k`` ids ordered by a
    seeded hash, so they are spread over the sorted ring rather than bunched at its start; with
    ``k`` >= the number of nodes every node holds one.
    """
    if k < 1:
        raise ValueError(f"walkers needs k >= 1 tokens, got {k}")
    ranked = sorted(set(view), key=lambda node: (stable_seed("walkers", seed, node), node))
    return set(ranked[:k])


def should_regenerate(
    own_id: str,
    view: Sequence[str],
    last_token_seen_age: float,
    timeout: float,
    k: int,
    *,
    seed: int = 0,
) -> bool:
    """Whether ``own_id`` should create a token: it has seen none for ``timeout`` seconds and it
    is one of the ``k`` designated regenerators (the :func:`initial_token_holders` of the
    current view, self included).

    Only designated nodes regenerate, so a lost token is replaced by at most ``k`` nodes, not by
    every node that noticed. ``last_token_seen_age`` is the time since this node last held or
    received a token.
    """
    if last_token_seen_age < timeout:
        return False
    return own_id in initial_token_holders([*view, own_id], k, seed)
