"""The attack bench: every attack with every merge rule and schedule, in one table.

`p2pfl sim SCENARIO --matrix` (or a scenario with `attacks` or `compare_merges`) runs the
scenario once per (attack, merge rule, schedule), with the same seed and rounds, and reports
the mean accuracy of the honest nodes at their last round. `clean` (no Byzantine node) always
comes first, so each row compares the attacks with the clean run of the same merge rule and
schedule. A scenario's `compare_dp` (e.g. `[1, 4, 16, "none"]`) adds a privacy axis: each line
is then also one DP budget (`dp_epsilon`, or `none`: no DP), with the most epsilon any node of
the line spent, and `plot_privacy` draws accuracy against epsilon. Each cell is an ordinary
single-schedule scenario (`cell_scenario`), run by the same
engine as any other; this module only lays the cells out and writes the table.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.table import Table

from p2pfl.simulation.report import sim_table
from p2pfl.simulation.scenario import Scenario

__all__ = [
    "MATRIX_FILES",
    "MatrixRow",
    "axes",
    "cell_scenario",
    "dp_label",
    "matrix_json",
    "matrix_markdown",
    "matrix_rows",
    "matrix_table",
    "plot_privacy",
    "privacy_axis",
    "write_matrix",
]

MATRIX_FILES = ("matrix.csv", "matrix.md", "matrix.json")


class MatrixRow(BaseModel):
    """One cell of the bench: mean honest accuracy, and its difference to the clean run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attack: str
    merge: str
    schedule: str
    honest_accuracy: float | None
    # honest_accuracy minus the clean run's (same merge rule and schedule); None without both.
    vs_clean: float | None
    # With a privacy axis (compare_dp): the line's DP budget ("none": no DP) and the most
    # epsilon any of its nodes spent. Left out of the files and JSON without one.
    dp_epsilon: str | None = None
    max_epsilon: float | None = None


Cell = tuple[str, str, str] | tuple[str, str, str, str]
"""(attack, merge, schedule), or with a privacy axis (attack, merge, schedule, dp label)."""

_PRIVACY_FIELDS = {"dp_epsilon", "max_epsilon"}


def dp_label(value: float | str | None) -> str:
    """`4`, `0.5` or `none`: how a DP budget of the privacy axis is written."""
    return "none" if value is None or value == "none" else f"{float(value):g}"


def privacy_axis(scenario: Scenario) -> tuple[str, ...]:
    """The DP budgets the bench runs, as labels (`compare_dp`); empty: no privacy axis."""
    return tuple(dp_label(v) for v in scenario.compare_dp)


def _private(rows: Sequence[MatrixRow]) -> bool:
    return any(r.dp_epsilon is not None for r in rows)


def _dump(row: MatrixRow, private: bool) -> dict[str, Any]:
    return row.model_dump(exclude=None if private else _PRIVACY_FIELDS)


