"""Byzantine behaviours: what a Byzantine peer sends in place of an honest model.

Model poisoning (`poison`, `alie`, `ipm`) replaces the model a Byzantine node hands out;
`label-flip` trains honestly on poisoned data (`flip_labels`); `free-rider` never trains and
re-sends a stale model. `ByzantineLearner` wraps a learner with one of them, so the real `Node`
sends and merges the result unchanged.

`alie` and `ipm` need the honest models. The simulator's attackers are omniscient, as in the
papers' threat model: honest nodes post the model they trained at each local step on a shared
`HonestModels` board, and an attacker reads the models of its own step from it. In sync mode it
waits until every running honest node has posted that step, so a run stays a function of its
seed.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

from p2pfl.learning.datasets import Dataset
from p2pfl.learning.learner import FitResult, Learner
from p2pfl.simulation.faults import BEHAVIOURS, Behaviour, DelegatingLearner

__all__ = [
    "ByzantineLearner",
    "HonestModels",
    "WatchedLearner",
    "alie",
    "alie_z",
    "flip_labels",
    "ipm",
    "poison",
]

Weights = dict[str, np.ndarray]

_FP16_MAX = float(np.finfo(np.float16).max)


def _finite(bad: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`bad` as `dtype`, every value finite and within fp16's range.

    So the model passes a receiver's validation, survives the fp16 codec on the way out, and
    reaches the receiver's merge rule.
    """
    top = min(float(np.finfo(dtype).max), _FP16_MAX)
    return np.clip(np.nan_to_num(bad, nan=0.0, posinf=top, neginf=-top), -top, top).astype(dtype)


def poison(
    weights: Mapping[str, np.ndarray],
    behaviour: Behaviour,
    *,
    scale: float = 10.0,
    rng: np.random.Generator,
) -> Weights:
    """The poisoned copy of `weights` a Byzantine node sends; same names, shapes and dtypes.

    `sign-flip`: -w. `scaled`: scale * w. `random`: gaussian noise with each tensor's standard
    deviation (1 where it has none). Only floating-point tensors are poisoned (integer ones,
    e.g. counters, pass unchanged), and every value is finite, clipped to +-65504 (fp16's
    range), so the model passes a receiver's validation and reaches its merge rule.
    """
    out: Weights = {}
    for name, w in weights.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[name] = w.copy()
            continue
        honest = w.astype(np.float64)
        if behaviour == "sign-flip":
            bad = -honest
        elif behaviour == "scaled":
            bad = scale * honest
        elif behaviour == "random":
            finite = honest[np.isfinite(honest)]
            std = float(finite.std()) if finite.size else 0.0
            bad = rng.normal(0.0, std if std > 0 and math.isfinite(std) else 1.0, w.shape)
        else:
            raise ValueError(f"{behaviour!r} is not a model-poisoning behaviour")
        out[name] = _finite(bad, w.dtype)
    return out


def alie_z(nodes: int, byzantine: int) -> float:
    """ALIE's z_max for `byzantine` attackers among `nodes` participants.

    Baruch, Baruch and Goldberg 2019, "A little is enough: circumventing defenses for
    distributed learning" (NeurIPS), section 4: the attackers need s = floor(n/2 + 1) - m
    honest workers on their side; z_max = Phi^-1((n - s) / n), with Phi the standard normal
    CDF, is the largest shift that keeps them within reach of that many. Never below 0.
    """
    if nodes < 1 or not 0 <= byzantine <= nodes:
        raise ValueError(f"need 0 <= byzantine <= nodes and nodes >= 1, got {byzantine}, {nodes}")
    s = math.floor(nodes / 2 + 1) - byzantine
    p = min(max((nodes - s) / nodes, 1e-9), 1 - 1e-9)
    return max(0.0, NormalDist().inv_cdf(p))


def _stacked(models: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(m[name], dtype=np.float64) for m in models])


