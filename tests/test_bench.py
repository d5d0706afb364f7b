"""`p2pfl bench`: the shared machinery, the command line, and the overhead bench at tiny size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.bench import BENCHES
from p2pfl.bench.core import BenchResult, Figure, growth_per_doubling, machine, ratio


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "bench", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("value", "goal", "met"),
    [(1.1, "<= 1.2", True), (1.2, "<= 1.2", True), (1.3, "<= 1.2", False),
     (0.8, ">= 0.8", True), (0.5, "< 1", True), (1.0, "< 1", False),
     (None, "<= 1.2", None), (1.0, None, None)],
)  # fmt: skip
def test_a_figure_meets_its_goal_or_not(value: float | None, goal: str | None, met: bool | None):
    assert Figure("f", value, goal=goal).met is met


def test_figures_print_their_unit_and_missing_values() -> None:
    assert Figure("f", 1.0734).text() == "1.073x"
    assert Figure("f", 0.42, unit="%").text() == "0.420 %"
    assert Figure("f", None).text() == "n/a"


def test_growth_per_doubling_is_fitted_over_the_whole_range() -> None:
    assert growth_per_doubling([64, 128, 256], [1.0, 2.0, 4.0]) == pytest.approx(2.0)
    assert growth_per_doubling([64, 256, 1024], [5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert growth_per_doubling([64, 1024], [1.0, 256.0]) == pytest.approx(4.0)
    assert growth_per_doubling([64], [1.0]) is None
    assert ratio(3.0, 0.0) is None and ratio(3.0, 2.0) == 1.5


def test_a_result_carries_each_figures_verdict_in_json() -> None:
    result = BenchResult("x", "t", ["a"], rows=[{"a": 1}])
    result.figures.append(Figure("ratio", 2.0, goal="<= 1.5"))
    doc = result.as_json()
    assert doc["figures"] == [
        {"name": "ratio", "value": 2.0, "unit": "x", "goal": "<= 1.5", "note": "", "met": False}
    ]


def test_machine_facts_name_the_cpu_cores_memory_versions_and_commit() -> None:
    facts = machine()
    assert facts["cores"] >= 1 and facts["ram_gb"] > 0
    assert facts["cpu"] and facts["python"].startswith("3.") and facts["torch"]
    # This checkout is a git work tree: its commit is recorded (dirty or not).
    assert facts["commit"] is None or len(facts["commit"].split("-")[0]) == 12


def test_help_lists_every_bench() -> None:
    result = bench("--help")
    assert result.returncode == 0
    for name in BENCHES:
        assert name in result.stdout


def test_an_unknown_bench_is_one_line_and_exit_2() -> None:
    result = bench("speed", "--quick")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: unknown bench 'speed'; choose all or one of: {', '.join(BENCHES)}"
    ]
    assert "Traceback" not in result.stderr


def test_overhead_at_tiny_size_prints_its_ratio_and_writes_json(tmp_path: Path) -> None:
    result = bench("overhead", "--size", "tiny", "--json", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((tmp_path / "overhead.json").read_text())
    assert doc["bench"] == "overhead" and doc["size"] == "tiny"
    assert {"cpu", "cores", "ram_gb", "torch", "python", "commit"} <= doc["machine"].keys()
    (row,) = doc["rows"]
    assert row["nodes"] == 4 and row["rounds"] == 2
    assert row["bare loop s"] > 0 and row["simulator s"] > 0
    (figure,) = doc["figures"]
    assert figure["goal"] == "<= 1.2"
    assert math.isfinite(figure["value"]) and figure["value"] > 0
    assert figure["value"] == pytest.approx(row["simulator s"] / row["bare loop s"], rel=0.01)
    assert figure["met"] == (figure["value"] <= 1.2)
    assert "overhead, 4 nodes" in result.stderr  # the table went to stderr