def axes(scenario: Scenario) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The attacks (`clean` first) and merge rules the bench runs for `scenario`.

    Without `attacks`: clean, plus the `[faults.byzantine]` behaviour when some node is
    Byzantine. Without `compare_merges`: the node's merge rule.
    """
    attacks: list[str] = list(scenario.attacks)
    if not attacks and scenario.faults.byzantine_ids(scenario.node_ids, scenario.seed):
        attacks = [scenario.faults.byzantine.behaviour]
    attacks = ["clean", *(a for a in attacks if a != "clean")]
    merges = scenario.compare_merges or (scenario.node.merge,)
    return tuple(attacks), tuple(merges)


def cell_scenario(
    scenario: Scenario, attack: str, merge: str, schedule: str, dp: str | None = None
) -> Scenario:
    """The single run behind one cell: one schedule, one merge rule, one attack (or none),
    and with `dp` (a `dp_label`) one DP budget (`none`: DP off)."""
    node = scenario.node.model_dump(include=scenario.node.model_fields_set)
    node["merge"] = merge
    if dp is not None:
        node["dp_epsilon"] = None if dp == "none" else float(dp)
    faults = scenario.faults.model_dump()
    if attack == "clean":
        faults["byzantine"]["count"] = 0
    else:
        faults["byzantine"]["behaviour"] = attack
    data = scenario.model_dump(
        exclude={"node", "faults", "attacks", "compare_merges", "compare_dp"}
    )
    data.update(compare=[schedule], node=node, faults=faults)
    return Scenario.model_validate(data)


def matrix_rows(
    accuracies: Mapping[Cell, float | None],
    spent: Mapping[Cell, float | None] | None = None,
) -> list[MatrixRow]:
    """Rows from (attack, merge, schedule[, dp]) -> mean honest accuracy, in the mapping's
    order; `spent`: the most epsilon a node of each cell spent (privacy axis)."""
    rows = []
    for cell, acc in accuracies.items():
        attack, merge, schedule, *dp = cell
        clean_cell: Cell = ("clean", merge, schedule, dp[0]) if dp else ("clean", merge, schedule)
        clean = accuracies.get(clean_cell)
        delta = None if acc is None or clean is None else round(acc - clean, 6)
        rows.append(MatrixRow(attack=attack, merge=merge, schedule=schedule,
                              honest_accuracy=acc, vs_clean=delta,
                              dp_epsilon=dp[0] if dp else None,
                              max_epsilon=(spent or {}).get(cell)))  # fmt: skip
    return rows


Line = tuple[str, str, str | None]
"""A line of the table: (schedule, merge rule, DP budget or None)."""


def _layout(
    rows: Sequence[MatrixRow],
) -> tuple[list[str], list[Line], dict[tuple[str, str, str | None, str], MatrixRow]]:
    """Attack columns, (schedule, merge, dp) lines, and the cells by (*line, attack)."""
    attacks = list(dict.fromkeys(r.attack for r in rows))
    lines = list(dict.fromkeys((r.schedule, r.merge, r.dp_epsilon) for r in rows))
    cells = {(r.schedule, r.merge, r.dp_epsilon, r.attack): r for r in rows}
    return attacks, lines, cells


def _spent(cells: Iterable[MatrixRow | None]) -> str:
    values = [c.max_epsilon for c in cells if c is not None and c.max_epsilon is not None]
    return "—" if not values else f"{max(values):.2f}"


def _worst(cells: Iterable[MatrixRow | None]) -> float | None:
    deltas = [c.vs_clean for c in cells if c is not None and c.vs_clean is not None]
    return min(deltas) if deltas else None


def _acc(row: MatrixRow | None) -> str:
    return "—" if row is None or row.honest_accuracy is None else f"{row.honest_accuracy:.3f}"


def _points(delta: float | None) -> str:
    return "—" if delta is None else f"{100 * delta:+.1f}"


def matrix_table(rows: Sequence[MatrixRow], scenario: str) -> Table:
    """One line per (schedule, merge rule[, DP budget]), one column per attack, clean first;
    then the worst attack's difference to clean, in accuracy points (when there is an
    attack), and with a privacy axis the most epsilon a node of the line spent."""
    attacks, lines, cells = _layout(rows)
    private = _private(rows)
    attacked = attacks != ["clean"] or not private
    # min_width: room for the title and caption above a bench of one or two attacks
    table = sim_table(f"{scenario}: mean honest accuracy", min_width=72)
    table.add_column("merge", no_wrap=True)
    if private:
        table.add_column("dp\nepsilon", justify="right", no_wrap=True)
    for attack in attacks:
        table.add_column(attack, justify="right", no_wrap=True)
    if attacked:
        table.add_column("worst\nvs clean", justify="right", no_wrap=True)
    if private:
        table.add_column("epsilon\nspent", justify="right", no_wrap=True)
    previous = None
    for schedule, merge, dp in lines:
        row = [cells.get((schedule, merge, dp, a)) for a in attacks]
        table.add_row(
            schedule if schedule != previous else "",
            merge,
            *([dp or "—"] if private else []),
            *(_acc(c) for c in row),
            *([_points(_worst(row))] if attacked else []),
            *([_spent(row)] if private else []),
        )
        previous = schedule
    table.caption = "honest nodes' accuracy at their last round"
    if attacked:
        table.caption += "; worst vs clean in points"
    if private:
        table.caption += "; epsilon spent: the most any node spent (budget: dp epsilon)"
    return table


def matrix_markdown(rows: Sequence[MatrixRow]) -> str:
    """The same table in Markdown, for a README."""
    attacks, lines, cells = _layout(rows)
    private = _private(rows)
    attacked = attacks != ["clean"] or not private
    header = [
        "schedule",
        "merge",
        *(["dp epsilon"] if private else []),
        *attacks,
        *(["worst vs clean (points)"] if attacked else []),
        *(["epsilon spent (max)"] if private else []),
    ]
    rule = ["---", "---", *["--:"] * (len(header) - 2)]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for schedule, merge, dp in lines:
        row = [cells.get((schedule, merge, dp, a)) for a in attacks]
        values = [
            schedule,
            merge,
            *([dp or "—"] if private else []),
            *(_acc(c) for c in row),
            *([_points(_worst(row))] if attacked else []),
            *([_spent(row)] if private else []),
        ]
        out.append("| " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def matrix_json(rows: Sequence[MatrixRow], scenario: str) -> str:
    """`{"scenario": ..., "rows": [...]}` as stable, indented JSON text."""
    private = _private(rows)
    data: dict[str, Any] = {"scenario": scenario, "rows": [_dump(r, private) for r in rows]}
    return json.dumps(data, indent=2) + "\n"


def write_matrix(rows: Sequence[MatrixRow], scenario: str, out_dir: Path) -> list[Path]:
    """Write `matrix.csv`, `matrix.md` and `matrix.json` into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    private = _private(rows)
    fields = [f for f in MatrixRow.model_fields if private or f not in _PRIVACY_FIELDS]
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(_dump(row, private))
    contents = (text.getvalue(), matrix_markdown(rows), matrix_json(rows, scenario))
    paths = [out_dir / name for name in MATRIX_FILES]
    for path, content in zip(paths, contents, strict=True):
        path.write_text(content, encoding="utf-8")
    return paths


