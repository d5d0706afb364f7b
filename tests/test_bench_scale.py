"""`p2pfl bench scale` at its tiny size, through the real CLI: well-formed JSON with a row per
size (each from its own `p2pfl sim` child process) and a growth figure per column."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from p2pfl.bench.scale import COLUMNS, _from_records
from tests.helpers import run_bench


def record(node: str, rnd: int, t: float, round_seconds: float, membership: int) -> dict[str, Any]:
    return {"node": node, "round": rnd, "t": t, "round_seconds": round_seconds,
            "membership_received": membership}  # fmt: skip


def test_start_up_ends_when_the_last_node_begins_its_first_round() -> None:
    records = [
        record("a", 1, 10.0, 2.0, 3), record("b", 1, 11.0, 1.0, 4),  # began at 8 and 10
        record("a", 2, 13.0, 3.0, 5), record("b", 3, 16.0, 5.0, 7),  # b caught up to round 3
        record("a", 3, 16.0, 3.0, 6),
    ]  # fmt: skip
    row = _from_records(records, nodes=2)
    assert row["done"] == 3
    assert row["start-up s"] == 10.0
    assert row["wall/round s"] == 2.0  # (16 - 10) / 3
    assert row["membership msgs/node/round"] == 2.2  # (6 + 7) / 2 nodes / 3 rounds
    assert row["membership msgs/node/s"] == 0.41  # (6 + 7) / 2 nodes / 16 s
    # a node that never reported: the size measured nothing
    nothing = dict.fromkeys(c for c in COLUMNS if c != "peak RSS MB")
    assert _from_records(records, nodes=3) == {"done": 0, **nothing}


@pytest.mark.slow  # two child simulations: about half a minute on 2 cores
def test_scale_bench_writes_a_row_per_size_and_a_growth_figure_per_column(tmp_path: Path) -> None:
    doc = run_bench("scale", tmp_path, timeout=300)
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
