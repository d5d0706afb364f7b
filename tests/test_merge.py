"""Merge rules: algebraic properties (hypothesis), robustness to outliers, dtypes and errors.

Clipped gossip's bound, tested below: with radius tau and n neighbours, any one neighbour moves
the node by at most tau/(n+1) from where the others put it, so replacing one neighbour's model
by anything changes the result by at most 2*tau/(n+1); the whole merge moves at most tau.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.learning.merge import (
    STANDING_START,
    WEIGHTED_CAP,
    ClippedGossip,
    Merge,
    Weights,
    _distance,
    _krum_scores,
    average,
    clipped_step,
    krum,
    median,
    multi_krum,
    parse_merge,
    trimmed_mean,
    weighted,
)

SPECS = [
    "clipped",
    "average",
    "weighted",
    "median",
    "trimmed-mean:0.2",
    "krum:1",
    "multi-krum:1:2",
]
RULES = [parse_merge(spec) for spec in SPECS]
# Rules for which no model is the node's own: any order of the inputs gives the same result.
SYMMETRIC = [spec for spec in SPECS if spec != "clipped"]

pytestmark = pytest.mark.filterwarnings("error")


@st.composite
def model_sets(draw: st.DrawFn, min_models: int = 1, max_models: int = 7) -> list[Weights]:
    """Between min and max models with the same float32 tensors (1-3 tensors, up to 3x3)."""
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), max_size=3))
    n = draw(st.integers(min_models, max_models))
    elements = st.floats(-1e3, 1e3, width=32)
    return [
        {
            f"layer{i}.weight": draw(hnp.arrays(np.float32, shape, elements=elements))
            for i, shape in enumerate([(2,), *shapes])
        }
        for _ in range(n)
    ]


def assert_models_close(a: Weights, b: Weights, rtol: float = 1e-5, atol: float = 1e-3) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=40, deadline=None)
@given(models=model_sets(max_models=1), copies=st.integers(1, 7))
def test_merging_copies_of_one_model_gives_that_model(
    spec: str, models: list[Weights], copies: int
) -> None:
    model = models[0]
    assert_models_close(parse_merge(spec)([model] * copies), model)


@pytest.mark.parametrize("spec", SYMMETRIC)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), models=model_sets())
def test_order_of_models_does_not_matter(
    spec: str, data: st.DataObject, models: list[Weights]
) -> None:
    rule = parse_merge(spec)
    shuffled = data.draw(st.permutations(models))
    assert_models_close(rule(shuffled), rule(models))


@settings(max_examples=40, deadline=None)
@given(models=model_sets(), weight=st.floats(1e-3, 1e6))
def test_weighted_with_equal_weights_is_the_average(models: list[Weights], weight: float) -> None:
    assert_models_close(weighted(models, [weight] * len(models)), average(models))


@settings(max_examples=40, deadline=None)
@given(models=model_sets(min_models=2))
def test_weighted_with_only_the_own_weight_nonzero_is_the_own_model(models: list[Weights]) -> None:
    weights = [0.0] * len(models)
    weights[0] = 3.0
    assert_models_close(weighted(models, weights), models[0])


@settings(max_examples=40, deadline=None)
@given(models=model_sets(min_models=2), own=st.floats(1.0, 1e4), claim=st.floats(1.0, 1e12))
def test_weighted_caps_a_claimed_age_at_cap_times_the_own(
    models: list[Weights], own: float, claim: float
) -> None:
    honest = [own] * (len(models) - 1)
    claimed = weighted(models, [own, *honest[:-1], claim])
    capped = weighted(models, [own, *honest[:-1], min(claim, WEIGHTED_CAP * own)])
    assert_models_close(claimed, capped)


def test_weighted_gives_a_huge_claim_no_more_than_the_cap() -> None:
    models = [{"w": np.array([0.0])}, {"w": np.array([1.0])}]
    # own age 100, the sender claims 10**12: it counts as 4 * 100, so its share is 4/5.
    np.testing.assert_allclose(weighted(models, [100.0, 1e12])["w"], [WEIGHTED_CAP / 5])
    np.testing.assert_allclose(parse_merge("weighted:1")(models, [100.0, 1e12])["w"], [0.5])


def test_weighted_with_no_own_age_takes_the_plain_mean() -> None:
    models = [{"w": np.array([0.0])}, {"w": np.array([3.0])}, {"w": np.array([6.0])}]
    np.testing.assert_allclose(weighted(models, [0.0, 1e12, 5.0])["w"], [3.0])


def test_weighted_by_samples() -> None:
    models = [{"w": np.array([0.0, 10.0])}, {"w": np.array([4.0, 20.0])}]
    np.testing.assert_allclose(weighted(models, [300, 100])["w"], [1.0, 12.5])


def test_weighted_with_all_zero_weights_is_the_plain_mean() -> None:
    models = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    np.testing.assert_allclose(weighted(models, [0.0, 0.0])["w"], [2.0])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_weighted_refuses_negative_or_non_finite_weights(bad: float) -> None:
    models = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted(models, [1.0, bad])


def test_average_ignores_weights_and_median_takes_the_middle() -> None:
    models = [{"w": np.array([v])} for v in (1.0, 2.0, 9.0)]
    np.testing.assert_allclose(average(models, [100, 0, 0])["w"], [4.0])
    np.testing.assert_allclose(median(models)["w"], [2.0])
    np.testing.assert_allclose(median(models[:2])["w"], [1.5])


def test_trimmed_mean_drops_floor_f_n_from_each_end() -> None:
    models = [{"w": np.array([v])} for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    # floor(0.2 * 5) = 1 dropped per end; floor(0.1 * 5) = 0 keeps everything.
    np.testing.assert_allclose(trimmed_mean(models, f=0.2)["w"], [2.0])
    np.testing.assert_allclose(trimmed_mean(models, f=0.1)["w"], [1.2])


@settings(max_examples=30, deadline=None)
@given(models=model_sets(min_models=5, max_models=9))
def test_krum_returns_one_of_the_models(models: list[Weights]) -> None:
    merged = krum(models, f=1)
    matches = [m for m in models if all(np.array_equal(m[k], merged[k]) for k in m)]
    scores = _krum_scores(models, len(models) - 1 - 2)
    # Only an exact tie for the best score averages several (distinct) models.
    assert matches or np.count_nonzero(scores == scores.min()) > 1


def test_krum_averages_models_tied_for_the_best_score() -> None:
    a, b, far = np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([50.0, 50.0])
    # f = 1, n = 5: each score sums the 2 nearest others; every copy of a and b scores 2.0.
    for order in ([a, a, b, b, far], [b, far, a, b, a]):
        merged = krum([{"w": w} for w in order], f=1)
        np.testing.assert_allclose(merged["w"], [0.5, 0.5])


def test_krum_falls_back_to_the_median_with_too_few_models() -> None:
    models = [{"w": np.array([v])} for v in (1.0, 2.0, 30.0, 40.0)]  # n = 4 <= 2*1 + 2
    np.testing.assert_allclose(krum(models, f=1)["w"], median(models)["w"])


def test_multi_krum_averages_the_m_most_central_models() -> None:
    models = [{"w": np.array([v])} for v in (0.0, 1.0, 2.0, 3.0, 1000.0, 2000.0, 3000.0)]
    # f = 2: each score sums the 3 nearest; 1.0 and 2.0 are the most central.
    np.testing.assert_allclose(multi_krum(models, f=2, m=2)["w"], [1.5])


def _honest_and_byzantine() -> list[Weights]:
    rng = np.random.default_rng(0)
    honest: list[Weights] = [
        {"w": rng.normal(0, 0.01, (4, 3)).astype(np.float32), "b": rng.normal(0, 0.01, 3)}
        for _ in range(7)
    ]
    byzantine: list[Weights] = [
        {"w": np.full((4, 3), 1e6, np.float32), "b": np.full(3, -1e6)} for _ in range(2)
    ]
    return [*honest[:3], *byzantine, *honest[3:]]


@pytest.mark.parametrize("spec", ["median", "trimmed-mean:0.25", "krum:2", "multi-krum:2:3"])
def test_robust_rules_ignore_a_minority_of_huge_outliers(spec: str) -> None:
    merged = parse_merge(spec)(_honest_and_byzantine())
    assert all(np.abs(t).max() < 0.1 for t in merged.values())


def test_plain_average_is_dragged_by_outliers() -> None:
    merged = average(_honest_and_byzantine())
    assert np.abs(merged["w"]).min() > 1e5


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
def test_dtypes_are_preserved_and_counters_rounded(rule: Merge) -> None:
    models: list[Weights] = [
        {
            "half": np.full(3, v, np.float16),
            "single": np.full((2, 2), v, np.float32),
            "double": np.full(1, v, np.float64),
            "bn.num_batches_tracked": np.array(counter, np.int64),
            "mask": np.array([True, False]),
        }
        # norms within 2x of the first's: clipped leaves out a model whose norm is further off
        for v, counter in zip((1.0, 1.25, 1.5, 1.75, 2.0), (10, 11, 13, 12, 14), strict=True)
    ]
    merged = rule(models, [1.0] * 5)
    for name, tensor in models[0].items():
        assert merged[name].dtype == tensor.dtype, name
        assert merged[name].shape == tensor.shape, name
    # The middle model is central for every rule here, so the counter is 12 everywhere (clipped:
    # the first merge's radius, 2 x the median distance, reaches every model: the mean).
    assert int(merged["bn.num_batches_tracked"]) == 12
    assert merged["mask"].tolist() == [True, False]


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
def test_inputs_are_not_modified(rule: Merge) -> None:
    models = [{"w": np.array([float(i), 1.0])} for i in range(5)]
    before = [m["w"].copy() for m in models]
    merged = rule(models)
    merged["w"][:] = 99.0
    for model, saved in zip(models, before, strict=True):
        np.testing.assert_array_equal(model["w"], saved)


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
def test_an_empty_model_list_is_refused(rule: Merge) -> None:
    with pytest.raises(ValueError, match="empty"):
        rule([])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"conv.weight": np.zeros((2, 2))}, "lacks tensor 'fc.bias'"),
        (
            {"conv.weight": np.zeros((2, 2)), "fc.bias": np.zeros(3), "x": np.zeros(1)},
            "extra tensor 'x'",
        ),
        ({"conv.weight": np.zeros((2, 3)), "fc.bias": np.zeros(3)}, "'conv.weight'.*shape"),
        ({"conv.weight": np.zeros((2, 2)), "fc.bias": np.zeros(3, np.float32)}, "'fc.bias'.*dtype"),
    ],
)
def test_mismatched_models_are_refused_naming_the_tensor(other: Weights, message: str) -> None:
    own = {"conv.weight": np.zeros((2, 2)), "fc.bias": np.zeros(3)}
    for rule in RULES:
        with pytest.raises(ValueError, match=message):
            rule([own, other])


def test_a_weight_per_model_is_required() -> None:
    models = [{"w": np.zeros(1)}, {"w": np.ones(1)}]
    with pytest.raises(ValueError, match="1 weights for 2 models"):
        weighted(models, [1.0])


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("clipped", "clipped"),
        ("clipped:2", "clipped"),
        ("Clipped:3.5", "clipped:3.5"),
        ("average", "average"),
        (" Weighted ", "weighted"),
        ("weighted:2", "weighted:2"),
        ("median", "median"),
        ("trimmed-mean:0.2", "trimmed-mean:0.2"),
        ("krum:2", "krum:2"),
        ("multi-krum:1:3", "multi-krum:1:3"),
    ],
)
def test_parse_merge_names_the_rule(spec: str, name: str) -> None:
    assert parse_merge(spec).name == name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mean", r"unknown merge rule 'mean'; choose one of: clipped \(default\)"),
        ("", "unknown merge rule"),
        ("trimmed-mean", "needs a fraction"),
        ("trimmed-mean:0.5", "0 <= F < 0.5"),
        ("trimmed-mean:abc", "needs a fraction"),
        ("trimmed-mean:nan", "needs a fraction"),
        ("krum", "integer number of Byzantine peers"),
        ("krum:1.5", "integer number of Byzantine peers"),
        ("krum:-1", "F >= 0"),
        ("multi-krum:1", "multi-krum:1:3"),
        ("multi-krum:1:0", "M >= 1"),
        ("average:2", "takes no parameter"),
        ("clipped:0.5", "F >= 1"),
        ("clipped:abc", "factor F >= 1"),
        ("clipped:inf", "factor F >= 1"),
        ("weighted:0", "C >= 1"),
        ("weighted:nan", "cap C >= 1"),
    ],
)
def test_parse_merge_explains_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_merge(spec)


# ---- clipped gossip -------------------------------------------------------------------------


def as_float64(models: list[Weights]) -> list[Weights]:
    """Float64 copies: bounds are then checked without float32 rounding in the way."""
    return [{k: v.astype(np.float64) for k, v in m.items()} for m in models]


def norm(a: Weights, b: Weights) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def scaled(model: Weights, factor: float) -> Weights:
    return {k: v * factor for k, v in model.items()}


def vector(*values: float) -> Weights:
    return {"w": np.array(values, dtype=np.float64)}


@settings(max_examples=60, deadline=None)
@given(models=model_sets(min_models=2))
def test_clipped_with_every_neighbour_within_tau_is_the_average(models: list[Weights]) -> None:
    own, others = models[0], models[1:]
    tau = max(_distance(own, m) for m in others)
    merged = clipped_step(own, others, tau=tau, share=1 / len(models))
    assert_models_close(merged, average(models))


def test_clipped_adaptive_radius_reaching_everyone_is_the_average() -> None:
    # Distances 1, 2, 3 from the own model: tau = 2 x lower median 2 = 4 reaches all three.
    models = [vector(0.0, 0.0), vector(1.0, 0.0), vector(0.0, 2.0), vector(-3.0, 0.0)]
    rule = ClippedGossip()
    assert_models_close(rule(models), average(models))
    assert rule.tau == 4.0


@settings(max_examples=60, deadline=None)
@given(
    models=model_sets(min_models=2),
    tau=st.floats(1e-3, 1e3),
    which=st.integers(0, 10),
    factor=st.sampled_from([1e6, -1e6, 1e12]),
)
def test_one_neighbour_scaled_by_a_huge_factor_moves_the_result_at_most_the_bound(
    models: list[Weights], tau: float, which: int, factor: float
) -> None:
    own, *others = as_float64(models)
    n = len(others)
    k = which % n
    before = clipped_step(own, others, tau=tau, share=1 / (n + 1))
    poisoned = [*others[:k], scaled(others[k], factor), *others[k + 1 :]]
    after = clipped_step(own, poisoned, tau=tau, share=1 / (n + 1))
    # Each neighbour's term is at most tau/(n+1) long: replacing one moves at most twice that.
    assert norm(before, after) <= 2 * tau / (n + 1) * (1 + 1e-9)
    # ... and compared with that neighbour sending our own model, at most tau/(n+1).
    silent = [*others[:k], own, *others[k + 1 :]]
    without = clipped_step(own, silent, tau=tau, share=1 / (n + 1))
    assert norm(without, after) <= tau / (n + 1) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(models=model_sets(min_models=1, max_models=1), tau=st.floats(1e-3, 10.0))
def test_a_single_far_neighbour_moves_a_ring_node_by_exactly_tau_over_two(
    models: list[Weights], tau: float
) -> None:
    (own,) = as_float64(models)
    far = {k: v + 1e6 for k, v in own.items()}  # D = 1e6 * sqrt(size) >> tau
    merged = clipped_step(own, [far], tau=tau, share=1 / 2)
    np.testing.assert_allclose(norm(merged, own), tau / 2, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), models=model_sets(min_models=2))
def test_clipped_does_not_depend_on_the_order_of_the_neighbours(
    data: st.DataObject, models: list[Weights]
) -> None:
    own, others = models[0], models[1:]
    shuffled = data.draw(st.permutations(others))
    assert_models_close(ClippedGossip()([own, *shuffled]), ClippedGossip()(models))


@settings(max_examples=40, deadline=None)
@given(
    models=model_sets(min_models=2),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    warm=st.booleans(),
)
def test_a_non_finite_neighbour_never_propagates(
    models: list[Weights], bad: float, warm: bool
) -> None:
    own, *others = models
    broken = {k: v.copy() for k, v in others[-1].items()}
    broken["layer0.weight"][0] = bad
    rule, twin = ClippedGossip(), ClippedGossip()
    if warm:  # the same past for both
        for r in (rule, twin):
            r([own, *others])
    merged = rule([own, *others[:-1], broken])
    # It counts as a model that did not come, and leaves no trace in the radius.
    assert all(np.isfinite(t).all() for t in merged.values())
    assert_models_close(merged, twin([own, *others[:-1]]))
    assert rule.tau == twin.tau


def test_clipped_takes_its_radius_from_past_distances_on_a_ring() -> None:
    rule = ClippedGossip()
    own = vector(0.0, 0.0)
    # The first merge has no past: the lower median of its own distances (one, on a ring).
    np.testing.assert_allclose(rule([own, vector(1.0, 0.0)])["w"], [0.5, 0.0])
    assert rule.tau == 2.0
    for _ in range(5):
        rule([own, vector(0.0, 1.0)])
    assert rule.tau == 2.0  # 2 x the median of distances of 1
    # A neighbour 1000 away moves the node by tau/2 = 1, not 500.
    merged = rule([own, vector(1000.0, 0.0)])
    np.testing.assert_allclose(merged["w"], [1.0, 0.0])


def test_a_minority_of_far_models_does_not_move_the_radius_once_there_is_a_past() -> None:
    rule = ClippedGossip()
    own = vector(0.0)
    rule([own, vector(1.0), vector(-1.0), vector(1.0)])
    tau = rule.radius([])
    rule([own, vector(1e9), vector(1.0), vector(-1.0)])  # the lower median is near
    assert rule.tau == tau


def test_a_node_whose_every_neighbour_is_far_trusts_the_majority() -> None:
    # Its own training diverged: the lower median of this merge's distances becomes the
    # radius, as on a first merge, and no sender's standing suffers for it.
    rule = ClippedGossip()
    own = vector(0.0)
    rule([own, vector(1.0), vector(-1.0), vector(1.0)], senders=["a", "b", "c"])
    before = [rule.standing(x) for x in "abc"]
    merged = rule([own, vector(50.0), vector(-60.0), vector(1e9)], senders=["a", "b", "c"])
    assert rule.tau == 60.0
    after = [rule.standing(x) for x in "abc"]
    # a and b lie within the majority's radius and earn standing; c is not held to account
    assert after[0] > before[0] and after[1] > before[1] and after[2] == before[2]
    # Within their radii a and b count in full, the third is clipped to 60 x its reach.
    radii = [60.0 * rule.reach(x) for x in "abc"]
    terms = [min(50.0, radii[0]), -min(60.0, radii[1]), radii[2]]
    np.testing.assert_allclose(merged["w"], [sum(terms) / 4])


def test_a_ring_node_whose_training_diverged_trusts_its_last_trusted_senders() -> None:
    # One model per merge (a ring whose hop changes each round): the node sees that most of its
    # last distinct senders, all of them trusted, are far, so it is itself the odd one out.
    rule = ClippedGossip()
    own = vector(0.0)
    for _ in range(3):  # every sender near: standing earned
        for name in "abcd":
            rule([own, vector(1.0)], senders=[name])
    assert all(rule.standing(x) == 1.0 for x in "abcd")
    diverged = vector(100.0)
    merged, taus = [], []
    for name in "abcd":
        merged.append(rule([diverged, vector(0.0)], senders=[name])["w"][0])
        taus.append(rule.tau)
    assert taus[:2] == [2.0, 2.0]  # two far senders among four are not yet a majority
    # ... and their models' norm (0) is off the node's (100): left out while it is no outlier
    np.testing.assert_allclose(merged[:2], [100.0, 100.0])
    assert taus[2:] == [100.0, 100.0]  # three of four are: it trusts them, halfway each
    np.testing.assert_allclose(merged[2:], [50.0, 50.0])
    assert rule.standing("c") == rule.standing("d") == 1.0  # and holds nothing against them


def test_a_sender_pulling_towards_the_origin_loses_standing_though_it_looks_near() -> None:
    # Honest models trained from one start have about the same norm, yet sit nearly a norm
    # apart: a zero (or ipm's -0.1 x mean) model is as near as an honest one, so only its norm
    # gives it away. A model more than 2x off the node's own norm counts as far.
    rule = ClippedGossip()
    own = vector(10.0, 0.0)
    rule([own, vector(10.0, 8.0)], senders=["warm-up"])  # tau = 2 x 8 = 16
    for _ in range(3):
        rule([own, vector(10.0, 10.0), vector(0.0, 0.0)], senders=["honest", "zero"])
    assert rule.standing("honest") == 1.0
    assert rule.standing("zero") == STANDING_START / 8
    # Above the norm band, and anything when the node's own norm says nothing (all zeros):
    rule([own, vector(25.0, 0.0)], senders=["big"])
    assert rule.standing("big") == STANDING_START / 2
    blank = ClippedGossip()
    blank([vector(0.0, 0.0), vector(1.0, 0.0)], senders=["any"])
    assert blank.standing("any") == STANDING_START + 0.25


@settings(max_examples=40, deadline=None)
@given(
    models=model_sets(min_models=1, max_models=1),
    factor=st.sampled_from([-3.0, 2.5, 0.3, 1e6, 0.0]),
)
def test_a_model_whose_norm_is_off_the_nodes_moves_it_not_at_all(
    models: list[Weights], factor: float
) -> None:
    # Clipping alone would move the node by tau x standing / 2 towards it, all along the few
    # coordinates where it is huge; a model more than 2x off the node's norm is left out.
    (own,) = as_float64(models)
    size = norm(own, scaled(own, 0.0))
    assume(1e-3 < size < float("inf"))
    rule = ClippedGossip()
    for _ in range(3):  # a trusted sender: full standing
        rule([own, scaled(own, 1.1)], senders=["a"])
    assert rule.standing("a") == 1.0
    merged = rule([own, scaled(own, factor)], senders=["a"])
    assert_models_close(merged, own, atol=0.0)
    assert rule.standing("a") == 0.5  # and it counts against its sender


@pytest.mark.parametrize("model", [(0.0, 10.0), (-10.0, 0.0), (-7.0, 7.0), (2.0, 9.8)])
def test_a_model_not_aligned_with_the_nodes_is_left_out(model: tuple[float, float]) -> None:
    # Noise is orthogonal to the honest models, sign-flip and ipm point away: with the node's
    # other senders aligned, a model whose cosine with its own is below 0.2 moves it not at
    # all, though its norm is the same and it is within the radius.
    rule = ClippedGossip()
    own = vector(10.0, 0.0)
    for _ in range(3):
        rule([own, vector(10.0, 1.0), vector(10.0, -1.0), vector(11.0, 0.0)],
             senders=["a", "b", "c"])  # fmt: skip
    merged = rule([own, vector(*model)], senders=["d"])
    np.testing.assert_allclose(merged["w"], own["w"])
    assert rule.standing("d") == STANDING_START / 2
    # Aligned (cosine 0.29), as far (14.3) and as new, it is clipped as usual: to tau (a new
    # sender's reach is all of it), halfway with the node's own (tau = 2 x the median 1).
    merged = rule([own, vector(4.0, 13.0)], senders=["e"])
    np.testing.assert_allclose(norm(merged, own), 2.0 / 2)


def test_a_node_whose_senders_are_all_unaligned_merges_as_before() -> None:
    # It started from another initial model: every neighbour is nearly orthogonal to it, so
    # it is the odd one and alignment is not asked (clipping and standing still apply).
    own = vector(10.0, 0.0)
    mesh = [own, vector(0.0, 10.0), vector(1.0, 10.0), vector(0.0, 9.0)]
    merged = ClippedGossip()(mesh, senders=["a", "b", "c"])
    assert np.all(np.abs(merged["w"] - own["w"]) > 1.0)
    # On a ring one sender alone never decides it: its first (only) vote leaves the model out,
    # and from the second sender on the node is the odd one.
    ring = ClippedGossip()
    for name in "abcd":
        before = ring.tau
        moved = ring([own, vector(0.0, 10.0)], senders=[name])
        assert np.allclose(moved["w"], own["w"]) == (name == "a"), (name, before)


def test_an_outlier_node_leaves_out_a_norm_off_model_beyond_the_majority() -> None:
    # Most neighbours far: the node trusts the majority (tau = their lower median, 20), and
    # takes a model whose norm is off its own only within that radius, not a huge one.
    rule = ClippedGossip()
    own = vector(10.0, 0.0)
    for _ in range(3):  # tau = 2 x 1; every sender earns full standing
        rule([own, vector(10.0, 1.0), vector(10.0, -1.0), vector(11.0, 0.0)],
             senders=["a", "b", "c"])  # fmt: skip
    merged = rule([own, vector(0.0, 10.0), vector(-10.0, 0.0), vector(1e6, 0.0)],
                  senders=["a", "b", "c"])  # fmt: skip
    assert rule.tau == 20.0
    # a (14.1 away) and b (20) count in full; c is left out, not counted: 10 + (-10 - 20) / 3,
    # 10 / 3
    np.testing.assert_allclose(merged["w"], [0.0, 10 / 3])


def test_fresh_identities_never_make_a_node_think_it_is_the_outlier() -> None:
    # Sybils: each new name sends one far model; none has earned standing, so each merge has
    # one counted distance, the radius comes from the past, and each model is clipped to it.
    rule = ClippedGossip()
    own = vector(0.0)
    for _ in range(3):
        rule([own, vector(1.0)], senders=["honest"])
    for i in range(20):
        tau = rule.radius([])
        merged = rule([own, vector(1e6)], senders=[f"sybil-{i}"])
        assert rule.tau == tau <= 8.0  # from the past only (it grows by F per half window)
        np.testing.assert_allclose(merged["w"], [tau / 2])


def test_a_far_neighbour_is_remembered_as_tau_at_most() -> None:
    # A node whose only neighbour is always far: tau grows, by at most F per merge.
    rule = ClippedGossip()
    own = vector(0.0)
    rule([own, vector(1.0)])
    taus = []
    for _ in range(40):
        rule([own, vector(1e6)])
        assert rule.tau is not None
        taus.append(rule.tau)
    assert all(b <= 2.0 * max(taus[: i + 1]) for i, b in enumerate(taus[1:]))
    assert taus[-1] < 1e6


def test_clipped_warmed_up_bound_holds_for_a_scaled_neighbour() -> None:
    rng = np.random.default_rng(1)
    honest = [{"w": rng.normal(0, 1, 50), "b": rng.normal(0, 1, 5)} for _ in range(5)]
    rule = ClippedGossip()
    for _ in range(4):
        rule(honest)
    tau = rule.radius([])
    twin = ClippedGossip()
    for _ in range(4):
        twin(honest)
    clean = twin(honest)
    poisoned = rule([*honest[:-1], scaled(honest[-1], 1e6)])
    assert norm(clean, poisoned) <= 2 * tau / 5 * (1 + 1e-9)


def test_clipped_moves_integer_tensors_by_the_same_fraction_and_rounds_them() -> None:
    own: Weights = {"w": np.zeros(1), "steps": np.array(100, np.int64)}
    far: Weights = {"w": np.array([10.0]), "steps": np.array(300, np.int64)}
    # The counter is no part of the distance (10); tau = 2.5 keeps a quarter of every term.
    merged = clipped_step(own, [far], tau=2.5, share=1.0)
    np.testing.assert_allclose(merged["w"], [2.5])
    assert merged["steps"].dtype == np.int64 and int(merged["steps"]) == 150


def test_clipped_adopts_a_near_token_and_moves_at_most_tau_towards_a_far_one() -> None:
    rule = ClippedGossip()
    own = vector(0.0, 0.0)
    token = vector(3.0, 4.0)
    # A token within tau replaces the node's model, as with every rule.
    np.testing.assert_allclose(rule.adopt(own, [token])["w"], [3.0, 4.0])
    assert rule.tau == 10.0
    far = vector(3000.0, 4000.0)
    np.testing.assert_allclose(rule.adopt(own, [far], [1.0])["w"], [6.0, 8.0])  # tau = 10
    # Several tokens met here: the mean of their clipped differences.
    np.testing.assert_allclose(rule.adopt(own, [token, far])["w"], [4.5, 6.0])


def test_plain_rules_let_a_token_replace_the_model() -> None:
    own, a, b = vector(0.0), vector(1000.0), vector(2000.0)
    for spec in ("average", "weighted", "median"):
        rule = parse_merge(spec)
        np.testing.assert_allclose(rule.adopt(own, [a])["w"], [1000.0])
        np.testing.assert_allclose(rule.adopt(own, [a, b], [1.0, 1.0])["w"], [1500.0])


def test_every_parse_builds_its_own_clipped_state() -> None:
    one, two = parse_merge("clipped"), parse_merge("clipped")
    assert isinstance(one, ClippedGossip) and isinstance(two, ClippedGossip)
    one([vector(0.0), vector(1.0)])
    assert one.tau == 2.0 and two.tau is None


def test_clipped_refuses_a_bad_radius() -> None:
    with pytest.raises(ValueError, match="radius"):
        clipped_step(vector(0.0), [vector(1.0)], tau=-1.0, share=0.5)
    with pytest.raises(ValueError, match="F >= 1"):
        ClippedGossip(0.5)


def test_a_sender_always_beyond_tau_moves_a_node_by_at_most_two_terms_over_a_run() -> None:
    # A ring node whose predecessor always sends a far model: its standing starts at 1/2 and
    # halves with each far model, its reach (the share of tau it may move the node by) with
    # it from the second model on, so the whole run moves the node by at most two full terms.
    rule = ClippedGossip()
    own = vector(0.0, 0.0)
    rule([own, vector(1.0, 0.0)], senders=["honest"])
    assert rule.tau == 2.0
    steps = []
    for _ in range(60):
        merged = rule([own, vector(0.0, 1e6)], senders=["evil"])
        steps.append(norm(merged, own))
    assert steps[:2] == pytest.approx([2.0 / 2, 2.0 / 2 / 2])  # tau x reach 1, then 1/2
    assert rule.standing("evil") < 1e-15
    # tau itself grows while every recent distance is far (by F per half window); bounded by
    # the largest radius seen: tau/2 x (1 + 1/2 + 1/4 + ...) <= tau.
    assert sum(steps) <= (rule.tau or 0.0)
    assert rule.standing("honest") == 0.75


def test_trust_is_earned_and_an_unlucky_honest_sender_regains_it() -> None:
    rule = ClippedGossip()
    own = vector(0.0)
    assert rule.standing("a") == STANDING_START == 0.5
    for _ in range(2):
        rule([own, vector(1.0), vector(-1.0)], senders=["a", "b"])  # tau = 2, both near
    assert rule.standing("a") == rule.standing("b") == 1.0
    rule([own, vector(2.5), vector(-1.0)], senders=["a", "b"])  # a beyond tau once
    assert rule.standing("a") == 0.5 and rule.standing("b") == 1.0
    rule([own, vector(1.0), vector(-1.0)], senders=["a", "b"])
    assert rule.standing("a") == 0.75
    rule([own, vector(1.0), vector(-1.0)], senders=["a", "b"])
    assert rule.standing("a") == 1.0


def test_standing_cuts_a_sender_radius_and_anonymous_models_keep_full_radius() -> None:
    rule = ClippedGossip()
    own = vector(0.0)
    rule([own, vector(1.0)], senders=["x"])  # tau = 2; near: standing 3/4
    rule([own, vector(100.0)], senders=["x"])  # far: standing 3/8 from the next model on
    assert rule.standing("x") == 0.375 and rule.reach("x") == 0.75
    tau = rule.radius([])
    # Its next model, 100 away, moves the node by tau x 3/4 x 1/2 (one of two in the merge):
    # below the starting standing, each halving halves the share of tau it may move by.
    merged = rule([own, vector(100.0)], senders=["x"])
    np.testing.assert_allclose(merged["w"], [tau * 0.75 / 2])
    assert rule.reach("x") == 0.375
    twin = ClippedGossip()
    twin._recent.extend(rule._recent)  # the same past, no sender named
    tau = twin.radius([])
    np.testing.assert_allclose(twin([own, vector(100.0)])["w"], [tau / 2])


def test_standing_memory_is_bounded() -> None:
    rule = ClippedGossip(memory=8)
    own = vector(0.0)
    rule([own, vector(1.0)])
    for i in range(100):
        rule([own, vector(1e3)], senders=[f"sybil-{i}"])
    assert len(rule._standing) == 8
    assert rule.standing("sybil-99") == 0.25 and rule.standing("sybil-0") == STANDING_START


def test_senders_must_match_the_models() -> None:
    with pytest.raises(ValueError, match="senders"):
        ClippedGossip()([vector(0.0), vector(1.0)], senders=["a", "b"])


def test_a_first_merge_takes_its_radius_from_how_far_the_node_trained() -> None:
    # A ring node's first neighbour is Byzantine: with nothing to compare with but itself, it
    # would set its own radius. The node's own training since its anchor sets it instead.
    rule = ClippedGossip()
    rule.anchor(vector(2.0, 0.0))
    own = vector(3.0, 0.0)  # its first local training moved it by 1
    evil = vector(2.0, 4.0)  # 4.1 away, yet in shape (norm 4.5, cosine 0.45)
    merged = rule([own, evil], senders=["evil"])
    assert rule.tau == 2.0
    # Clipped to tau (a new sender's reach), one of two models in the merge: 2 x 1/2.
    np.testing.assert_allclose(norm(merged, own), 1.0)
    # Without an anchor (or one of another layout) the merge's own distances are all it has.
    blind = ClippedGossip()
    blind.anchor({"other": np.zeros(3)})
    blind([own, evil])
    assert blind.tau == pytest.approx(2 * norm(own, evil))


def test_a_left_out_model_is_not_counted_in_the_shares() -> None:
    # Three trusted senders; one now sends a model pointing away (cosine -1): the other two
    # weigh 1/3 each, as if it had not come, not 1/4 with the node's own weighing 1/2.
    rule = ClippedGossip()
    own = vector(10.0, 0.0)
    for _ in range(3):
        rule([own, vector(10.0, 1.0), vector(10.0, -1.0), vector(11.0, 0.0)],
             senders=["a", "b", "c"])  # fmt: skip
    merged = rule([own, vector(10.0, 1.5), vector(11.0, 0.0), vector(-10.0, 0.0)],
                  senders=["a", "b", "c"])  # fmt: skip
    np.testing.assert_allclose(merged["w"], [10.0 + 1.0 / 3, 1.5 / 3])
    assert rule.standing("c") == 0.5


def test_fresh_senders_that_are_most_of_a_merge_never_make_the_node_the_outlier() -> None:
    # A mesh node's first merge: three of its four neighbours are attackers new to it, each
    # sending ten times an honest model. Their lower median must not become its radius (it
    # did: the node took them in full and never came back); its own training sets it.
    rule = ClippedGossip()
    rule.anchor(vector(9.0, 0.0))
    own = vector(10.0, 0.0)  # trained by 1
    evil = vector(100.0, 10.0)
    merged = rule([own, vector(10.0, 1.0), evil, evil, evil], senders=["h", "x", "y", "z"])
    assert rule.tau == 2.0
    # Every term is within tau, over the five models of the merge.
    assert norm(merged, own) <= 4 * rule.tau / 5 + 1e-9


def test_a_node_whose_norm_blew_up_comes_back_to_its_neighbours() -> None:
    # Its own training multiplied its norm by five while its past distances were large, so
    # its neighbours are within its radius (it is no outlier) and every one of them is "off
    # its norm". Most of its senders being off, its own norm is the odd one: it takes them
    # (clipped as usual) instead of leaving all of them out for the rest of the run.
    rule = ClippedGossip()
    own = vector(50.0, 0.0)
    honest = [vector(10.0, 1.0), vector(10.0, -1.0), vector(11.0, 0.0)]
    for _ in range(6):
        own = rule([own, *honest], senders=["a", "b", "c"])
    assert float(np.linalg.norm(own["w"])) < 2 * 10.0
    assert all(rule.standing(x) > STANDING_START for x in "abc")
