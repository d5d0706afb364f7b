"""Merge rules: combine a node's own model with what its neighbours sent into one model.

Each rule takes the models to merge (the node's own model first, then what its neighbours sent;
the gossip policy of merging the local model with received ones is Ormándi et al. 2013, "Gossip
learning with linear models on fully distributed data", and lives in the node) and optional
per-model weights (ages), and returns a new model. Inputs are never modified.

Arithmetic is done in float64 and cast back to each tensor's dtype. Integer and bool tensors
(BatchNorm's ``num_batches_tracked``, masks) go through the same rule and are rounded to the
nearest value the dtype holds: the rounded mean of the counters for ``average``, the median for
``median``, the chosen model's counter for ``krum``. Robust rules therefore stay robust for them
too. ``average``, ``median``, ``trimmed-mean`` and ``krum`` are independent of the order of
their inputs; ``clipped`` and ``weighted`` treat the first model as the node's own (the one
that moves, the one whose age caps the others') and are independent of the order of the rest.

Which rule defends against what (a Byzantine peer holds a valid key and sends what it likes):

- ``average``: nothing; one scaled model drags every neighbour with it.
- ``clipped`` (default): any one neighbour moves a node by at most tau/(n+1) per merge, on
  every schedule, walkers included, since it needs no majority within one merge (see
  :class:`ClippedGossip`).
- ``median``, ``trimmed-mean:F``, ``krum:F``: need several models per merge, so they help on
  the partial mesh only; a ring or random-walk node merges one model at a time.
- ``weighted``: no defence; it trusts the ages senders claim, capped at C times the node's own.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

Weights = dict[str, np.ndarray]
"""A model: tensor name -> array."""

_Number = TypeVar("_Number", int, float)

Models = Sequence[Weights]
Ages = Sequence[float] | None
"""Each model's weight in a merge (its age, for ``weighted``); None: equal."""
Senders = Sequence[str] | None
"""Who sent ``models[1:]`` (rules with a memory of senders use it)."""

RuleFunction = Callable[[Models, Ages], Weights]

CLIPPED_FACTOR = 2.0
"""tau is this many times the median recent distance to honest-looking neighbours."""
CLIPPED_WINDOW = 32
"""How many recent neighbour distances a clipped-gossip node remembers."""
STANDING_MEMORY = 4096
"""How many senders' standing a clipped-gossip node remembers (least recently merged forgotten)."""
STANDING_RECOVERY = 0.25
"""What a sender's standing regains with each model within the radius (halved for each beyond)."""
STANDING_START = 0.5
"""A sender's standing before its first model: trust is earned (full after two near models)."""
STANDING_FAR = 1.0
"""A model farther than this many times tau (one that is clipped) counts against its sender's
standing."""
STANDING_NORM = 2.0
"""A model whose norm is more than this factor off the node's own is left out, and counts
against its sender."""
ALIGN_MIN = 0.2
"""A model whose cosine with the node's own is below this is left out, and counts against its
sender (unless most of the node's last senders sent such models)."""
OUTLIER_SENDERS = 4
"""The node is the outlier when most of its last this many distinct senders sent far models."""
WEIGHTED_CAP = 4.0
"""``weighted`` counts a sender's age as at most this many times the node's own."""

CHOICES = (
    "clipped (default) | clipped:F (tau = F x the median recent distance, F >= 1)",
    "average",
    "weighted | weighted:C (a sender weighs at most C times the node itself, C >= 1)",
    "median",
    "trimmed-mean:F (0 <= F < 0.5)",
    "krum:F (F Byzantine peers, an integer >= 0)",
    "multi-krum:F:M (average the M best by Krum's score)",
)


class Merge(Protocol):
    """What a node merges with: ``merge(models, ages)`` and, for walker tokens, ``adopt``."""

    @property
    def name(self) -> str: ...

    def __call__(self, models: Models, weights: Ages = None, *, senders: Senders = None) -> Weights:
        """Merge; ``senders`` name who sent ``models[1:]`` (rules with a memory use them)."""
        ...

    def adopt(
        self, own: Weights, tokens: Models, weights: Ages = None, *, senders: Senders = None
    ) -> Weights:
        """The model a walker node continues from once ``tokens`` reached it."""
        ...

    def anchor(self, weights: Weights) -> None:
        """The model this node starts from (its initial or resumed one), before any merge."""
        ...


