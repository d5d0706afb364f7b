"""The attack bench's layout and table: cells, clean rows, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from p2pfl.config import ConfigError
from p2pfl.simulation import matrix
from p2pfl.simulation.matrix import (
    axes,
    cell_scenario,
    matrix_markdown,
    matrix_rows,
    matrix_table,
    plot_privacy,
    privacy_axis,
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


def test_compare_dp_adds_a_privacy_axis_of_single_runs() -> None:
    bench = load_scenario(SIM_DIR / "dp.toml", {})
    assert privacy_axis(bench) == ("1", "4", "16", "none")
    assert axes(bench) == (("clean",), ("average",))
    cell = cell_scenario(bench, "clean", "average", "partial-mesh", "4")
    assert cell.node.dp_epsilon == 4.0 and cell.compare_dp == ()
    assert cell.node.model_dump(exclude={"dp_epsilon"}) == bench.node.model_dump(
        exclude={"dp_epsilon"}
    )
    assert cell_scenario(bench, "clean", "average", "partial-mesh", "none").node.dp_epsilon is None
    # --dp-epsilon narrows the axis to one budget, as --merge does compare_merges.
    one = load_scenario(SIM_DIR / "dp.toml", {"dp_epsilon": 8.0})
    assert privacy_axis(one) == () and one.node.dp_epsilon == 8.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("compare_dp = [0]", "compare_dp"),
        ('compare_dp = ["lots"]', "compare_dp"),
        ("compare_dp = [4, 4]", "listed twice"),
        ("compare_dp = [4]\n[node]\nduration = 10.0", "planned number of rounds"),
    ],
)
def test_bad_compare_dp_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'name = "s"\n{text}\n')
    with pytest.raises(ConfigError, match=needle):
        load_scenario(path, {})


PRIVATE = {
    ("clean", "average", "partial-mesh", "1"): 0.5,
    ("clean", "average", "partial-mesh", "16"): 0.8,
    ("clean", "average", "partial-mesh", "none"): 0.9,
}


def test_the_privacy_table_files_and_plot(tmp_path: Path) -> None:
    rows = matrix_rows(PRIVATE, {("clean", "average", "partial-mesh", "1"): 0.99,
                                 ("clean", "average", "partial-mesh", "16"): 15.9})  # fmt: skip
    markdown = matrix_markdown(rows).splitlines()
    assert markdown[0] == "| schedule | merge | dp epsilon | clean | epsilon spent (max) |"
    assert markdown[2] == "| partial-mesh | average | 1 | 0.500 | 0.99 |"
    assert markdown[4] == "| partial-mesh | average | none | 0.900 | — |"
    console = Console(record=True, width=120)
    console.print(matrix_table(rows, "dp"))
    assert "15.90" in console.export_text() and "worst" not in console.export_text()
    write_matrix(rows, "dp", tmp_path)
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["rows"][0]["dp_epsilon"] == "1" and data["rows"][0]["max_epsilon"] == 0.99
    assert "dp_epsilon" in (tmp_path / "matrix.csv").read_text().splitlines()[0]
    # Without a privacy axis the files keep their columns (see test_the_matrix_files).
    plot = plot_privacy(rows, tmp_path)
    assert plot is not None and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_privacy(matrix_rows(ACCURACIES), tmp_path / "none") is None


def test_seeds_make_a_seed_axis_of_single_seed_runs() -> None:
    bench = load_scenario(SIM_DIR / "attacks.toml", {})
    assert bench.seeds == (0, 1, 2) and matrix.seed_axis(bench) == (0, 1, 2)
    cell = cell_scenario(bench, "alie", "clipped", "ring", seed=2)
    assert cell.seed == 2 and cell.seeds == () and cell.compare == ("ring",)
    assert cell.node.model_dump(exclude={"seed"}) == bench.node.model_dump(exclude={"seed"})
    assert cell_scenario(bench, "alie", "clipped", "ring").seed == bench.seed
    # --seed runs one seed, as --merge runs one rule; --seeds (text) replaces the list
    one = load_scenario(SIM_DIR / "attacks.toml", {"seed": 5})
    assert (one.seeds, matrix.seed_axis(one)) == ((), (5,))
    two = load_scenario(SIM_DIR / "attacks.toml", {"seeds": "3, 4"})
    assert (two.seeds, matrix.seed_axis(two)) == ((3, 4), (3, 4))
    assert matrix.seed_axis(load_scenario(None, {})) == (0,)


@pytest.mark.parametrize(
    ("seeds", "needle"),
    [("[1, 1]", "listed twice"), ("[-1]", ">= 0"), ('"0,x"', "seeds")],
)
def test_bad_seeds_are_one_line(tmp_path: Path, seeds: str, needle: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f'name = "s"\nseeds = {seeds}\n[node]\nrounds = 3\n')
    with pytest.raises(ConfigError, match=needle):
        load_scenario(path, {})


def test_a_cell_over_seeds_is_their_mean_or_nothing() -> None:
    assert matrix.mean_over_seeds({0: 0.9, 1: 0.6, 2: 0.75}) == 0.75
    assert matrix.mean_over_seeds({0: 0.9}) == 0.9
    # a seed where no honest node reported leaves the cell empty, not a mean of fewer seeds
    assert matrix.mean_over_seeds({0: 0.9, 1: None}) is None


SEEDED = {
    ("clean", "clipped", "ring"): {0: 0.9, 1: 0.8},
    ("ipm", "clipped", "ring"): {0: 0.7, 1: 0.8},
}


def test_the_table_of_seed_means_says_so_and_keeps_each_seed(tmp_path: Path) -> None:
    means = {cell: matrix.mean_over_seeds(by_seed) for cell, by_seed in SEEDED.items()}
    rows = matrix_rows(means, per_seed=SEEDED)
    assert [(r.honest_accuracy, r.vs_clean) for r in rows] == [(0.85, 0.0), (0.75, -0.1)]
    console = Console(record=True, width=120)
    console.print(matrix_table(rows, "bench"))
    text = console.export_text()
    assert "mean over seeds 0, 1" in text and "0.750" in text and "-10.0" in text
    markdown = matrix_markdown(rows).splitlines()
    assert markdown[2] == "| ring | clipped | 0.850 | 0.750 | -10.0 |"
    assert markdown[-1] == "Honest nodes' accuracy at their last round, mean over seeds 0, 1."
    write_matrix(rows, "bench", tmp_path)
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert data["seeds"] == [0, 1]
    assert data["rows"][1]["per_seed"] == {"0": 0.7, "1": 0.8}
    with (tmp_path / "matrix.csv").open() as f:
        table = list(csv.DictReader(f))
    assert (table[1]["honest_accuracy"], table[1]["accuracy_seed_0"]) == ("0.75", "0.7")
    assert "per_seed" not in table[1]