def alie(
    honest: Sequence[Mapping[str, np.ndarray]], z: float, *, like: Mapping[str, np.ndarray]
) -> Weights:
    """A little is enough: mean - z * std of the honest models, coordinate by coordinate.

    Baruch, Baruch and Goldberg 2019, "A little is enough: circumventing defenses for
    distributed learning" (NeurIPS): a shift within the honest spread passes robust rules
    (median, trimmed mean, Krum), yet pulls every coordinate the same way, round after round.
    `like` is the attacker's own model: it gives the names, shapes and dtypes, and the values
    of non-float tensors. With no honest model, `like` stands for them.
    """

    def shifted(values: np.ndarray) -> np.ndarray:
        # the sample standard deviation, as the papers' code computes it (torch.std)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
        return values.mean(axis=0) - z * std

    return _from_honest(honest, like, shifted)


def ipm(
    honest: Sequence[Mapping[str, np.ndarray]],
    epsilon: float,
    *,
    like: Mapping[str, np.ndarray],
) -> Weights:
    """Inner-product manipulation: -epsilon times the mean of the honest models.

    Xie, Koyejo and Gupta 2020, "Fall of empires: breaking Byzantine-tolerant SGD by inner
    product manipulation" (UAI 2019, PMLR 115): the sent vector has a negative inner product
    with the honest mean, so the merged model moves against it; a small epsilon (0.1 in the
    paper) keeps it close enough to pass distance-based rules. `like` as for `alie`.
    """
    return _from_honest(honest, like, lambda values: -epsilon * values.mean(axis=0))


def _from_honest(
    honest: Sequence[Mapping[str, np.ndarray]],
    like: Mapping[str, np.ndarray],
    poisoned: Callable[[np.ndarray], np.ndarray],
) -> Weights:
    """`poisoned(stack of the honest models' values)` for each float tensor of `like`; its
    other tensors copied. With no honest model, `like` stands for them."""
    models = list(honest) or [like]
    out: Weights = {}
    for name, w in like.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[name] = np.array(w, copy=True)
            continue
        out[name] = _finite(poisoned(_stacked(models, name)), w.dtype)
    return out


def flip_labels(dataset: Dataset) -> Dataset:
    """The same data with every training label y replaced by C - 1 - y (C classes).

    Label flipping, the data poisoning of Tolpegin et al. 2020, "Data poisoning attacks against
    federated learning systems" (ESORICS); y -> C - 1 - y as in Karimireddy, He and Jaggi 2021,
    "Learning from history for Byzantine robust optimization". The test labels stay, so the
    node's own evaluation shows what it learned.
    """
    flipped = (dataset.n_classes - 1 - dataset.y_train).astype(dataset.y_train.dtype)
    return dataclasses.replace(dataset, y_train=flipped)


class HonestModels:
    """The board omniscient attackers read: each honest node's model after each local step.

    Honest nodes `post` after every fit (see `WatchedLearner`); an attacker asks for the models
    of its own step k. With `wait` (sync mode), it waits up to `timeout` seconds until every
    running honest node has posted step k; each node then contributes its step-k model (a
    restarted or lagging node its nearest one). Safe to use from any thread. Steps no attacker
    can still ask for are dropped, so memory stays at a few models per node.
    """

    def __init__(self, *, wait: bool, timeout: float) -> None:
        self.wait = wait
        self.timeout = timeout
        self._cond = threading.Condition()
        self._posts: dict[str, dict[int, Weights]] = {}
        self._steps: dict[str, int] = {}
        self._running: set[str] = set()
        self._asked: dict[str, int] = {}  # attacker -> the step it last asked for

    def join(self, node_id: str, *, attacker: bool = False) -> None:
        """A node (re)started; an honest one is waited for from now on."""
        with self._cond:
            if attacker:
                self._asked.setdefault(node_id, 0)
            else:
                self._running.add(node_id)

    def leave(self, node_id: str) -> None:
        """A node stopped (finished or crashed): nobody waits for it; its posts stay."""
        with self._cond:
            self._running.discard(node_id)
            self._asked.pop(node_id, None)
            self._cond.notify_all()

    def post(self, node_id: str, weights: Weights) -> None:
        """An honest node's model after its next local step."""
        with self._cond:
            step = self._steps.get(node_id, 0) + 1
            self._steps[node_id] = step
            self._posts.setdefault(node_id, {})[step] = weights
            self._prune()
            self._cond.notify_all()

    def models(self, step: int, *, attacker: str) -> list[Weights]:
        """Each honest node's model of local step `step`, in node id order (none at step 0)."""
        with self._cond:
            self._asked[attacker] = step
            if self.wait and step > 0:
                self._cond.wait_for(
                    lambda: all(self._steps.get(n, 0) >= step for n in self._running),
                    self.timeout,
                )
            out = [self._nearest(self._posts[n], step) for n in sorted(self._posts)]
            self._prune()
            return [m for m in out if m is not None]

    @staticmethod
    def _nearest(posts: Mapping[int, Weights], step: int) -> Weights | None:
        if step <= 0 or not posts:
            return None
        later = [k for k in posts if k >= step]
        return posts[min(later) if later else max(posts)]

    def _prune(self) -> None:
        floor = min(self._asked.values(), default=0)
        for posts in self._posts.values():
            latest = max(posts)
            for k in [k for k in posts if k < floor and k != latest]:
                del posts[k]


