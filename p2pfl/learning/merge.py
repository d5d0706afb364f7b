"""Merge rules: pure functions that combine several models into one.

Each rule takes the models to merge (the node's own model and what its neighbours sent; the
gossip policy of merging the local model with received ones is Ormándi et al. 2013, "Gossip
learning with linear models on fully distributed data", and lives in the node) and optional
per-model weights, and returns a new model. Inputs are never modified.

Arithmetic is done in float64 and cast back to each tensor's dtype. Integer and bool tensors
(BatchNorm's ``num_batches_tracked``, masks) go through the same rule and are rounded to the
nearest value the dtype holds: the rounded mean of the counters for ``average``, the median for
``median``, the chosen model's counter for ``krum``. Robust rules therefore stay robust for them
too, and every rule is independent of the order of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np

Weights = dict[str, np.ndarray]
"""A model: tensor name -> array."""

_Number = TypeVar("_Number", int, float)

RuleFunction = Callable[[Sequence[Weights], Sequence[float] | None], Weights]

CHOICES = (
    "average",
    "weighted",
    "median",
    "trimmed-mean:F (0 <= F < 0.5)",
    "krum:F (F Byzantine peers, an integer >= 0)",
    "multi-krum:F:M (average the M best by Krum's score)",
)


@dataclass(frozen=True)
class MergeRule:
    """A merge rule bound to its parameters, callable as ``rule(models, weights)``."""

    name: str
    function: RuleFunction

    def __call__(
        self, models: Sequence[Weights], weights: Sequence[float] | None = None
    ) -> Weights:
        return self.function(models, weights)


def average(models: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
    """Coordinate-wise mean of the models; ``weights`` are ignored (FedAvg with equal weights).

    McMahan et al. 2017, "Communication-efficient learning of deep networks from decentralized
    data" (FedAvg), with every participant counted once as in gossip averaging.
    """
    _check(models, weights)
    return _linear(models, [1.0 / len(models)] * len(models))


def weighted(models: Sequence[Weights], weights: Sequence[float] | None = None) -> Weights:
    """Weighted mean; ``weights`` are sample counts or model ages and are normalized to sum to 1.

    McMahan et al. 2017 (FedAvg) weight by local sample counts; gossip nodes weight by model
    age, the number of samples a model has been trained on.
    No weights, or weights that are all zero, give the plain mean. Negative or non-finite
    weights raise ValueError.
    """
    _check(models, weights)
    if weights is None:
        return average(models)
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


def parse_merge(spec: str) -> MergeRule:
    """The merge rule a config string names; ValueError listing the choices for anything else.

    ``average``, ``weighted``, ``median``, ``trimmed-mean:F``, ``krum:F``, ``multi-krum:F:M``.
    """
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
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
