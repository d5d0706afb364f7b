"""`p2pfl bench convergence` at its tiny size, through the real CLI: a row per schedule and one
for centralized training measured in the same run, and each schedule's accuracy against it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from p2pfl.bench.convergence import CENTRALIZED, SCHEDULES, TARGETS
from tests.helpers import run_bench

pytestmark = pytest.mark.slow  # three simulations and a centralized run: about 30 s on 2 cores


def test_convergence_bench_compares_each_schedule_with_centralized(tmp_path: Path) -> None:
    doc = run_bench("convergence", tmp_path, timeout=300)
    rows = {r["run"]: r for r in doc["rows"]}
    assert list(rows) == [*SCHEDULES, CENTRALIZED]
    for row in rows.values():
        assert row["rounds"] == 1
        assert 0 < row["final min acc"] <= row["final mean acc"] <= 1
        for target in TARGETS:
            cells = [row[f"{what} to {target:.2f}"] for what in ("rounds", "s", "MB")]
            # either all "not reached", or the round, seconds and megabytes it took
            assert cells == ["not reached"] * 3 or (cells[0] == 1 and cells[1] > 0), cells
            shown = row[f"to {target:.2f}"]  # the table's cell says the same
            if cells[0] == "not reached":
                assert shown == "not reached"
            else:
                assert shown.startswith("round 1, "), shown
    assert all(rows[s][f"MB to {TARGETS[0]:.2f}"] != 0 for s in SCHEDULES)  # gossip costs bytes
    figures = {f["name"]: f for f in doc["figures"]}
    assert set(figures) == {f"{s}: final mean accuracy / centralized" for s in SCHEDULES}
    central = rows[CENTRALIZED]["final mean acc"]
    for schedule in SCHEDULES:
        value = figures[f"{schedule}: final mean accuracy / centralized"]["value"]
        assert math.isfinite(value) and value > 0
        assert value == pytest.approx(rows[schedule]["final mean acc"] / central, rel=1e-3)