class WatchedLearner(DelegatingLearner):
    """An honest learner that posts its model on a `HonestModels` board after every fit."""

    def __init__(self, inner: Learner, board: HonestModels, node_id: str) -> None:
        super().__init__(inner)
        self.board = board
        self.node_id = node_id

    def fit(self) -> FitResult:
        """Train, then show the trained model to the attackers."""
        result = self.inner.fit()
        self.board.post(self.node_id, self.inner.get_weights())
        return result


class ByzantineLearner(DelegatingLearner):
    """Wraps a learner so that the model it hands out (and so sends) is a Byzantine one.

    `scaled`, `sign-flip`, `random` (see `poison`), `alie` and `ipm` train honestly and poison
    what `get_weights` returns; `label-flip` hands out what the inner learner trained (build
    that on `flip_labels(dataset)`); `free-rider` never trains and always hands out the first
    model it had, claiming the samples of an honest step (plain free-riding: Fraboni et al.
    2021, "Free-rider attacks on model aggregation in federated learning", AISTATS).
    Evaluation and `set_weights` stay honest; `honest_weights` returns the inner learner's
    weights. The node also merges what it hands out into its own model, as a real attacker's
    code would. `alie` and `ipm` read the honest models from `honest` (without a board, the
    attacker's own model stands for them).
    """

    def __init__(
        self,
        inner: Learner,
        behaviour: Behaviour,
        scale: float = 10.0,
        seed: int = 0,
        *,
        z: float = 1.0,
        epsilon: float = 0.1,
        honest: HonestModels | None = None,
        node_id: str = "",
    ) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown Byzantine behaviour {behaviour!r}")
        super().__init__(inner)
        self.behaviour: Behaviour = behaviour
        self.scale = scale
        self.z = z
        self.epsilon = epsilon
        self.honest = honest
        self.node_id = node_id
        self._rng = np.random.default_rng(seed)
        self._steps = 0
        self._stale: Weights | None = None
        self._stale_loss: float | None = None

    def get_weights(self) -> Weights:
        """What this node sends: the poisoned, stale or label-flipped model."""
        if self.behaviour == "free-rider":
            if self._stale is None:
                self._stale = self.inner.get_weights()
            return {name: w.copy() for name, w in self._stale.items()}
        own = self.inner.get_weights()
        if self.behaviour == "label-flip":
            return own
        if self.behaviour in ("alie", "ipm"):
            models: Iterable[Weights] = ()
            if self.honest is not None:
                models = self.honest.models(self._steps, attacker=self.node_id)
            if self.behaviour == "alie":
                return alie(list(models), self.z, like=own)
            return ipm(list(models), self.epsilon, like=own)
        return poison(own, self.behaviour, scale=self.scale, rng=self._rng)

    def honest_weights(self) -> Weights:
        """The inner learner's weights, unpoisoned."""
        return self.inner.get_weights()

    def fit(self) -> FitResult:
        """Train the inner learner honestly; a free rider only claims to have trained."""
        self._steps += 1
        if self.behaviour != "free-rider":
            return self.inner.fit()
        if self._stale is None:
            self._stale = self.inner.get_weights()
        if self._stale_loss is None:
            self._stale_loss = self.inner.evaluate().loss  # still the stale model: nothing merged
        # It claims the samples an honest step would have seen, to weigh as much in a merge.
        epochs = getattr(self.inner, "local_epochs", 1)
        return FitResult(self._stale_loss, self.inner.num_samples * int(epochs), 0.0)