PRIVACY_PLOT = "accuracy_vs_epsilon.png"


def plot_privacy(rows: Sequence[MatrixRow], out_dir: Path) -> Path | None:
    """Accuracy against the DP budget, one line per (schedule, merge rule, attack); the run
    without DP as a dashed level. Written as `accuracy_vs_epsilon.png`; None without DP rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    private = [r for r in rows if r.dp_epsilon is not None]
    if not any(r.dp_epsilon != "none" for r in private):
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    series = list(dict.fromkeys((r.schedule, r.merge, r.attack) for r in private))
    for i, key in enumerate(series):
        mine = [r for r in private if (r.schedule, r.merge, r.attack) == key]
        points = sorted(
            (float(r.dp_epsilon), r.honest_accuracy)
            for r in mine
            if r.dp_epsilon not in (None, "none") and r.honest_accuracy is not None
        )
        label = " · ".join(k for k in key if k != "clean")
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i % 10}",
                label=f"{label}, DP-SGD")  # fmt: skip
        for r in mine:
            if r.dp_epsilon == "none" and r.honest_accuracy is not None:
                ax.axhline(r.honest_accuracy, color=f"C{i % 10}", linestyle="--",
                           label=f"{label}, no DP")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="privacy budget epsilon (delta fixed), log scale",
           ylabel="test accuracy, mean of honest nodes",
           title="Accuracy against the differential-privacy budget")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    FigureCanvasAgg(fig)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PRIVACY_PLOT
    fig.savefig(path, dpi=110)
    return path
