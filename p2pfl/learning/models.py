"""Built-in models, and user models named `package.module:factory`.

The built-ins avoid BatchNorm on purpose: peers average every tensor of the state dict, and
averaging BatchNorm running statistics across peers whose data differ (non-IID) gives
statistics that match nobody's activations, which wrecks evaluation (Hsieh et al. 2020,
"The non-IID data quagmire"). A user model may still use it, knowingly.
"""

from __future__ import annotations

import importlib
import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["BUILTIN_MODELS", "Cnn1d", "ModelError", "build_model", "check_model"]

# Seeding the init goes through torch's global generator (nn.Module init functions take no
# generator); the lock keeps two of our threads from interleaving their seeded sections.
_INIT_LOCK = threading.Lock()


class ModelError(ValueError):
    """A model spec that cannot be used: a config error, said before any training."""


def _flat_features(in_shape: tuple[int, ...]) -> int:
    return math.prod(in_shape)


def _logreg(in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_features(in_shape), n_classes))


def _mlp(in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    hidden = 100
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_features(in_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


class Cnn1d(nn.Module):
    """Three convolution + max-pool stages and a linear head, sized for MNIST-1D (40 samples).

    Accepts [B, L] (one channel) or [B, C, L]; L must be at least 8. About 12k parameters on
    MNIST-1D, where it reaches ~0.93-0.96 test accuracy in 20 epochs of SGD (momentum 0.9,
    lr 0.05, batch 32). Pooling after stride-1 convolutions did clearly better here than
    strided convolutions with the same parameter count (~0.92, noisier).
    """

    def __init__(self, in_shape: tuple[int, ...], n_classes: int, channels: int = 32) -> None:
        super().__init__()
        if len(in_shape) == 1:
            in_channels, length = 1, in_shape[0]
        elif len(in_shape) == 2:
            in_channels, length = in_shape
        else:
            raise ModelError(f"cnn1d expects inputs shaped (L,) or (C, L), got {in_shape}")
        if length < 8:
            raise ModelError(f"cnn1d needs signals of at least 8 samples, got {in_shape}")
        stages: list[nn.Module] = []
        for c_in in (in_channels, channels, channels):
            stages += [
                nn.Conv1d(c_in, channels, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            length //= 2
        self.features = nn.Sequential(*stages, nn.Flatten())
        self.head = nn.Linear(channels * length, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [B, n_classes]."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


BUILTIN_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn1d": Cnn1d,
}


def build_model(
    name: str, in_shape: tuple[int, ...], n_classes: int, *, seed: int | None = None
) -> nn.Module:
    """Build a built-in model (`logreg`, `mlp`, `cnn1d`) or a user one (`package.module:factory`).

    A user factory is called with the keyword arguments `in_shape` and `n_classes` it
    declares (none if it declares neither). With `seed`, the initial weights are a function of
    the seed, so peers can start from the same model.
    """
    in_shape = tuple(int(d) for d in in_shape)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]

        def factory() -> nn.Module:
            return builtin(in_shape, n_classes)

    elif ":" in name:
        user_factory = _import_factory(name)

        def factory() -> nn.Module:
            return _call_user_factory(name, user_factory, in_shape, n_classes)

    else:
        raise _unknown(name)
    if seed is None:
        return factory()
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return factory()


def check_model(name: str) -> None:
    """ModelError unless ``name`` is a built-in model or a ``package.module:factory`` that
    imports; for a check at start-up, before the data (and so the shapes) are at hand."""
    if name in BUILTIN_MODELS:
        return
    if ":" not in name:
        raise _unknown(name)
    _import_factory(name)


def _unknown(name: str) -> ModelError:
    choices = ", ".join(sorted(BUILTIN_MODELS))
    return ModelError(
        f"unknown model {name!r}: choose one of {choices}, or give 'package.module:factory'"
    )


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ModelError(f"model {spec!r}: expected 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as e:
        raise ModelError(f"model {spec!r}: cannot import {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise ModelError(f"model {spec!r}: {module_name!r} has no {attr_path!r}") from e
    if not callable(obj):
        raise ModelError(f"model {spec!r}: {attr_path!r} is not callable")
    return obj


def _call_user_factory(
    spec: str, factory: Callable[..., Any], in_shape: tuple[int, ...], n_classes: int
) -> nn.Module:
    offered: dict[str, Any] = {"in_shape": in_shape, "n_classes": n_classes}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        kwargs: dict[str, Any] = {}
    else:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = offered
        else:
            kwargs = {k: v for k, v in offered.items() if k in params}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not nn.Module")
    return model
