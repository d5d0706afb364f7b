"""Byzantine behaviours of the attack bench: what each one sends, and the board they read."""

from __future__ import annotations

import threading
import time
from statistics import NormalDist

import numpy as np
import pytest

from p2pfl.learning.datasets import Dataset
from p2pfl.learning.learner import Learner
from p2pfl.protocol.model import decode_model, encode_model, layout
from p2pfl.simulation.attacks import (
    ByzantineLearner,
    HonestModels,
    WatchedLearner,
    alie,
    alie_z,
    flip_labels,
    ipm,
)
from p2pfl.simulation.faults import BEHAVIOURS
from tests.test_sim_faults import LinearLearner

Weights = dict[str, np.ndarray]


def honest_models(k: int = 6, seed: int = 0) -> list[Weights]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(4, 3))
    return [
        {
            "w": (centre + rng.normal(0, 0.3, size=(4, 3))).astype(np.float32),
            "steps": np.array(7 + i, dtype=np.int64),
        }
        for i in range(k)
    ]


def test_alie_z_is_baruch_et_al_z_max() -> None:
    # n = 16, m = 4: s = floor(16/2 + 1) - 4 = 5, z_max = Phi^-1((16 - 5) / 16)
    assert alie_z(16, 4) == pytest.approx(NormalDist().inv_cdf(11 / 16))
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    assert alie_z(16, 2) < alie_z(16, 4) < alie_z(16, 6)  # more attackers may shift further
    assert alie_z(4, 0) == 0.0  # never negative
    assert np.isfinite(alie_z(10, 10))
    with pytest.raises(ValueError):
        alie_z(4, 5)


def test_alie_sends_mean_minus_z_std_within_the_honest_spread() -> None:
    honest = honest_models()
    own = {"w": np.zeros((4, 3), np.float32), "steps": np.array(3, dtype=np.int64)}
    z = 0.5
    sent = alie(honest, z, like=own)
    assert layout(sent) == layout(own)
    stack = np.stack([m["w"].astype(np.float64) for m in honest])
    mean, std = stack.mean(axis=0), stack.std(axis=0, ddof=1)
    np.testing.assert_allclose(sent["w"], mean - z * std, rtol=1e-5, atol=1e-6)
    # every coordinate within z standard deviations of the honest mean, on the low side
    assert np.all(np.abs(sent["w"] - mean) <= z * std + 1e-5)
    assert np.all(sent["w"] <= mean + 1e-6)
    assert sent["steps"] == own["steps"]  # counters are the attacker's own
    # no honest model to read: its own model stands for them (std 0: it sends its own)
    np.testing.assert_array_equal(alie([], z, like=own)["w"], own["w"])


def test_ipm_is_negatively_aligned_with_the_honest_mean() -> None:
    honest = honest_models()
    own = {"w": np.ones((4, 3), np.float32), "steps": np.array(3, dtype=np.int64)}
    sent = ipm(honest, 0.1, like=own)
    mean = np.mean([m["w"].astype(np.float64) for m in honest], axis=0)
    np.testing.assert_allclose(sent["w"], -0.1 * mean, rtol=1e-5, atol=1e-7)
    assert float(np.dot(sent["w"].ravel(), mean.ravel())) < 0
    assert sent["steps"] == own["steps"] and sent["w"].dtype == np.float32


def test_model_attacks_stay_finite_and_pass_protocol_validation() -> None:
    huge = [{"w": np.full(3, 6e4, np.float32), "steps": np.array(1)} for _ in range(2)]
    huge.append({"w": np.full(3, -6e4, np.float32), "steps": np.array(1)})
    own = huge[0]
    for sent in (alie(huge, 100.0, like=own), ipm(huge, 1e3, like=own)):
        assert np.isfinite(sent["w"]).all() and np.abs(sent["w"]).max() <= 65504
        data = encode_model(sent, net="n", src="x", seq=1, round=1, age=1.0, codec="fp16")
        decode_model(bytes(data), expected=layout(own), net="n")


def test_free_rider_never_trains_and_resends_its_first_model() -> None:
    inner = LinearLearner(seed=2)
    first = inner.get_weights()
    rider = ByzantineLearner(inner, "free-rider")
    sent = []
    for _ in range(4):
        result = rider.fit()
        assert result.samples == inner.num_samples and result.seconds == 0.0
        sent.append(rider.get_weights())
        # it still merges what peers send: that changes its own model, not what it sends
        rider.set_weights({**first, "w": first["w"] + 1})
    assert inner.last_fit is None  # the inner learner never trained
    for weights in sent:
        for name in first:
            np.testing.assert_array_equal(weights[name], first[name])
    assert isinstance(rider, Learner)


