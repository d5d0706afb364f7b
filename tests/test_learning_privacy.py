"""Differential privacy: DP-SGD through Opacus, budgeted for the whole planned run."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from p2pfl.config import ConfigError, load_config
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.privacy import DPSettings, PrivacyBudget, PrivacyError
from p2pfl.learning.torch_learner import TorchLearner, build_learner, learner_from_config


def _dp(epsilon: float = 4.0, fits: int = 3, **kw: float) -> DPSettings:
    return DPSettings(
        epsilon=epsilon,
        delta=kw.get("delta", 1e-5),
        max_grad_norm=kw.get("max_grad_norm", 1.0),
        planned_fits=fits,
    )


def _private(
    blobs: Dataset, dp: DPSettings, *, model: str = "mlp", epochs: int = 2
) -> TorchLearner:
    return build_learner(
        model, blobs, None, batch_size=16, local_epochs=epochs, dp=dp, dp_noise_seed=1
    )


# Each example is one Opacus noise search (1 to 8 s): a few spread over the space say as much.
@settings(max_examples=4, deadline=None)
@given(
    epsilon=st.floats(0.5, 32.0),
    sample_rate=st.floats(0.01, 0.5),
    steps=st.integers(1, 400),
)
def test_calibrated_noise_keeps_the_planned_run_within_epsilon(
    epsilon: float, sample_rate: float, steps: int
) -> None:
    budget = PrivacyBudget.calibrate(
        _dp(epsilon, fits=2), sample_rate=sample_rate, steps_per_fit=steps
    )
    planned = budget.spent_after(2)
    assert planned <= epsilon
    assert planned > 0.9 * epsilon - 0.05  # not wastefully noisy either
    # Opacus's own accountant, fed the same steps, agrees.
    accountant = RDPAccountant()
    accountant.history = [(budget.noise_multiplier, sample_rate, 2 * steps)]
    assert accountant.get_epsilon(delta=1e-5) == pytest.approx(planned)


def test_epsilon_grows_and_stays_within_budget_over_the_planned_run(blobs: Dataset) -> None:
    learner = _private(blobs, _dp(4.0, fits=3))
    budget = learner.privacy
    assert budget is not None and budget.spent == 0.0
    spent = [0.0]
    for _ in range(3):
        assert budget.allows_fit()
        fit = learner.fit()
        assert fit.samples > 0 and math.isfinite(fit.loss)
        spent.append(budget.spent)
    assert all(a < b for a, b in itertools.pairwise(spent))
    assert spent[-1] <= 4.0
    # Opacus counted every optimizer step: 3 fits x 2 epochs x 8 batches of 120 samples.
    assert budget.accountant.history == [(budget.noise_multiplier, 1 / 8, 48)]


def test_a_fit_past_the_budget_is_refused_and_said(
    blobs: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    learner = _private(blobs, _dp(2.0, fits=1))
    budget = learner.privacy
    assert budget is not None
    learner.fit()
    spent = budget.spent
    before = learner.get_weights()
    with caplog.at_level("WARNING", logger="p2pfl"):
        refused = learner.fit()
        learner.fit()
    assert refused.samples == 0
    assert budget.spent == spent <= 2.0
    after = learner.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    said = [r for r in caplog.records if "privacy budget spent" in r.getMessage()]
    assert len(said) == 1  # said once, not every round


def test_weights_keep_the_layout_of_a_learner_without_dp(blobs: Dataset) -> None:
    plain = build_learner("mlp", blobs, None, seed=3)
    private = _private(blobs, _dp())
    wp, wd = plain.get_weights(), private.get_weights()
    assert list(wd) == list(wp)  # same names, same order: no "_module." prefix
    assert all(wd[k].shape == wp[k].shape and wd[k].dtype == wp[k].dtype for k in wp)
    # A merge's result loaded into the private learner is what it then trains from.
    private.set_weights(wp)
    assert all(np.array_equal(private.get_weights()[k], wp[k]) for k in wp)
    assert private.evaluate().loss == pytest.approx(plain.evaluate().loss)
    private.fit()
    moved = private.get_weights()
    assert any(not np.array_equal(moved[k], wp[k]) for k in wp)
    plain.set_weights(moved)  # and the trained weights load into a node without DP


def test_dp_training_adds_noise_and_still_learns(blobs: Dataset) -> None:
    """Same data, same batches: a different noise seed gives different weights; and a generous
    budget still learns the blobs."""
    a = build_learner("mlp", blobs, None, batch_size=16, dp=_dp(16.0, fits=4), dp_noise_seed=1)
    b = build_learner("mlp", blobs, None, batch_size=16, dp=_dp(16.0, fits=4), dp_noise_seed=2)
    a.fit()
    b.fit()
    wa, wb = a.get_weights(), b.get_weights()
    assert any(not np.allclose(wa[k], wb[k]) for k in wa)
    for _ in range(3):
        a.fit()
    assert a.evaluate().accuracy > 0.6


def test_restore_continues_from_what_was_spent(blobs: Dataset) -> None:
    first = _private(blobs, _dp(4.0, fits=3))
    assert first.privacy is not None
    first.fit()
    record = first.privacy.record()
    ahead = first.privacy.record(fits_ahead=1)
    assert record["spent"] == pytest.approx(first.privacy.spent)
    assert ahead["spent"] > record["spent"]
    restarted = _private(blobs, _dp(4.0, fits=3))
    assert restarted.privacy is not None
    restarted.privacy.restore(record)
    assert restarted.privacy.spent == pytest.approx(first.privacy.spent)
    restarted.fit()
    restarted.fit()
    assert restarted.privacy.spent <= 4.0
    assert restarted.fit().samples == 0  # the fourth fit of a three-fit budget
    with pytest.raises(ValueError, match="history"):
        restarted.privacy.restore({"history": [[1.0, 2.0, 3]]})


def test_batchnorm_model_is_refused_naming_the_key() -> None:
    x = torch.randn(40, 4)
    y = torch.randint(0, 2, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(PrivacyError, match=r"^dp_epsilon: .*BatchNorm"):
        TorchLearner(model, loader, loader, n_classes=2, dp=_dp())


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"epsilon": 0.0}, "dp_epsilon"),
        ({"epsilon": math.inf}, "dp_epsilon"),
        ({"delta": 1.0}, "dp_delta"),
        ({"max_grad_norm": -1.0}, "dp_max_grad_norm"),
        ({"fits": 0}, "rounds"),
    ],
)
def test_bad_dp_settings_name_their_key(kw: dict[str, float], key: str) -> None:
    args = {"epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "planned_fits": 3}
    args.update({("planned_fits" if k == "fits" else k): v for k, v in kw.items()})
    with pytest.raises(PrivacyError, match=f"^{key}: "):
        DPSettings(**args)  # type: ignore[arg-type]


def test_too_small_a_budget_is_a_clear_error(blobs: Dataset) -> None:
    with pytest.raises(PrivacyError, match=r"^dp_epsilon: .* too small"):
        _private(blobs, _dp(1e-9, fits=50))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"dp_epsilon": 8.0}, "dp_epsilon: a privacy budget needs a planned run"),
        ({"dp_epsilon": 8.0, "rounds": 5, "mu": 0.1}, "FedProx"),
        ({"dp_epsilon": -1.0, "rounds": 5}, "dp_epsilon"),
        ({"dp_epsilon": 8.0, "rounds": 5, "dp_delta": 2.0}, "dp_delta"),
        ({"dp_epsilon": 8.0, "rounds": 5, "dp_max_grad_norm": 0.0}, "dp_max_grad_norm"),
    ],
)
def test_config_refuses_what_dp_cannot_budget(overrides: dict[str, float], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_config_defaults_and_learner_from_config(blobs: Dataset) -> None:
    off = load_config(None, {})
    assert (off.dp_epsilon, off.dp_delta, off.dp_max_grad_norm) == (None, 1e-5, 1.0)
    assert learner_from_config(off, blobs, None).privacy is None
    on = load_config(None, {"dp_epsilon": 3.0, "rounds": 4, "model": "mlp", "local_epochs": 1})
    learner = learner_from_config(on, blobs, None, dp_noise_seed=0)
    assert learner.privacy is not None
    assert learner.privacy.spent_after(4) <= 3.0 < learner.privacy.spent_after(5)
