"""Peer sampling: which few peers a node keeps in its view of a large network.

A node of a network of thousands keeps a bounded partial view (DESIGN.md, Membership at
scale), maintained by shuffles in the manner of Cyclon (Voulgaris, Gavidia and van Steen
2005, "CYCLON: inexpensive membership management for unstructured P2P overlays") and T-Man
(Jelasity, Montresor and Babaoglu 2009, "T-Man: gossip-based fast overlay topology
construction"): now and then a node sends one view member a few entries (itself among them),
the member answers with entries of its own, and each keeps, of everything it knows, what
:func:`select` picks.

The view has two parts:
- **near**: on each ring the schedule uses, the ``near`` closest successors and predecessors
  of the node (T-Man's ranking). A ring orders all ids by a key: by id itself for the ring
  schedule, by a seeded hash of the id for each of the partial-mesh's rings
  (:func:`ring_keys`). Answers favour entries close to the asker on its rings, so every node's
  near part converges to its true neighbours in a number of shuffle rounds that grows like
  log N (the test in tests/test_sampling.py measures it).
- **random**: the rest of the view, a sample of everyone else that shuffles keep mixing
  (Cyclon's part): it is what random-walk draws from and what makes the near parts converge.

Every function here is pure: ids in, ids out, randomness from the ``rng`` given, so the daemon,
the simulator and the tests share them. The wire format of a shuffle (signed presence records
of the entries) belongs to :mod:`p2pfl.discovery.membership`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence

from p2pfl.topology.base import stable_seed

NEAR = 3
"""Neighbours kept each side of a node on each of its rings: its true one, and two spare for
when one leaves."""
LENGTH = 12
"""Entries a shuffle carries each way (the sender's own among them)."""

Key = Callable[[str], object]
"""Where an id sits on a ring: ids are ordered by it (ties cannot happen: ids are unique)."""


def by_id(peer_id: str) -> str:
    """The ring schedule's ring: ids in sorted order."""
    return peer_id


@functools.lru_cache(maxsize=64)
def hashed(ring: int, seed: int) -> Key:
    """A ring ordering ids by a seeded hash: ``ring`` numbers distinct, independent orders."""

    @functools.lru_cache(maxsize=1 << 16)
    def key(peer_id: str) -> int:
        return stable_seed("ring", seed, ring, peer_id)

    return key


def ring_keys(schedule: str, *, degree: int = 4, seed: int = 0) -> tuple[Key, ...]:
    """The rings whose neighbours a node of ``schedule`` must know.

    The ring schedule: the ring by id. Partial-mesh: ``ceil(degree / 2)`` hashed rings, whose
    union of successor and predecessor edges is its overlay (:func:`mesh_neighbours`).
    Random-walk: none, it only samples the view.
    """
    if schedule == "ring":
        return (by_id,)
    if schedule == "partial-mesh":
        return tuple(hashed(j, seed) for j in range((degree + 1) // 2))
    return ()


def around(own: str, ids: Iterable[str], key: Key, count: int) -> tuple[list[str], list[str]]:
    """The ``count`` nearest successors and predecessors of ``own`` among ``ids`` on a ring,
    nearest first (with wrap-around; fewer when the ring is small, and each id once)."""
    ring = sorted({*ids, own}, key=key)  # type: ignore[arg-type]
    at = ring.index(own)
    others = len(ring) - 1
    after = [ring[(at + i) % len(ring)] for i in range(1, min(count, others) + 1)]
    before = [ring[(at - i) % len(ring)] for i in range(1, min(count, others) + 1)]
    return after, before


def mesh_neighbours(own: str, view: Iterable[str], degree: int, seed: int = 0) -> tuple[str, ...]:
    """``own``'s neighbours in the partial-mesh overlay of a sampled network, sorted.

    The overlay is the union of ``ceil(degree / 2)`` random rings (each a seeded hash order of
    all ids): ``own`` links to its successor and predecessor on each. Both ends of an edge
    compute it alike, from their own near view alone, so it is symmetric without a global
    view: a node expects exactly the nodes it sends to. A node has at most ``degree`` + 1
    neighbours (fewer where rings share an edge); the union of two or more random Hamiltonian
    cycles is an expander with high probability.
    """
    ids = set(view)
    ids.discard(own)
    if not ids:
        return ()
    found: set[str] = set()
    for key in ring_keys("partial-mesh", degree=degree, seed=seed):
        after, before = around(own, ids, key, 1)
        found.update(after[:1] + before[:1])
    return tuple(sorted(found))


def mesh_adjacency(ids: Iterable[str], degree: int, seed: int = 0) -> dict[str, tuple[str, ...]]:
    """:func:`mesh_neighbours` of every id at once (each ring sorted once, not once per id)."""
    everyone = sorted(set(ids))
    found: dict[str, set[str]] = {peer: set() for peer in everyone}
    if len(everyone) < 2:
        return {peer: () for peer in everyone}
    for key in ring_keys("partial-mesh", degree=degree, seed=seed):
        ring = sorted(everyone, key=key)  # type: ignore[arg-type]
        for i, peer in enumerate(ring):
            found[peer].update((ring[i - 1], ring[(i + 1) % len(ring)]))
    return {peer: tuple(sorted(found[peer] - {peer})) for peer in everyone}


def near(own: str, ids: Iterable[str], rings: Sequence[Key], count: int) -> list[str]:
    """The near part: on each ring, ``count`` successors and predecessors, nearest first,
    interleaved, each id once."""
    known = set(ids)
    known.discard(own)
    chosen: dict[str, None] = {}
    for key in rings:
        after, before = around(own, known, key, count)
        for pair in zip(after, before, strict=True):
            chosen.update(dict.fromkeys(pair))
    return list(chosen)


def select(
    own: str,
    known: Iterable[str],
    *,
    size: int,
    rings: Sequence[Key],
    count: int,
    keep: Iterable[str] = (),
    rng: random.Random,
) -> list[str]:
    """The view ``own`` keeps of the ``known`` ids: the near part on ``rings``, then the ids of
    ``keep`` (the random part it had) still known, then random others, ``size`` in all, sorted.

    Raises ValueError when the near part alone would not fit in ``size``.
    """
    if size < 2 * count * len(rings):
        raise ValueError(
            f"a view of {size} cannot hold {count} neighbours each side on {len(rings)} rings"
        )
    pool = set(known)
    pool.discard(own)
    chosen = dict.fromkeys(near(own, pool, rings, count))
    for peer in keep:
        if len(chosen) >= size:
            break
        if peer in pool:
            chosen[peer] = None
    rest = sorted(pool.difference(chosen))
    rng.shuffle(rest)
    chosen.update(dict.fromkeys(rest[: max(0, size - len(chosen))]))
    return sorted(chosen)


def entries_for(
    view: Sequence[str],
    peer: str,
    *,
    rings: Sequence[Key],
    count: int,
    length: int,
    rng: random.Random,
) -> list[str]:
    """What a node sends ``peer`` in a shuffle, either way: the entries of its view nearest
    ``peer`` on each ring (T-Man), then random others, ``length`` in all, never ``peer``
    (the sender adds itself)."""
    others = [entry for entry in view if entry != peer]
    chosen = dict.fromkeys(near(peer, others, rings, count))
    rest = sorted(set(others).difference(chosen))
    rng.shuffle(rest)
    chosen.update(dict.fromkeys(rest))
    return list(chosen)[:length]


def partner(
    own: str,
    view: Sequence[str],
    *,
    rings: Sequence[Key],
    count: int,
    tick: int,
    rng: random.Random,
) -> str | None:
    """The view member ``own`` shuffles with at its ``tick``-th shuffle (None: empty view).

    Three times in four one of its near part (T-Man: neighbours refine each other's rings
    fast), else anyone in the view (Cyclon: the random parts keep mixing, and a node whose near
    part is wrong still meets nodes that know better).
    """
    if not view:
        return None
    close = near(own, view, rings, count)
    return rng.choice(close if close and tick % 4 else sorted(view))


def merged(
    own: str,
    view: Sequence[str],
    *,
    sent: Iterable[str],
    received: Sequence[str],
    size: int,
    rings: Sequence[Key],
    count: int,
    rng: random.Random,
) -> list[str]:
    """``own``'s view after a shuffle in which it ``sent`` some entries and ``received`` others:
    the near part of all it knows, then the received entries, then what it kept (Cyclon hands
    the sent entries over to make room for the received ones)."""
    given = set(sent)
    kept = [peer for peer in view if peer not in given]
    return select(
        own, {*view, *received}, size=size, rings=rings, count=count,
        keep=[*received, *kept], rng=rng,
    )  # fmt: skip