@dataclass(frozen=True)
class MergeRule:
    """A stateless merge rule bound to its parameters, callable as ``rule(models, weights)``."""

    name: str
    function: RuleFunction

    def __call__(self, models: Models, weights: Ages = None, *, senders: Senders = None) -> Weights:
        return self.function(models, weights)

    def anchor(self, weights: Weights) -> None:
        """Stateless rules need no starting point."""

    def adopt(
        self, own: Weights, tokens: Models, weights: Ages = None, *, senders: Senders = None
    ) -> Weights:
        """Walkers: the token replaces ``own`` (several tokens met here: the rule merges them).

        A token is the one model that walks; the node's own copy is what it trained the last
        time the token passed, so it is left out.
        """
        _check([own, *tokens], None)
        if len(tokens) == 1:
            return {name: np.array(tensor, copy=True) for name, tensor in tokens[0].items()}
        return self.function(tokens, weights)


class ClippedGossip:
    """Clipped gossip with an adaptive radius; one object per node, as it remembers distances.

    He, Karimireddy and Jaggi 2022, "Byzantine-robust decentralized learning via
    ClippedGossip", arXiv:2202.01545. A merge of the node's model x with n
    neighbours' models x_j is::

        x_new = x + 1/(n+1) * sum_j clip_{tau_j}(x_j - x),  clip_t(v) = v * min(1, t / ||v||)

    with ||.|| the L2 norm over all floating-point tensors together (a step counter says nothing
    about how far apart two models are; integer and bool tensors move by the same fraction as
    the rest of their model) and tau_j = tau * r_j <= tau, r_j in (0, 1] the sender's reach
    (from its standing, below). The bound: whatever neighbour j sends, its term moves the node
    by at most tau/(n+1), and the whole merge by at most n*tau/(n+1) < tau; changing one
    neighbour's model arbitrarily changes the result by at most 2*tau/(n+1). With every
    neighbour within its radius (and its norm within a factor 2 of the node's, below) it is
    exactly ``average``. n counts the models taken: one left out (out of shape, below) or whose
    difference is non-finite or overflows is not counted, as if it had not come, so the bounds
    hold with n the models taken (leaving a model out raises the others' shares from 1/(n+1) to
    1/n, a change below tau/(n+1) in all). It needs no majority within one merge, so it works
    with one neighbour per round (ring, random walk) and for walker tokens (:meth:`adopt`).

    The radius. The paper's adaptive rule picks each node's tau from the current distances
    to its neighbours: the distance beyond which the farthest neighbours, holding the assumed
    Byzantine share of the mixing weight, are clipped. A gossip node neither knows that share
    nor, on a ring, has more than one distance per round, so here tau is taken from the past:
    ``tau = F * lower median of the last CLIPPED_WINDOW (32) neighbour distances``, F = 2
    unless ``clipped:F``, each distance remembered as ``min(d, tau)`` of its own merge (an
    outlier is remembered as honest-looking at most). The first merge, with no past yet, takes
    F x how far the node's own training moved it since its anchor (the model it started from,
    :meth:`anchor`, or its last merge): a scale no neighbour can set, so a ring node's first
    neighbour cannot have itself taken in full. Only when that is unknown (or zero: a walker
    that never trained) does it use the lower median of the merge's own distances, which holds
    while at most half of the neighbours are Byzantine. Why so:

    - the lower median of clipped distances cannot be moved by a minority of far neighbours,
      and the radius of a merge does not depend on that merge's models once there is a past
      (unless most of them are far: see below), so a single neighbour on a ring cannot raise
      the radius it is clipped with;
    - F = 2 leaves the spread of honest distances (label-skewed neighbours are farther)
      unclipped (3% of them are clipped in the default scenario on the mesh), so the clean
      network learns as with ``average``, and a scaled model, some 40 median distances away
      in ``sim/byzantine.toml``, is cut to 2;
    - remembering distances as ``min(d, tau)`` keeps the median unbiased while fewer than half
      the recent distances exceed tau, and when more do (honest models drifting apart, or a
      node whose every neighbour is Byzantine) tau grows geometrically instead of jumping, by
      F each time half the window has been replaced (2x per 16 merges on a ring).
    Zero distances (a copy of the node's own model) carry no scale and are not remembered.

    Standing (our addition; the paper's bound holds per merge, this bounds the sum over a
    run). Clipping alone still lets an attacker pull every merge by tau/(n+1) in the same
    direction (sign-flip, scaled and ipm pull towards or through the origin), while honest
    neighbours' pulls point every which way and cancel; in ``sim/attacks.toml`` that drift
    cost the mesh 30 to 50 points. So each sender has a standing s_j: ``STANDING_START`` (1/2)
    before its first model (trust is earned), halved by every model farther than
    ``STANDING_FAR`` x tau (1: every model it clips), raised by ``STANDING_RECOVERY``
    (1/4, at most to 1) by every nearer one, and used from the sender's next model on as its
    reach r_j = min(1, s_j / ``STANDING_START``): the whole radius down to the starting
    standing, and half as much for each halving below it. A sender that is always far moves a
    node by at most tau/(n+1) * (1 + 1/2 + 1/4 + ...) = 2 tau/(n+1) over the whole run; an
    honest neighbour judged far by chance keeps its whole radius if it had earned standing
    (1 -> 1/2), and is back at full standing after two merges. The reach starts at the whole
    radius, not at s_j: with tau_j = tau * s_j half of a random-walk node's models (most of
    them from senders new to it) were clipped at the median honest distance, and the clean
    default scenario lost 2.2 points against ``average`` on the ring and 4.2 on the random
    walk (10 seeds); with the reach, 0.2 and 0.6. A stream of fresh identities (Sybils) thus
    moves a node by up to tau/(n+1) each, as the paper's bound allows, never more.

    Far is beyond the radius (``STANDING_FAR`` = 1): a model taken whole costs its sender
    nothing. At 3/4 (until 0b95a56), where honest models drift apart round after round
    (``sim/large.toml``: mlp, 96 samples a node, distances growing 10-20% a merge) the radius
    trailed them, most honest models landed between 3/4 tau and tau, every sender's standing
    fell towards 0 and each node learnt from its own data alone: 256 nodes ended at 0.25
    against ``average``'s 0.39. At 1, 0.38. The attacked accuracies of the attack bench stayed
    within their run-to-run spread; clean runs rose (README, Merge rules, has the figures).

    A model whose norm is more than ``STANDING_NORM`` (2) times off the node's own also
    counts as far: honest models trained from one start keep about the same norm yet sit
    nearly a norm apart when their data differ, so a model near the origin (a zero model,
    ``ipm``'s -0.1 x the honest mean, what a ``scaled`` attacker sends once its own model
    has overflowed) is as near as an honest one and only its norm gives it away;
    on the exponential ring such senders kept full standing and cost 30 points. Standing is
    kept for the last ``STANDING_MEMORY`` (4096) senders judged; models with no sender named
    (``senders=None``) always have standing 1.

    Shape (our addition): a model that is out of shape is not only held against its sender,
    it is left out of the merge (not counted in n). Out of shape is a norm more than
    ``STANDING_NORM`` (2) times off the node's own, or a cosine with the node's model below
    ``ALIGN_MIN`` (0.2). Clipping bounds a step's length, not where it goes:

    - a model huge in a few coordinates (an attacker, or a peer whose training diverged, sent
      up to fp16's range) moves the node by tau*r/(n+1) along those few coordinates, a step
      no honest difference takes; on the exponential ring of ``sim/attacks.toml`` it made
      honest nodes' own training diverge (``sign-flip`` attackers, whose training blows up,
      left 3 to 5 of 12 honest nodes at chance: ring 0.40 and 0.33 with seeds 0 and 1). This
      is the norm bound of Sun et al. 2019, "Can you really backdoor federated learning?"
      (arXiv:1911.07963), with the node's own norm as the reference and applied to models;
    - honest models trained from one start stay aligned (cosine 0.55 or more in 95% of the
      honest merges of ``sim/attacks.toml``), while ``random`` noise is orthogonal to them
      (|cosine| < 0.03) and ``sign-flip`` and ``ipm`` point away (down to -0.97); at the
      radius r*tau such models still drifted every random-walk node (``random``: 0.48 with
      seed 1, clean 0.76). FLTrust (Cao et al. 2021, NDSS, "FLTrust: Byzantine-robust
      federated learning via trust bootstrapping") likewise gives no weight to an update
      whose cosine with the server's own is not positive; here the node's model is the
      reference, and 0.2 leaves the honest spread a wide margin.

    Alignment is not asked when most of the node's last senders (this merge's models, filled
    up to ``OUTLIER_SENDERS`` with the latest from the last other senders; two or more) sent
    unaligned models, and the norm is not asked when most of them sent models off the node's
    norm: the node is then the odd one (it started from another initial model, or its own
    training blew its norm up), and clipping and standing alone apply, as before. Without the
    norm vote a node whose norm grew fivefold while its radius was large left every honest
    model out for the rest of its run (``sim/attacks.toml``, ``scaled``, mesh: two honest
    nodes stuck at 0.2 and 0.7). A node that is the outlier (below) takes a model out of shape
    when it lies within the majority's radius: its own norm is then the odd one, and this is
    how it comes back.

    The node as the outlier. When most of its last neighbours are beyond tau (the lower
    median of the distances from this merge's senders and, filled up to ``OUTLIER_SENDERS``
    (4), the latest from the last other senders, counting only senders that had earned
    standing (above ``STANDING_START``), two or more in all), the node itself is the odd one
    out: its own training diverged, or the honest models moved on together. It then trusts
    the majority, as on a first merge (tau = that lower median, which holds while fewer than
    half of those neighbours are Byzantine), and holds no far model against its sender.
    Without this a node whose local training blew up would distrust every honest neighbour
    and never come back (seen in ``sim/attacks.toml``). Looking back over past merges lets a
    ring or random-walk node, one model per merge, see it too. Counting only senders with
    earned standing means neither a stream of fresh identities (Sybils) nor attackers new to
    the node are ever that majority: on a mesh redrawn each round a node meets new neighbours
    often, and three attackers among its four took a node's first merge over, their lower
    median its radius.
    """

    def __init__(
        self,
        factor: float = CLIPPED_FACTOR,
        *,
        window: int = CLIPPED_WINDOW,
        memory: int = STANDING_MEMORY,
    ) -> None:
        _check_clipped_factor(factor)
        if window < 1:
            raise ValueError(f"clipped gossip needs a window of at least 1 distance, got {window}")
        self.factor = factor
        self.name = "clipped" if factor == CLIPPED_FACTOR else f"clipped:{factor:g}"
        self._recent: deque[float] = deque(maxlen=window)
        self._standing: OrderedDict[str, float] = OrderedDict()
        self._memory = memory
        # The latest distance from each of the last senders, and whether it had earned standing
        # then, most recent last (outlier rule).
        self._latest: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        # Whether each of the last senders' latest model was aligned with the node's (shape).
        self._aligned: OrderedDict[str, tuple[bool, bool]] = OrderedDict()
        self.tau: float | None = None
        """The radius of the last merge or adoption (None before the first)."""
        self._last: Weights | None = None  # what the node continued from after its last merge

    def anchor(self, weights: Weights) -> None:
        """The model the node starts from: its first merge compares its training with it."""
        self._last = weights

    def radius(self, distances: Sequence[float], moved: float = 0.0) -> float:
        """tau for the next merge: from the past, else from how far the node's own training
        ``moved`` it since its anchor, else from ``distances`` (this merge's)."""
        pool = list(self._recent) or ([moved] if math.isfinite(moved) and moved > 0 else [])
        pool = pool or [d for d in distances if math.isfinite(d) and d > 0]
        if not pool:
            return 0.0
        return self.factor * sorted(pool)[(len(pool) - 1) // 2]

    def standing(self, sender: str) -> float:
        """``sender``'s standing, in (0, 1]: ``STANDING_START`` until it has sent a model."""
        return self._standing.get(sender, STANDING_START)

    def reach(self, sender: str) -> float:
        """The share of tau that ``sender``'s next model may move this node by, in (0, 1]:
        all of it from ``STANDING_START`` up, half of it for each halving below."""
        return min(1.0, self.standing(sender) / STANDING_START)

    def __call__(self, models: Models, weights: Ages = None, *, senders: Senders = None) -> Weights:
        """``models[0]`` is the node's own; ``weights`` are checked and ignored."""
        _check(models, weights)
        return self._step(models[0], models[1:], own_counts=True, senders=senders)

    def adopt(
        self, own: Weights, tokens: Models, weights: Ages = None, *, senders: Senders = None
    ) -> Weights:
        """Walkers: ``own + mean_j clip_{tau_j}(token_j - own)`` instead of the token outright.

        A token within its radius replaces the node's model as with every rule (several: their
        mean); a far one moves it by at most tau, so a Byzantine token overwrites no one.
        """
        _check([own, *tokens], None)
        if weights is not None and len(weights) != len(tokens):
            raise ValueError(f"got {len(weights)} weights for {len(tokens)} tokens")
        if not tokens:
            raise ValueError("cannot adopt an empty list of tokens")
        return self._step(own, tokens, own_counts=False, senders=senders)

    def _step(
        self,
        own: Weights,
        others: Sequence[Weights],
        own_counts: bool,
        senders: Sequence[str] | None,
    ) -> Weights:
        if senders is not None and len(senders) != len(others):
            raise ValueError(f"got {len(senders)} senders for {len(others)} models")
        distances = [_distance(own, other) for other in others]
        moved = 0.0
        last = self._last
        if not self._recent and last is not None and _same_layout(last, own):
            moved = _distance(last, own)
        tau = self.radius(distances, moved)
        middle = self._majority(distances, senders)
        # Most of the last neighbours beyond tau: this node is the outlier (its own training
        # diverged, or honest models drifted). Trust the majority, as on the first merge, and
        # hold no far model against its sender.
        outlier = middle > tau
        if outlier:
            tau = middle
        radii: list[float] = []
        shaped = self._in_shape(own, others, distances, senders)
        names: Sequence[str | None] = senders if senders is not None else [None] * len(others)
        for name, d, in_shape in zip(names, distances, shaped, strict=True):
            if math.isfinite(d) and d > 0:
                self._recent.append(min(d, tau))
            # A model out of shape is left out of this merge (radius 0), unless the node is
            # the outlier and it is within the majority's radius: see "Shape" above.
            taken = in_shape or (outlier and d <= tau)
            if name is None:
                radii.append(tau if taken else 0.0)
                continue
            radii.append(tau * self.reach(name) if taken else 0.0)
            far = not d <= STANDING_FAR * tau or not in_shape  # NaN: far
            if d > 0 and not (outlier and far):
                self._judge(name, far=far)
        # Each model taken weighs 1/(taken + 1), the node's own included (a walker's token
        # 1/taken): a model left out is not counted, as if it had not come. Counted as the
        # node's own instead, it kept a node with Byzantine neighbours mostly on its own
        # training (3/5 of its weight with two of four left out), which drifts to its labels.
        count = sum(1 for t, d in zip(radii, distances, strict=True) if t > 0 and math.isfinite(d))
        share = 1.0 / (count + (1 if own_counts else 0)) if count else 0.0
        merged = clipped_step(own, others, tau=radii, share=share, distances=distances)
        self.tau = tau
        self._last = merged
        return merged

    def _in_shape(
        self,
        own: Weights,
        others: Sequence[Weights],
        distances: Sequence[float],
        senders: Sequence[str] | None,
    ) -> list[bool]:
        """For each model: whether its norm is within ``STANDING_NORM`` times the node's own
        and its cosine with the node's model at least ``ALIGN_MIN``. Alignment is not asked
        when most of this merge's models, filled up to ``OUTLIER_SENDERS`` with the latest
        from the last other senders, are unaligned: the node is then the odd one (it started
        from another initial model), as in the outlier rule. A model at a non-finite distance
        has no vote (it is not counted, as if it had not come)."""
        own_norm = _norm(own)
        norms = [_norm(other) for other in others]
        aligned = [
            _cosine(own_norm, n, d) >= ALIGN_MIN for n, d in zip(norms, distances, strict=True)
        ]
        near = [_norm_near(own_norm, n) for n in norms]
        shapes = list(zip(near, aligned, strict=True))  # (norm near, aligned) per model
        counted = [math.isfinite(d) for d in distances]
        votes = [v for v, c in zip(shapes, counted, strict=True) if c]
        if senders is not None:
            now = set(senders)
            older = [v for name, v in reversed(self._aligned.items()) if name not in now]
            votes += older[: max(0, OUTLIER_SENDERS - len(votes))]
            for name, v, c in zip(senders, shapes, counted, strict=True):
                if c:
                    self._aligned.pop(name, None)
                    self._aligned[name] = v
            while len(self._aligned) > OUTLIER_SENDERS:
                self._aligned.popitem(last=False)
        # Not asked only when two or more votes say most are off: one sender alone (a ring
        # node's only predecessor so far) never decides that the node is the odd one.
        few = len(votes) < 2
        norm_asked = few or 2 * sum(not n for n, _ in votes) <= len(votes)
        align_asked = few or 2 * sum(not a for _, a in votes) <= len(votes)
        return [(n or not norm_asked) and (a or not align_asked) for n, a in shapes]

    def _majority(self, distances: Sequence[float], senders: Sequence[str] | None) -> float:
        """The lower median of this merge's distances, filled up to ``OUTLIER_SENDERS`` with the
        latest distances from the last other senders that had earned standing when they sent
        them (so a stream of fresh identities is never a majority), or 0 with fewer than two.
        A non-finite distance, like a zero one, is left out: its model counts as the node's own.
        """
        earned = (
            [self.standing(name) > STANDING_START for name in senders]
            if senders is not None
            else [True] * len(distances)
        )
        pool = [
            d for d, ok in zip(distances, earned, strict=True) if ok and math.isfinite(d) and d > 0
        ]
        if senders is not None:
            now = set(senders)
            older = [
                d for name, (d, ok) in reversed(self._latest.items()) if ok and name not in now
            ]
            pool += older[: max(0, OUTLIER_SENDERS - len(distances))]
            for name, d, ok in zip(senders, distances, earned, strict=True):
                self._latest.pop(name, None)
                self._latest[name] = (d, ok and d > 0)
            while len(self._latest) > OUTLIER_SENDERS:
                self._latest.popitem(last=False)
        return sorted(pool)[(len(pool) - 1) // 2] if len(pool) >= 2 else 0.0

    def _judge(self, sender: str, *, far: bool) -> None:
        """Update ``sender``'s standing for a model near or far (used from its next model on)."""
        s = self._standing.pop(sender, STANDING_START)
        s = s / 2 if far else min(1.0, s + STANDING_RECOVERY)
        self._standing[sender] = s  # the most recently judged last, evicted last
        while len(self._standing) > self._memory:
            self._standing.popitem(last=False)


def clipped_step(
    own: Weights,
    others: Sequence[Weights],
    *,
    tau: float | Sequence[float],
    share: float,
    distances: Sequence[float] | None = None,
) -> Weights:
    """``own + share * sum_j clip_tau(others_j - own)``: the arithmetic of :class:`ClippedGossip`.

    ``tau`` is one radius for all, or one per model. ``distances`` (``_distance(own, other)``
    for each) are computed when not given. A difference whose norm is not finite adds nothing.
    """
    _check([own, *others], None)
    radii = [float(tau)] * len(others) if isinstance(tau, int | float) else list(tau)
    if len(radii) != len(others):
        raise ValueError(f"got {len(radii)} clipping radii for {len(others)} models")
    for t in radii:
        if t < 0 or not math.isfinite(t):
            raise ValueError(f"clipping radius must be finite and >= 0, got {t}")
    if distances is None:
        distances = [_distance(own, other) for other in others]
    scales = [
        0.0 if not math.isfinite(d) else 1.0 if d <= t else t / d
        for d, t in zip(distances, radii, strict=True)
    ]
    out: Weights = {}
    for name, first in own.items():
        base = np.asarray(first, dtype=np.float64)
        total = np.zeros(base.shape, dtype=np.float64)
        for other, scale in zip(others, scales, strict=True):
            if scale:
                total += scale * (np.asarray(other[name], dtype=np.float64) - base)
        out[name] = _cast(base + share * total, first.dtype)
    return out


def average(models: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
    """Coordinate-wise mean of the models; ``weights`` are ignored (FedAvg with equal weights).

    McMahan et al. 2017, "Communication-efficient learning of deep networks from decentralized
    data" (FedAvg), with every participant counted once as in gossip averaging.
    """
    _check(models, weights)
    return _linear(models, [1.0 / len(models)] * len(models))


def weighted(
    models: Sequence[Weights],
    weights: Sequence[float] | None = None,
    *,
    cap: float = WEIGHTED_CAP,
) -> Weights:
    """Weighted mean; ``weights`` are sample counts or model ages and are normalized to sum to 1.

    McMahan et al. 2017 (FedAvg) weight by local sample counts; gossip nodes weight by model
    age, the number of samples a model has been trained on.
    An age is whatever the sender claims, so each one after the first (the node's own) counts
    as at most ``cap`` times the first: a peer claiming 10**12 weighs as much as one that
    trained ``cap`` times more than this node, no more. A node of age 0 has nothing to compare
    claims with and takes the plain mean, as do no weights or weights that are all zero.
    Negative or non-finite weights raise ValueError.
    """
    _check(models, weights)
    _check_cap(cap)
    if weights is None:
        return average(models)
    ceiling = cap * weights[0]
    weights = [weights[0], *(min(w, ceiling) for w in weights[1:])]
    total = math.fsum(weights)
    if total == 0.0:
        return average(models)
    return _linear(models, [w / total for w in weights])


def median(models: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
    """Coordinate-wise median; ``weights`` are ignored.

    Yin et al. 2018, "Byzantine-robust distributed learning: towards optimal statistical rates".
    With an even number of models, the mean of the two middle values.
    """
    _check(models, weights)
    n = len(models)
    out: Weights = {}
    for name in models[0]:
        # A sort along the models axis is faster than np.median on strided data.
        ordered = np.sort(_stack(models, name), axis=0)
        middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out[name] = _cast(middle, models[0][name].dtype)
    return out


def trimmed_mean(
    models: Sequence[Weights], weights: Sequence[float] | None = None, *, f: float
) -> Weights:
    """Coordinate-wise mean after dropping the floor(f*n) largest and smallest values.

    Yin et al. 2018, "Byzantine-robust distributed learning: towards optimal statistical rates".
    ``0 <= f < 0.5``, so at least one value per coordinate remains; ``weights`` are ignored.
    """
    _check(models, weights)
    _check_fraction(f)
    n = len(models)
    # The epsilon keeps e.g. 0.29 * 100 = 28.999... from flooring to 28.
    cut = math.floor(f * n + 1e-9)
    out: Weights = {}
    for name in models[0]:
        ordered = np.sort(_stack(models, name), axis=0)
        out[name] = _cast(ordered[cut : n - cut].mean(axis=0), models[0][name].dtype)
    return out


def krum(models: Sequence[Weights], weights: Sequence[float] | None = None, *, f: int) -> Weights:
    """The model closest to its n-f-2 nearest neighbours, for up to ``f`` Byzantine peers.

    Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient
    descent". A model's score is the sum of squared distances to its n-f-2 nearest other models;
    the lowest score wins. Models tied for the lowest score are averaged, so the result does not
    depend on arrival order. Krum needs n > 2f+2; with fewer models this falls back to the
    coordinate-wise :func:`median`. ``weights`` are ignored.
    """
    return multi_krum(models, weights, f=f, m=1)


def multi_krum(
    models: Sequence[Weights], weights: Sequence[float] | None = None, *, f: int, m: int
) -> Weights:
    """Mean of the ``m`` models with the lowest Krum scores (m=1 is Krum).

    Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient
    descent" (Multi-Krum).
    Models tied with the m-th best score are all included. With n <= 2f+2 this falls back to
    the coordinate-wise :func:`median`. ``weights`` are ignored.
    """
    _check(models, weights)
    if f < 0:
        raise ValueError(f"krum needs f >= 0 Byzantine peers, got {f}")
    if m < 1:
        raise ValueError(f"multi-krum needs m >= 1 models to keep, got {m}")
    n = len(models)
    if n <= 2 * f + 2:
        return median(models)
    scores = _krum_scores(models, neighbours=n - f - 2)
    cutoff = np.sort(scores)[min(m, n) - 1]
    chosen = [models[i] for i in range(n) if scores[i] <= cutoff]
    if len(chosen) == 1:
        return {name: np.array(tensor, copy=True) for name, tensor in chosen[0].items()}
    return average(chosen)


def parse_merge(spec: str) -> Merge:
    """The merge rule a config string names; ValueError listing the choices for anything else.

    ``clipped``, ``clipped:F``, ``average``, ``weighted``, ``weighted:C``, ``median``,
    ``trimmed-mean:F``, ``krum:F``, ``multi-krum:F:M``. Each call builds a new rule, so every
    node that parses its config has its own ``clipped`` state.
    """
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "clipped":
        if not arg:
            return ClippedGossip()
        factor = _parse_number(spec, arg, float, "a factor F >= 1, e.g. clipped:3")
        _check_clipped_factor(factor)
        return ClippedGossip(factor)
    if name == "weighted" and arg:
        cap = _parse_number(spec, arg, float, "a cap C >= 1, e.g. weighted:4")
        _check_cap(cap)
        return MergeRule(f"weighted:{cap:g}", partial(weighted, cap=cap))
    simple: dict[str, RuleFunction] = {"average": average, "weighted": weighted, "median": median}
    if name in simple:
        if arg:
            raise ValueError(f"merge rule {name!r} takes no parameter, got {spec!r}")
        return MergeRule(name, simple[name])
    if name == "trimmed-mean":
        f = _parse_number(spec, arg, float, "a fraction 0 <= F < 0.5, e.g. trimmed-mean:0.2")
        _check_fraction(f)
        return MergeRule(f"trimmed-mean:{f:g}", partial(trimmed_mean, f=f))
    if name == "krum":
        f_int = _parse_number(spec, arg, int, "an integer number of Byzantine peers, e.g. krum:1")
        if f_int < 0:
            raise ValueError(f"krum needs F >= 0 Byzantine peers, got {spec!r}")
        return MergeRule(f"krum:{f_int}", partial(krum, f=f_int))
    if name == "multi-krum":
        f_arg, _, m_arg = arg.partition(":")
        hint = "integers F >= 0 and M >= 1, e.g. multi-krum:1:3"
        f_int = _parse_number(spec, f_arg, int, hint)
        m_int = _parse_number(spec, m_arg, int, hint)
        if f_int < 0 or m_int < 1:
            raise ValueError(f"merge rule {spec!r} needs {hint}")
        return MergeRule(f"multi-krum:{f_int}:{m_int}", partial(multi_krum, f=f_int, m=m_int))
    raise ValueError(f"unknown merge rule {spec!r}; choose one of: {', '.join(CHOICES)}")


def _parse_number(spec: str, text: str, kind: type[_Number], hint: str) -> _Number:
    try:
        value = kind(text.strip())
    except ValueError:
        raise ValueError(f"merge rule {spec!r} needs {hint}") from None
    if not math.isfinite(value):
        raise ValueError(f"merge rule {spec!r} needs {hint}")
    return value


def _check_clipped_factor(factor: float) -> None:
    # Below 1 even the median honest neighbour would be clipped, every merge.
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"clipped needs a factor F >= 1, got {factor}")


def _check_cap(cap: float) -> None:
    # Below 1 a sender that trained as much as this node would count for less than it.
    if not (math.isfinite(cap) and cap >= 1.0):
        raise ValueError(f"weighted needs a cap C >= 1, got {cap}")


def _check_fraction(f: float) -> None:
    if not 0.0 <= f < 0.5:
        raise ValueError(f"trimmed-mean needs a fraction 0 <= F < 0.5, got {f}")


def _check(models: Sequence[Weights], weights: Sequence[float] | None) -> None:
    """Raise ValueError unless the models share names, shapes and dtypes, and weights are sane."""
    if not models:
        raise ValueError("cannot merge an empty list of models")
    reference = models[0]
    for index, model in enumerate(models[1:], start=1):
        missing = reference.keys() - model.keys()
        extra = model.keys() - reference.keys()
        if missing or extra:
            odd = sorted(missing or extra)[0]
            where = "lacks" if missing else "has an extra"
            raise ValueError(f"model {index} {where} tensor {odd!r}")
        for name, tensor in model.items():
            expected = reference[name]
            if tensor.shape != expected.shape:
                raise ValueError(
                    f"tensor {name!r} of model {index} has shape {tensor.shape}, "
                    f"expected {expected.shape}"
                )
            if tensor.dtype != expected.dtype:
                raise ValueError(
                    f"tensor {name!r} of model {index} has dtype {tensor.dtype}, "
                    f"expected {expected.dtype}"
                )
    if weights is None:
        return
    if len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"merge weights must be finite and >= 0, got {w}")


def _same_layout(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def _stack(models: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([np.asarray(model[name], dtype=np.float64) for model in models])


def _linear(models: Sequence[Weights], coefficients: Sequence[float]) -> Weights:
    """Sum of coefficient * model, one tensor at a time so memory stays at one float64 copy."""
    out: Weights = {}
    for name, first in models[0].items():
        total = np.zeros(first.shape, dtype=np.float64)
        for model, c in zip(models, coefficients, strict=True):
            if c:
                total += c * np.asarray(model[name], dtype=np.float64)
        out[name] = _cast(total, first.dtype)
    return out


def _norm(weights: Weights) -> float:
    """L2 norm over the floating-point tensors; inf when it overflows, nan for NaN."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for w in weights.values():
            if np.issubdtype(w.dtype, np.inexact):
                flat = np.asarray(w, dtype=np.float64).ravel()
                total += float(np.dot(flat, flat))
    return math.sqrt(total) if math.isfinite(total) else total


def _norm_near(own_norm: float, other_norm: float) -> bool:
    """Whether ``other_norm`` is within ``STANDING_NORM`` times ``own_norm`` either way
    (always, when the node's own norm is zero or not finite: it then says nothing)."""
    if not (math.isfinite(own_norm) and own_norm > 0):
        return True
    return own_norm / STANDING_NORM <= other_norm <= own_norm * STANDING_NORM


def _cosine(own_norm: float, other_norm: float, distance: float) -> float:
    """The cosine of two models from their norms and distance (law of cosines); 1 when that
    says nothing (a zero or non-finite norm or distance)."""
    values = (own_norm, other_norm, distance)
    if not all(math.isfinite(v) for v in values) or own_norm == 0 or other_norm == 0:
        return 1.0
    return (own_norm**2 + other_norm**2 - distance**2) / (2 * own_norm * other_norm)


def _distance(a: Weights, b: Weights) -> float:
    """L2 distance over the floating-point tensors; inf when it overflows, nan for NaN."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # a hostile model may overflow: inf
        for name in sorted(a):
            if not np.issubdtype(a[name].dtype, np.inexact):
                continue
            diff = np.asarray(b[name], dtype=np.float64) - np.asarray(a[name], dtype=np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total) if math.isfinite(total) else total


def _krum_scores(models: Sequence[Weights], neighbours: int) -> np.ndarray:
    """Sum of squared distances from each model to its ``neighbours`` nearest other models."""
    n = len(models)
    distances = np.zeros((n, n), dtype=np.float64)
    # Sorted names and one freshly allocated difference per pair make every distance bit-exact
    # whatever the order of the models, so ties stay ties. Direct differences rather than the
    # Gram identity: near-identical models with large norms would lose their distances to
    # cancellation.
    for name in sorted(models[0]):
        stacked = [np.asarray(model[name], dtype=np.float64).ravel() for model in models]
        for i in range(n):
            for j in range(i + 1, n):
                diff = stacked[i] - stacked[j]
                d = float(np.dot(diff, diff))
                distances[i, j] += d
                distances[j, i] += d
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores[i] = others[:neighbours].sum()
    return scores


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to ``dtype``, rounding and clipping for integer and bool."""
    if np.issubdtype(dtype, np.inexact):
        return np.asarray(values, dtype=dtype)
    if dtype == np.bool_:
        return np.asarray(np.rint(values), dtype=np.bool_)
    info = np.iinfo(dtype)
    return np.asarray(np.clip(np.rint(values), info.min, info.max), dtype=dtype)