def test_label_flip_permutes_the_training_labels_only() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=200)
    data = Dataset("toy", rng.normal(size=(200, 4)).astype(np.float32), y,
                   rng.normal(size=(50, 4)).astype(np.float32), y[:50].copy(), 10)  # fmt: skip
    flipped = flip_labels(data)
    np.testing.assert_array_equal(flipped.y_train, 9 - y)
    assert flipped.y_train.dtype == y.dtype and not flipped.y_train.flags.writeable
    # a permutation of the classes: no label keeps its class, none is lost
    mapping = {int(a): int(b) for a, b in zip(y, flipped.y_train, strict=True)}
    assert sorted(mapping.values()) == sorted(mapping) and all(a != b for a, b in mapping.items())
    np.testing.assert_array_equal(flipped.x_train, data.x_train)
    np.testing.assert_array_equal(flipped.y_test, data.y_test)  # evaluated on true labels
    np.testing.assert_array_equal(data.y_train, y)  # the shared dataset is untouched


def test_label_flip_learner_sends_what_it_trained() -> None:
    inner = LinearLearner(seed=3)
    flipper = ByzantineLearner(inner, "label-flip")
    flipper.fit()
    np.testing.assert_array_equal(flipper.get_weights()["w"], inner.w)


def test_attackers_read_every_honest_model_of_their_own_step() -> None:
    board = HonestModels(wait=True, timeout=10.0)
    honest = {f"h{i}": LinearLearner(seed=i) for i in range(3)}
    watched = {n: WatchedLearner(learner, board, n) for n, learner in honest.items()}
    for n in watched:
        board.join(n)
    board.join("bad", attacker=True)
    attacker = ByzantineLearner(LinearLearner(seed=9), "ipm", epsilon=0.5, honest=board,
                                node_id="bad")  # fmt: skip
    attacker.fit()  # step 1
    for learner in watched.values():
        learner.fit()
    expected = -0.5 * np.mean([h.w.astype(np.float64) for h in honest.values()], axis=0)
    # the honest nodes move on to step 2 before the attacker asks: it still gets step 1
    after_one = {n: h.get_weights()["w"] for n, h in honest.items()}
    for learner in watched.values():
        learner.fit()
    sent = attacker.get_weights()
    np.testing.assert_allclose(sent["w"], expected, rtol=1e-5)
    assert not np.allclose(after_one["h0"], honest["h0"].w)


def test_an_attacker_waits_for_the_slowest_honest_node_or_its_departure() -> None:
    board = HonestModels(wait=True, timeout=10.0)
    for n in ("a", "b", "c"):
        board.join(n)
    board.post("a", {"w": np.array([1.0])})
    board.post("b", {"w": np.array([3.0])})
    got: list[list[Weights]] = []
    asker = threading.Thread(target=lambda: got.append(board.models(1, attacker="x")))
    asker.start()
    time.sleep(0.2)  # time passes on purpose: the asker must still be waiting after it
    assert not got  # c has not trained its first step yet
    board.post("c", {"w": np.array([5.0])})
    asker.join(5)
    assert [m["w"][0] for m in got[0]] == [1.0, 3.0, 5.0]
    # a node that stops (crashed, finished) is not waited for; its last model still counts
    board.leave("c")
    board.post("a", {"w": np.array([2.0])})
    board.post("b", {"w": np.array([4.0])})
    started = time.monotonic()
    assert [m["w"][0] for m in board.models(2, attacker="x")] == [2.0, 4.0, 5.0]
    assert time.monotonic() - started < 1.0
    # without waiting (async mode): whatever is there
    loose = HonestModels(wait=False, timeout=10.0)
    loose.join("a")
    assert loose.models(3, attacker="x") == []


def test_the_board_forgets_steps_no_attacker_can_ask_for() -> None:
    board = HonestModels(wait=False, timeout=1.0)
    board.join("h")
    board.join("x", attacker=True)
    for step in range(1, 6):
        board.post("h", {"w": np.array([float(step)])})
        assert board.models(step, attacker="x")[0]["w"][0] == step
    assert len(board._posts["h"]) <= 2


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_every_behaviour_keeps_the_model_layout(behaviour: str) -> None:
    learner = ByzantineLearner(LinearLearner(seed=1), behaviour)  # type: ignore[arg-type]
    before = layout(learner.get_weights())
    learner.fit()
    assert layout(learner.get_weights()) == before
