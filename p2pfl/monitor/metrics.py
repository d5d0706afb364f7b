"""The network's global evaluation, from what nodes put in their telemetry.

Every node evaluates its model on its own test data and reports the confusion matrix. Summing
the matrices gives the evaluation of "the network" on the union of all test sets, the way a
federated server would evaluate the global model, without any data or model leaving a node.
Divergence is estimated from each node's random projection of its weights (Johnson-Lindenstrauss:
Euclidean distances are approximately preserved), so the monitor never downloads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np


def sum_confusions(matrices: Sequence[np.ndarray]) -> np.ndarray | None:
    """The sum of square confusion matrices (rows = true label); smaller ones are zero-padded.

    Padding aligns class indices when a node's test set happened not to cover the last classes.
    None when there is nothing to sum.
    """
    if not matrices:
        return None
    size = max(m.shape[0] for m in matrices)
    total = np.zeros((size, size), dtype=np.int64)
    for m in matrices:
        n = m.shape[0]
        total[:n, :n] += m
    return total


def accuracy(confusion: np.ndarray) -> float | None:
    """trace / total; None for an empty matrix."""
    total = int(confusion.sum())
    return None if total == 0 else float(np.trace(confusion)) / total


def macro_f1(confusion: np.ndarray) -> float | None:
    """Mean per-class F1 over the classes that occur as a true or a predicted label.

    F1 = 2 tp / (support + predicted); classes with neither support nor predictions say nothing
    about the model and are left out (scikit-learn would count them as 0 with a warning).
    """
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    present = (support + predicted) > 0
    if not present.any():
        return None
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def divergence(projections: Sequence[Sequence[float]]) -> float | None:
    """Mean pairwise Euclidean distance between weight projections; None with fewer than two."""
    if len(projections) < 2:
        return None
    vectors = [np.asarray(p, dtype=np.float64) for p in projections]
    distances = [float(np.linalg.norm(a - b)) for a, b in combinations(vectors, 2)]
    return float(np.mean(distances))
