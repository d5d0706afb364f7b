"""Fault plans: who is faulty, when churn strikes, and the straggler and Byzantine learners."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping

import numpy as np
import pytest

from p2pfl.learning.learner import EvalResult, FitResult, Learner
from p2pfl.protocol.model import decode_model, encode_model, layout
from p2pfl.simulation.attacks import ByzantineLearner, poison
from p2pfl.simulation.faults import (
    Byzantine,
    Crash,
    FaultPlan,
    StragglerLearner,
    choose_nodes,
    churn_events,
)

IDS = [f"node-{i:03d}" for i in range(100)]


class LinearLearner:
    """A least-squares linear model trained by gradient descent in numpy: a real `Learner`.

    It also carries a float16 tensor and an int64 step counter, to check that wrappers keep
    every dtype. `pause` makes each fit take at least that long.
    """

    def __init__(self, seed: int = 0, pause: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(64, 5))
        self.y = self.x @ np.arange(1.0, 6.0) + 0.5
        self.w = rng.normal(size=5).astype(np.float32)
        self.b = np.zeros(1, dtype=np.float16)
        self.steps = np.zeros((), dtype=np.int64)
        self.pause = pause
        self.last_fit: FitResult | None = None

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy(), "b": self.b.copy(), "steps": self.steps.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.w, self.b, self.steps = (np.array(weights[k]) for k in ("w", "b", "steps"))

    def _loss(self) -> float:
        return float(np.mean((self.x @ self.w + self.b - self.y) ** 2))

    def fit(self) -> FitResult:
        started = time.perf_counter()
        for _ in range(10):
            err = self.x @ self.w + self.b.astype(np.float32) - self.y
            self.w = (self.w - 0.05 * 2 * self.x.T @ err / len(err)).astype(np.float32)
            self.b = (self.b - 0.05 * 2 * err.mean()).astype(np.float16)
            self.steps = self.steps + 1
        time.sleep(self.pause)
        self.last_fit = FitResult(self._loss(), 10 * len(self.x), time.perf_counter() - started)
        return self.last_fit

    def evaluate(self) -> EvalResult:
        return EvalResult(self._loss(), 0.0, len(self.x), np.zeros((1, 1), dtype=np.int64))


def test_choose_nodes_is_deterministic_and_right_sized() -> None:
    chosen = choose_nodes(IDS, fraction=0.1, seed=3, salt="byz")
    assert len(chosen) == 10 and chosen == sorted(chosen) and set(chosen) <= set(IDS)
    assert choose_nodes(list(reversed(IDS)), fraction=0.1, seed=3, salt="byz") == chosen
    assert choose_nodes(IDS, fraction=0.1, seed=4, salt="byz") != chosen
    assert choose_nodes(IDS, fraction=0.1, seed=3, salt="slow") != chosen
    assert len(choose_nodes(IDS[:16], fraction=0.1, seed=0, salt="x")) == 2  # 1.6 rounds to 2
    assert choose_nodes(IDS, fraction=0.0, seed=3, salt="byz") == []
    # a count overrides the fraction, and a larger one only adds nodes
    three = choose_nodes(IDS, fraction=0.5, count=3, seed=3, salt="byz")
    assert len(three) == 3 and set(three) <= set(chosen)
    spec = Byzantine(fraction=0.5, count=3)
    assert choose_nodes(IDS, spec, seed=3, salt="byz") == three
    with pytest.raises(ValueError, match="cannot choose"):
        choose_nodes(IDS[:4], count=5, seed=0, salt="x")


def test_churn_events_are_deterministic_and_respect_downtime() -> None:
    events = churn_events(IDS, rounds=50, rate=0.05, downtime=5, seed=1)
    assert events == churn_events(list(reversed(IDS)), rounds=50, rate=0.05, downtime=5, seed=1)
    assert events != churn_events(IDS, rounds=50, rate=0.05, downtime=5, seed=2)
    assert events == sorted(events, key=lambda c: (c.at_round, str(c.node)))
    assert all(1 <= c.at_round < 50 and c.restart_after_rounds == 5 for c in events)
    # Each node is up about 49 - 5 * crashes rounds; about 5% of those see a crash.
    assert 100 < len(events) < 300
    for node in IDS:
        rounds = [c.at_round for c in events if c.node == node]
        assert all(b - a > 5 for a, b in itertools.pairwise(rounds))
    assert churn_events(IDS, rounds=50, rate=0.0, downtime=5, seed=1) == []
    always = churn_events(["x"], rounds=12, rate=1.0, downtime=3, seed=0)
    assert [c.at_round for c in always] == [1, 5, 9]


def test_fault_plan_resolves_nodes_and_merges_churn() -> None:
    plan = FaultPlan.model_validate(
        {
            "crashes": [{"node": 2, "at_round": 4}, {"node": "node-001", "at_round": 3}],
            "churn": 0.1,
            "stragglers": {"count": 2, "slowdown": 1.0},
            "byzantine": {"count": 3, "behaviour": "sign-flip"},
        }
    )
    ids = IDS[:8]
    events = plan.crash_events(ids, rounds=10, seed=0)
    assert Crash(node="node-002", at_round=4) in events
    assert Crash(node="node-001", at_round=3) in events
    assert events == sorted(events, key=lambda c: (c.at_round, str(c.node)))
    assert len(events) > 2  # churn added some
    assert plan.straggler_ids(ids, seed=0) == []  # slowdown 1: nobody is slower
    assert plan.byzantine_ids(ids, seed=0) == choose_nodes(
        ids, plan.byzantine, seed=0, salt="byzantine"
    )
    with pytest.raises(ValueError, match="out of range"):
        FaultPlan(crashes=(Crash(node=8, at_round=1),)).crash_events(ids, rounds=10, seed=0)


def test_sign_flip_and_scaled_poison_keep_names_shapes_and_dtypes() -> None:
    honest = LinearLearner(seed=1)
    honest.fit()
    w = honest.get_weights()
    flip = ByzantineLearner(LinearLearner(seed=1), "sign-flip")
    flip.fit()
    flipped = flip.get_weights()
    assert layout(flipped) == layout(w)
    np.testing.assert_array_equal(flipped["w"], -w["w"])
    np.testing.assert_array_equal(flipped["b"], -w["b"])
    np.testing.assert_array_equal(flipped["steps"], w["steps"])  # counters are not poisoned
    scaled = poison(w, "scaled", scale=3.0, rng=np.random.default_rng(0))
    assert layout(scaled) == layout(w)
    np.testing.assert_allclose(scaled["w"], 3.0 * w["w"], rtol=1e-6)
    np.testing.assert_allclose(scaled["b"], 3.0 * w["b"].astype(np.float32), rtol=1e-3)


def test_random_poison_is_finite_noise_with_the_tensor_spread() -> None:
    rng = np.random.default_rng(0)
    w: dict[str, np.ndarray] = {
        "big": rng.normal(0, 2.0, size=(200, 50)).astype(np.float32),
        "zero": np.zeros(3),
    }
    noise = poison(w, "random", rng=np.random.default_rng(1))
    assert layout(noise) == layout(w)
    assert all(np.isfinite(a).all() for a in noise.values())
    assert noise["big"].std() == pytest.approx(w["big"].std(), rel=0.05)
    assert abs(float(np.corrcoef(noise["big"].ravel(), w["big"].ravel())[0, 1])) < 0.05
    assert noise["zero"].std() > 0.5  # a constant tensor still gets noise
    again = poison(w, "random", rng=np.random.default_rng(1))
    np.testing.assert_array_equal(again["big"], noise["big"])


def test_poison_stays_finite_whatever_the_honest_weights() -> None:
    w: dict[str, np.ndarray] = {
        "huge": np.array([6e4, -6e4], dtype=np.float16),
        "nan": np.array([np.nan, np.inf, 1.0], dtype=np.float32),
    }
    for behaviour in ("random", "scaled", "sign-flip"):
        out = poison(w, behaviour, scale=10.0, rng=np.random.default_rng(0))
        assert all(np.isfinite(a).all() and a.dtype == w[k].dtype for k, a in out.items())


def test_a_poisoned_model_passes_protocol_validation() -> None:
    learner = ByzantineLearner(LinearLearner(), "scaled", scale=1e6)
    weights = learner.get_weights()
    for codec in ("raw", "fp16"):
        data = encode_model(weights, net="n", src="x", seq=1, round=1, age=1.0, codec=codec)
        _, model = decode_model(bytes(data), expected=layout(weights), net="n")
        assert set(model.weights) == set(weights)


def test_byzantine_learner_trains_honestly_underneath() -> None:
    inner = LinearLearner()
    byz = ByzantineLearner(inner, "sign-flip", 10.0, 0)
    before = byz.evaluate().loss
    for _ in range(5):
        byz.fit()
    assert byz.evaluate().loss < before / 2
    np.testing.assert_array_equal(byz.honest_weights()["w"], inner.w)
    np.testing.assert_array_equal(byz.get_weights()["w"], -inner.w)
    byz.set_weights(
        {"w": np.ones(5, np.float32), "b": np.ones(1, np.float16), "steps": inner.steps}
    )
    np.testing.assert_array_equal(inner.w, np.ones(5, np.float32))
    assert byz.num_samples == 64
    assert isinstance(byz, Learner)


def test_straggler_takes_about_slowdown_times_longer() -> None:
    inner = LinearLearner(pause=0.02)
    slow = StragglerLearner(inner, slowdown=4.0)
    started = time.perf_counter()
    result = slow.fit()
    took = time.perf_counter() - started
    assert inner.last_fit is not None
    alone = inner.last_fit.seconds  # as long as a loaded machine made it: the yardstick
    # It sleeps (slowdown - 1) times the inner fit, and reports the whole, measured inside `took`.
    assert 4.0 * alone <= result.seconds <= took < 4.0 * alone + 1.0
    assert result.samples == 640
    assert isinstance(slow, Learner)
    assert slow.pause == 0.02  # attributes beyond the protocol come from the inner learner
    np.testing.assert_array_equal(slow.get_weights()["w"], inner.w)


def test_wrappers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="slowdown"):
        StragglerLearner(LinearLearner(), slowdown=0.5)
    with pytest.raises(ValueError, match="behaviour"):
        ByzantineLearner(LinearLearner(), "nice")  # type: ignore[arg-type]


def test_pauses_and_the_eligible_fraction_are_deterministic() -> None:
    from p2pfl.simulation.faults import Pause

    ids = [f"n{i:02d}" for i in range(10)]
    plan = FaultPlan(pauses=(Pause(node=3, from_round=2, to_round=5),))
    assert [plan.paused("n03", r, ids, 0) for r in range(1, 7)] == [
        None, "scripted", "scripted", "scripted", None, None
    ]  # fmt: skip
    assert plan.paused("n04", 3, ids, 0) is None
    half = FaultPlan(eligible_fraction=0.5)
    for r in range(1, 6):
        out = [n for n in ids if half.paused(n, r, ids, seed=7) is not None]
        assert len(out) == 5 and all(half.paused(n, r, ids, 7) == "not-drawn" for n in out)
        assert out == [n for n in ids if half.paused(n, r, ids, seed=7)]  # same seed, same draw
    draws = {tuple(n for n in ids if half.paused(n, r, ids, 7)) for r in range(1, 6)}
    assert len(draws) > 1  # a new draw each round
