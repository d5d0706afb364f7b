"""Built-in and user models: output shapes, seeding, name errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from p2pfl.learning.models import BUILTIN_MODELS, ModelError, build_model, check_model


def tiny_factory(in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A user factory that takes the offered keyword arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1], n_classes))


def no_arg_factory() -> nn.Module:
    """A user factory that takes no arguments."""
    return nn.Linear(40, 3)


def not_a_model() -> str:
    return "nope"


@pytest.mark.parametrize(
    ("name", "in_shape", "batch_shape"),
    [
        ("logreg", (40,), (5, 40)),
        ("logreg", (8, 8), (5, 8, 8)),
        ("mlp", (40,), (5, 40)),
        ("mlp", (64,), (5, 64)),
        ("cnn1d", (40,), (5, 40)),
        ("cnn1d", (40,), (5, 1, 40)),
        ("cnn1d", (1, 40), (5, 1, 40)),
        ("cnn1d", (3, 16), (5, 3, 16)),
    ],
)
def test_builtin_models_produce_logits_per_class(
    name: str, in_shape: tuple[int, ...], batch_shape: tuple[int, ...]
) -> None:
    model = build_model(name, in_shape, 7)
    out = model(torch.randn(*batch_shape))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_builtins_have_no_batchnorm() -> None:
    for name in BUILTIN_MODELS:
        model = build_model(name, (40,), 10)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_cnn1d_is_small() -> None:
    n_params = sum(p.numel() for p in build_model("cnn1d", (40,), 10).parameters())
    assert 5_000 < n_params < 30_000


def test_cnn1d_rejects_too_short_signal() -> None:
    with pytest.raises(ValueError, match="at least 8"):
        build_model("cnn1d", (4,), 10)


def test_user_factory_receives_shape_and_classes() -> None:
    model = build_model(f"{__name__}:tiny_factory", (12,), 4)
    assert model(torch.randn(2, 12)).shape == (2, 4)


def test_user_factory_without_arguments() -> None:
    model = build_model(f"{__name__}:no_arg_factory", (40,), 3)
    assert model(torch.randn(2, 40)).shape == (2, 3)


def test_user_factory_must_return_a_module() -> None:
    with pytest.raises(ValueError, match=r"not nn\.Module"):
        build_model(f"{__name__}:not_a_model", (40,), 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_p2pfl.models:make", "cannot import"),
        (f"{__name__}:missing_factory", "has no"),
        (":factory", "expected"),
    ],
)
def test_bad_user_model_spec(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(spec, (40,), 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_p2pfl.models:make", "cannot import"),
        (f"{__name__}:missing_factory", "has no"),
        (f"{__name__}:BUILTIN_MODELS", "not callable"),
        ("resnet", "unknown model 'resnet'"),
    ],
)
def test_check_model_refuses_what_build_model_would(spec: str, message: str) -> None:
    """The start-up check, before any data: the same ModelError as building would give."""
    with pytest.raises(ModelError, match=message):
        check_model(spec)
    with pytest.raises(ModelError, match=message):
        build_model(spec, (40,), 3)


def test_check_model_takes_builtins_and_user_factories() -> None:
    for spec in (*BUILTIN_MODELS, "torch.nn:Linear"):
        check_model(spec)  # no error


def test_a_user_module_with_a_syntax_error_is_a_model_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_p2pfl_model.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="cannot import 'broken_p2pfl_model'"):
        check_model("broken_p2pfl_model:build")


def test_unknown_model_lists_builtins() -> None:
    with pytest.raises(ValueError, match="cnn1d") as info:
        build_model("resnet", (40,), 10)
    assert all(name in str(info.value) for name in BUILTIN_MODELS)


def test_seed_fixes_initial_weights_without_touching_global_rng() -> None:
    before = torch.get_rng_state()
    a = build_model("mlp", (40,), 10, seed=1).state_dict()
    b = build_model("mlp", (40,), 10, seed=1).state_dict()
    c = build_model("mlp", (40,), 10, seed=2).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
