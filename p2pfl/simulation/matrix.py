"""The attack bench: every attack with every merge rule and schedule, in one table.

`p2pfl sim SCENARIO --matrix` (or a scenario with `attacks` or `compare_merges`) runs the
scenario once per (attack, merge rule, schedule), with the same seed and rounds, and reports
the mean accuracy of the honest nodes at their last round. `clean` (no Byzantine node) always
comes first, so each row compares the attacks with the clean run of the same merge rule and
schedule. Each cell is an ordinary single-schedule scenario (`cell_scenario`), run by the same
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
from rich import box
from rich.table import Table

from p2pfl.simulation.scenario import Scenario

__all__ = [
    "MATRIX_FILES",
    "MatrixRow",
    "axes",
    "cell_scenario",
    "matrix_json",
    "matrix_markdown",
    "matrix_rows",
    "matrix_table",
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


def cell_scenario(scenario: Scenario, attack: str, merge: str, schedule: str) -> Scenario:
    """The single run behind one cell: one schedule, one merge rule, one attack (or none)."""
    node = scenario.node.model_dump(include=scenario.node.model_fields_set)
    node["merge"] = merge
    faults = scenario.faults.model_dump()
    if attack == "clean":
        faults["byzantine"]["count"] = 0
    else:
        faults["byzantine"]["behaviour"] = attack
    data = scenario.model_dump(exclude={"node", "faults", "attacks", "compare_merges"})
    data.update(compare=[schedule], node=node, faults=faults)
    return Scenario.model_validate(data)


def matrix_rows(
    accuracies: Mapping[tuple[str, str, str], float | None],
) -> list[MatrixRow]:
    """Rows from (attack, merge, schedule) -> mean honest accuracy, in the mapping's order."""
    rows = []
    for (attack, merge, schedule), acc in accuracies.items():
        clean = accuracies.get(("clean", merge, schedule))
        delta = None if acc is None or clean is None else round(acc - clean, 6)
        rows.append(MatrixRow(attack=attack, merge=merge, schedule=schedule,
                              honest_accuracy=acc, vs_clean=delta))  # fmt: skip
    return rows


def _layout(
    rows: Sequence[MatrixRow],
) -> tuple[list[str], list[tuple[str, str]], dict[tuple[str, str, str], MatrixRow]]:
    """Attack columns, (schedule, merge) lines, and the cells by (schedule, merge, attack)."""
    attacks = list(dict.fromkeys(r.attack for r in rows))
    lines = list(dict.fromkeys((r.schedule, r.merge) for r in rows))
    cells = {(r.schedule, r.merge, r.attack): r for r in rows}
    return attacks, lines, cells


def _worst(cells: Iterable[MatrixRow | None]) -> float | None:
    deltas = [c.vs_clean for c in cells if c is not None and c.vs_clean is not None]
    return min(deltas) if deltas else None


def _acc(row: MatrixRow | None) -> str:
    return "—" if row is None or row.honest_accuracy is None else f"{row.honest_accuracy:.3f}"


def _points(delta: float | None) -> str:
    return "—" if delta is None else f"{100 * delta:+.1f}"


def matrix_table(rows: Sequence[MatrixRow], scenario: str) -> Table:
    """One line per (schedule, merge rule), one column per attack, clean first; the last
    column is the worst attack's difference to clean, in accuracy points."""
    attacks, lines, cells = _layout(rows)
    table = Table(
        title=f"p2pfl sim — {scenario}: mean honest accuracy",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        min_width=72,  # room for the title and caption above a bench of one or two attacks
    )
    table.add_column("schedule", style="cyan", no_wrap=True)
    table.add_column("merge", no_wrap=True)
    for attack in attacks:
        table.add_column(attack, justify="right", no_wrap=True)
    table.add_column("worst\nvs clean", justify="right", no_wrap=True)
    previous = None
    for schedule, merge in lines:
        row = [cells.get((schedule, merge, a)) for a in attacks]
        table.add_row(
            schedule if schedule != previous else "",
            merge,
            *(_acc(c) for c in row),
            _points(_worst(row)),
        )
        previous = schedule
    table.caption = "honest nodes' accuracy at their last round; worst vs clean in points"
    return table


def matrix_markdown(rows: Sequence[MatrixRow]) -> str:
    """The same table in Markdown, for a README."""
    attacks, lines, cells = _layout(rows)
    header = ["schedule", "merge", *attacks, "worst vs clean (points)"]
    rule = ["---", "---", *["--:"] * (len(header) - 2)]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for schedule, merge in lines:
        row = [cells.get((schedule, merge, a)) for a in attacks]
        values = [schedule, merge, *(_acc(c) for c in row), _points(_worst(row))]
        out.append("| " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def matrix_json(rows: Sequence[MatrixRow], scenario: str) -> str:
    """`{"scenario": ..., "rows": [...]}` as stable, indented JSON text."""
    data: dict[str, Any] = {"scenario": scenario, "rows": [r.model_dump() for r in rows]}
    return json.dumps(data, indent=2) + "\n"


def write_matrix(rows: Sequence[MatrixRow], scenario: str, out_dir: Path) -> list[Path]:
    """Write `matrix.csv`, `matrix.md` and `matrix.json` into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(MatrixRow.model_fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.model_dump())
    contents = (text.getvalue(), matrix_markdown(rows), matrix_json(rows, scenario))
    paths = [out_dir / name for name in MATRIX_FILES]
    for path, content in zip(paths, contents, strict=True):
        path.write_text(content, encoding="utf-8")
    return paths
