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

A scenario's `seeds` (e.g. `[0, 1, 2]`) runs every cell once per seed, each with its own data
split, initial models, Byzantine nodes and network draws, and each cell of the table is the
mean over the seeds (`vs_clean` compares means over the same seeds); the rows keep every
seed's figure (`per_seed`). One seed's last round is noisy on sparse schedules (a ring node
that heard only a Byzantine peer that round), so the bench's figures are meant as such means.
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
    "mean_over_seeds",
    "plot_privacy",
    "privacy_axis",
    "seed_axis",
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
    # With a seed axis (seeds): each seed's honest accuracy; honest_accuracy is their mean.
    # Left out of the files and JSON without one.
    per_seed: dict[int, float | None] | None = None


Cell = tuple[str, str, str] | tuple[str, str, str, str]
"""(attack, merge, schedule), or with a privacy axis (attack, merge, schedule, dp label)."""

_PRIVACY_FIELDS = {"dp_epsilon", "max_epsilon"}
_SEED_FIELDS = {"per_seed"}


def dp_label(value: float | str | None) -> str:
    """`4`, `0.5` or `none`: how a DP budget of the privacy axis is written."""
    return "none" if value is None or value == "none" else f"{float(value):g}"


def privacy_axis(scenario: Scenario) -> tuple[str, ...]:
    """The DP budgets the bench runs, as labels (`compare_dp`); empty: no privacy axis."""
    return tuple(dp_label(v) for v in scenario.compare_dp)


def _private(rows: Sequence[MatrixRow]) -> bool:
    return any(r.dp_epsilon is not None for r in rows)


def _seeds(rows: Sequence[MatrixRow]) -> list[int]:
    """The seeds the rows' figures are means over; empty without a seed axis."""
    return list(dict.fromkeys(s for r in rows for s in (r.per_seed or {})))


def _dump(row: MatrixRow, private: bool) -> dict[str, Any]:
    left_out = (set() if private else _PRIVACY_FIELDS) | (set() if row.per_seed else _SEED_FIELDS)
    return row.model_dump(exclude=left_out)


def seed_axis(scenario: Scenario) -> tuple[int, ...]:
    """The seeds the bench runs each cell with: `seeds`, else the node's seed alone."""
    return scenario.seeds or (scenario.seed,)


def mean_over_seeds(values: Mapping[int, float | None]) -> float | None:
    """A cell's figure over its seeds: their mean; None when some seed has none (no honest
    node reported), so that a cell never averages fewer seeds than its clean run."""
    known = [v for v in values.values() if v is not None]
    if not known or len(known) < len(values):
        return None
    return round(sum(known) / len(known), 6)


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
    scenario: Scenario,
    attack: str,
    merge: str,
    schedule: str,
    dp: str | None = None,
    *,
    seed: int | None = None,
) -> Scenario:
    """The single run behind one cell: one schedule, one merge rule, one attack (or none),
    with `dp` (a `dp_label`) one DP budget (`none`: DP off), and with `seed` that seed."""
    node = scenario.node.model_dump(include=scenario.node.model_fields_set)
    node["merge"] = merge
    if seed is not None:
        node["seed"] = seed
    if dp is not None:
        node["dp_epsilon"] = None if dp == "none" else float(dp)
    faults = scenario.faults.model_dump()
    if attack == "clean":
        faults["byzantine"]["count"] = 0
    else:
        faults["byzantine"]["behaviour"] = attack
    data = scenario.model_dump(
        exclude={"node", "faults", "attacks", "compare_merges", "compare_dp", "seeds"}
    )
    data.update(compare=[schedule], node=node, faults=faults)
    return Scenario.model_validate(data)


def matrix_rows(
    accuracies: Mapping[Cell, float | None],
    spent: Mapping[Cell, float | None] | None = None,
    per_seed: Mapping[Cell, Mapping[int, float | None]] | None = None,
) -> list[MatrixRow]:
    """Rows from (attack, merge, schedule[, dp]) -> mean honest accuracy, in the mapping's
    order; `spent`: the most epsilon a node of each cell spent (privacy axis); `per_seed`:
    each cell's accuracy by seed (seed axis; `accuracies` then holds their means)."""
    rows = []
    for cell, acc in accuracies.items():
        attack, merge, schedule, *dp = cell
        clean_cell: Cell = ("clean", merge, schedule, dp[0]) if dp else ("clean", merge, schedule)
        clean = accuracies.get(clean_cell)
        delta = None if acc is None or clean is None else round(acc - clean, 6)
        by_seed = None if per_seed is None else dict(per_seed[cell])
        rows.append(MatrixRow(attack=attack, merge=merge, schedule=schedule,
                              honest_accuracy=acc, vs_clean=delta,
                              dp_epsilon=dp[0] if dp else None,
                              max_epsilon=(spent or {}).get(cell), per_seed=by_seed))  # fmt: skip
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
    table = sim_table(f"{scenario}: mean honest accuracy{_over(rows)}", min_width=72)
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
    table.caption = f"honest nodes' accuracy at their last round{_over(rows)}"
    if attacked:
        table.caption += "; worst vs clean in points"
    if private:
        table.caption += "; epsilon spent: the most any node spent (budget: dp epsilon)"
    return table


def _over(rows: Sequence[MatrixRow]) -> str:
    """`, mean over seeds 0, 1, 2` with a seed axis (`, seed 3` for one); else nothing."""
    seeds = _seeds(rows)
    if len(seeds) == 1:
        return f", seed {seeds[0]}"
    return f", mean over seeds {', '.join(map(str, seeds))}" if seeds else ""


def matrix_markdown(rows: Sequence[MatrixRow]) -> str:
    """The same table in Markdown, for a README (with a seed axis, a line under it says
    which seeds it is the mean over)."""
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
    if over := _over(rows):  # a table of means says so under it
        out += ["", f"Honest nodes' accuracy at their last round{over}."]
    return "\n".join(out) + "\n"


def matrix_json(rows: Sequence[MatrixRow], scenario: str) -> str:
    """`{"scenario": ..., "rows": [...]}` as stable, indented JSON text; with a seed axis
    also `"seeds": [...]`, and each row's `per_seed` (seed -> accuracy, keys as text)."""
    private = _private(rows)
    data: dict[str, Any] = {"scenario": scenario}
    if seeds := _seeds(rows):
        data["seeds"] = seeds
    data["rows"] = [_dump(r, private) for r in rows]
    return json.dumps(data, indent=2) + "\n"


def write_matrix(rows: Sequence[MatrixRow], scenario: str, out_dir: Path) -> list[Path]:
    """Write `matrix.csv`, `matrix.md` and `matrix.json` into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    private = _private(rows)
    seeds = _seeds(rows)
    fields = [f for f in MatrixRow.model_fields
              if (private or f not in _PRIVACY_FIELDS) and f not in _SEED_FIELDS]  # fmt: skip
    fields += [f"accuracy_seed_{s}" for s in seeds]  # one column per seed
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = _dump(row, private)
        by_seed = flat.pop("per_seed", None) or {}
        writer.writerow(flat | {f"accuracy_seed_{s}": by_seed.get(s) for s in seeds})
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
