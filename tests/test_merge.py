"""Merge rules: algebraic properties (hypothesis), robustness to outliers, dtypes and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.learning.merge import (
    MergeRule,
    Weights,
    _krum_scores,
    average,
    krum,
    median,
    multi_krum,
    parse_merge,
    trimmed_mean,
    weighted,
)

SPECS = ["average", "weighted", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1:2"]
RULES = [parse_merge(spec) for spec in SPECS]

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


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
@settings(max_examples=40, deadline=None)
@given(models=model_sets(max_models=1), copies=st.integers(1, 7))
def test_merging_copies_of_one_model_gives_that_model(
    rule: MergeRule, models: list[Weights], copies: int
) -> None:
    model = models[0]
    assert_models_close(rule([model] * copies), model)


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), models=model_sets())
def test_order_of_models_does_not_matter(
    rule: MergeRule, data: st.DataObject, models: list[Weights]
) -> None:
    shuffled = data.draw(st.permutations(models))
    assert_models_close(rule(shuffled), rule(models))


@settings(max_examples=40, deadline=None)
@given(models=model_sets(), weight=st.floats(1e-3, 1e6))
def test_weighted_with_equal_weights_is_the_average(models: list[Weights], weight: float) -> None:
    assert_models_close(weighted(models, [weight] * len(models)), average(models))


@settings(max_examples=40, deadline=None)
@given(models=model_sets(min_models=2))
def test_weighted_with_one_nonzero_weight_is_that_model(models: list[Weights]) -> None:
    weights = [0.0] * len(models)
    weights[-1] = 3.0
    assert_models_close(weighted(models, weights), models[-1])


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
def test_dtypes_are_preserved_and_counters_rounded(rule: MergeRule) -> None:
    models: list[Weights] = [
        {
            "half": np.full(3, v, np.float16),
            "single": np.full((2, 2), v, np.float32),
            "double": np.full(1, v, np.float64),
            "bn.num_batches_tracked": np.array(counter, np.int64),
            "mask": np.array([True, False]),
        }
        for v, counter in zip((1.0, 2.0, 3.0, 4.0, 5.0), (10, 11, 13, 12, 14), strict=True)
    ]
    merged = rule(models, [1.0] * 5)
    for name, tensor in models[0].items():
        assert merged[name].dtype == tensor.dtype, name
        assert merged[name].shape == tensor.shape, name
    # The middle model is central for every rule here, so the counter is 12 everywhere.
    assert int(merged["bn.num_batches_tracked"]) == 12
    assert merged["mask"].tolist() == [True, False]


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
def test_inputs_are_not_modified(rule: MergeRule) -> None:
    models = [{"w": np.array([float(i), 1.0])} for i in range(5)]
    before = [m["w"].copy() for m in models]
    merged = rule(models)
    merged["w"][:] = 99.0
    for model, saved in zip(models, before, strict=True):
        np.testing.assert_array_equal(model["w"], saved)


@pytest.mark.parametrize("rule", RULES, ids=SPECS)
def test_an_empty_model_list_is_refused(rule: MergeRule) -> None:
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
        ("average", "average"),
        (" Weighted ", "weighted"),
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
        ("mean", r"unknown merge rule 'mean'; choose one of: average, weighted, median, trimmed"),
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
    ],
)
def test_parse_merge_explains_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_merge(spec)
