"""The `Learner` seam: what a node needs from a model, whatever framework trains it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["EvalResult", "FitResult", "Learner", "PrivacyAccount", "privacy_of"]


@dataclass(frozen=True)
class FitResult:
    """Outcome of one local training step.

    `loss` is the mean training loss over the last local epoch (the data term only, without
    any proximal term); `samples` counts the examples processed during the whole step.
    """

    loss: float
    samples: int
    seconds: float


# eq=False: a dataclass compares fields with ==, which is ambiguous for arrays.
@dataclass(frozen=True, eq=False)
class EvalResult:
    """Outcome of an evaluation on the local test set.

    `confusion` is an int64 [n_classes, n_classes] matrix, rows = true label, columns =
    predicted label; summing the matrices of several peers gives their joint evaluation.
    """

    loss: float
    accuracy: float
    samples: int
    confusion: np.ndarray


@runtime_checkable
class Learner(Protocol):
    """A trainable model with its local data, exchanging weights as named numpy arrays.

    Methods block (training takes seconds); a node calls them through `asyncio.to_thread`.
    """

    @property
    def num_samples(self) -> int:
        """Number of local training samples."""
        ...

    def get_weights(self) -> dict[str, np.ndarray]:
        """Return a copy of every tensor of the model, by name."""
        ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the model's tensors; names and shapes must match the model's."""
        ...

    def fit(self) -> FitResult:
        """Train on the local data for the configured number of epochs."""
        ...

    def evaluate(self) -> EvalResult:
        """Evaluate on the local test data."""
        ...


class PrivacyAccount(Protocol):
    """A learner's differential-privacy budget (`p2pfl.learning.privacy.PrivacyBudget`)."""

    epsilon: float

    @property
    def spent(self) -> float:
        """Epsilon spent so far on the learner's own samples."""
        ...

    def allows_fit(self) -> bool:
        """Whether one more fit stays within the budget."""
        ...

    def record(self, *, fits_ahead: int = 0) -> dict[str, Any]:
        """What was spent (counting `fits_ahead` fits not run yet), as JSON-able data."""
        ...

    def restore(self, record: Mapping[str, Any]) -> None:
        """Continue from a saved record."""
        ...


def privacy_of(learner: Learner) -> PrivacyAccount | None:
    """The learner's privacy budget when it trains with DP (its `privacy` attribute), else None."""
    account: PrivacyAccount | None = getattr(learner, "privacy", None)
    return account


def prepare(learner: Learner) -> None:
    """Let the learner make what training needs before its first fit (`TorchLearner.prepare`:
    its optimizer); nothing for a learner without that method."""
    ready = getattr(learner, "prepare", None)
    if callable(ready):
        ready()
