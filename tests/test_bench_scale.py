"""`p2pfl bench scale` at its tiny size, through the real CLI: well-formed JSON with a row per
size (each from its own `p2pfl sim` child process) and a growth figure per column."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.bench.scale import COLUMNS

pytestmark = pytest.mark.slow  # two child simulations: about half a minute on 2 cores


def test_scale_bench_writes_a_row_per_size_and_a_growth_figure_per_column(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "bench", "scale", "--size", "tiny", "--json",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert doc == json.loads((tmp_path / "scale.json").read_text())
    assert doc["bench"] == "scale" and doc["size"] == "tiny" and "error" not in doc
    assert doc["machine"]["cores"] >= 1
    rows = doc["rows"]
    assert [r["nodes"] for r in rows] == [8, 16]
    for row in rows:
        assert row["status"] == "ok", row
        for column in COLUMNS:
            assert isinstance(row[column], float) and row[column] > 0, (column, row)
        # every node hears at least every other node's presence once
        assert row["membership msgs/node/round"] >= row["nodes"] - 1
    figures = {f["name"]: f for f in doc["figures"]}
    assert set(figures) == {f"{c}, growth per doubling" for c in COLUMNS}
    for figure in figures.values():
        assert math.isfinite(figure["value"]) and figure["value"] > 0, figure
        assert figure["note"] == "8 to 16 nodes"
