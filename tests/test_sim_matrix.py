"""The attack bench's layout and table: cells, clean rows, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console

from p2pfl.simulation.matrix import (
    axes,
    cell_scenario,
    matrix_markdown,
    matrix_rows,
    matrix_table,
    write_matrix,
)
from p2pfl.simulation.scenario import load_scenario

SIM_DIR = Path(__file__).resolve().parent.parent / "sim"

ACCURACIES = {
    ("clean", "average", "ring"): 0.9,
    ("alie", "average", "ring"): 0.6,
    ("ipm", "average", "ring"): 0.85,
    ("clean", "median", "ring"): 0.88,
    ("alie", "median", "ring"): 0.87,
    ("ipm", "median", "ring"): None,  # no honest node reported
}


def test_axes_put_clean_first_and_default_to_the_scenario_settings() -> None:
    bench = load_scenario(SIM_DIR / "attacks.toml", {})
    attacks, merges = axes(bench)
    assert attacks[0] == "clean" and len(attacks) == 8 and merges == bench.compare_merges
    byz = load_scenario(SIM_DIR / "byzantine.toml", {})  # no bench keys: what the file says
    assert axes(byz) == (("clean", "scaled"), (byz.node.merge,))
    default = load_scenario(None, {})  # nobody Byzantine: the clean run only
    assert axes(default) == (("clean",), (default.node.merge,))


def test_a_cell_is_a_single_run_of_the_same_scenario() -> None:
    bench = load_scenario(SIM_DIR / "attacks.toml", {})
    cell = cell_scenario(bench, "alie", "average", "ring")
    assert cell.compare == ("ring",) and cell.node.merge == "average"
    assert cell.faults.byzantine.behaviour == "alie" and cell.faults.byzantine.count == 4
    assert (cell.attacks, cell.compare_merges) == ((), ())
    assert (cell.seed, cell.node.rounds, cell.nodes) == (bench.seed, bench.node.rounds, 16)
    assert cell.node.model_dump(exclude={"merge"}) == bench.node.model_dump(exclude={"merge"})
    clean = cell_scenario(bench, "clean", "clipped", "partial-mesh")
    assert clean.faults.byzantine_ids(clean.node_ids, clean.seed) == []
    # the same nodes are Byzantine in every attacked cell
    other = cell_scenario(bench, "ipm", "clipped", "partial-mesh")
    assert other.faults.byzantine_ids(other.node_ids, 0) == cell.faults.byzantine_ids(
        cell.node_ids, 0
    )


def test_rows_compare_each_attack_with_the_clean_run_of_its_line() -> None:
    rows = {(r.attack, r.merge, r.schedule): r for r in matrix_rows(ACCURACIES)}
    assert len(rows) == 6
    assert rows[("clean", "average", "ring")].vs_clean == 0.0
    assert rows[("alie", "average", "ring")].vs_clean == -0.3
    assert rows[("alie", "median", "ring")].vs_clean == -0.01
    assert rows[("ipm", "median", "ring")].vs_clean is None


def test_the_table_has_a_line_per_schedule_and_merge_and_a_column_per_attack() -> None:
    rows = matrix_rows(ACCURACIES)
    console = Console(record=True, width=120)
    console.print(matrix_table(rows, "bench"))
    text = console.export_text()
    assert "clean" in text and "alie" in text and "ipm" in text
    assert "0.600" in text and "-30.0" in text and "-1.0" in text and "—" in text
    markdown = matrix_markdown(rows).splitlines()
    assert markdown[0] == "| schedule | merge | clean | alie | ipm | worst vs clean (points) |"
    assert markdown[2] == "| ring | average | 0.900 | 0.600 | 0.850 | -30.0 |"
    assert markdown[3] == "| ring | median | 0.880 | 0.870 | — | -1.0 |"


def test_the_matrix_files(tmp_path: Path) -> None:
    rows = matrix_rows(ACCURACIES)
    paths = write_matrix(rows, "bench", tmp_path)
    assert [p.name for p in paths] == ["matrix.csv", "matrix.md", "matrix.json"]
    with (tmp_path / "matrix.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["attack"], r["merge"], r["schedule"]) for r in table] == list(ACCURACIES)
    assert table[1]["honest_accuracy"] == "0.6" and table[5]["honest_accuracy"] == ""
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["scenario"] == "bench" and data["rows"][0] == {
        "attack": "clean", "merge": "average", "schedule": "ring",
        "honest_accuracy": 0.9, "vs_clean": 0.0,
    }  # fmt: skip
