"""`p2pfl monitor --plot FILE.png`: the global accuracy and divergence over the monitored time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

History = Sequence[tuple[float, float | None, float | None]]
"""(wall time, global accuracy, divergence) per snapshot."""


def write_plot(history: History, path: Path, network: str) -> None:
    """Write a two-panel PNG (matplotlib's object API, Agg: no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start = history[0][0] if history else 0.0
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, div_ax = fig.subplots(2, 1, sharex=True)
    for ax, column, label in ((acc_ax, 1, "global accuracy"), (div_ax, 2, "divergence")):
        points = [(row[0] - start, row[column]) for row in history]
        xs = [x for x, y in points if y is not None]
        ys = [y for _, y in points if y is not None]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    acc_ax.set_title(f"p2pfl network {network!r}")
    div_ax.set_xlabel("seconds since the monitor started")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
