"""`p2pfl bench batched` at its tiny size, through the real CLI: the node engine's learners and
both stacked paths on the same 32 nodes, and figures that are the table's ratios (no timing is
asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_bench

pytestmark = pytest.mark.timeout(300)


def test_batched_bench_times_one_round_stacked_and_one_node_at_a_time(tmp_path: Path) -> None:
    doc = run_bench("batched", tmp_path, timeout=280)
    baseline, vmapped, written = doc["rows"]
    assert baseline["engine"] == "node engine's learners, one per node"
    assert (vmapped["engine"], written["engine"]) == (
        "batched engine, vmap",
        "batched engine, written out",
    )
    assert {row["nodes"] for row in doc["rows"]} == {32}
    assert baseline["training s"] is None and baseline["speed-up"] == pytest.approx(1.0)
    for row in (vmapped, written):
        assert row["training s"] > 0 and row["evaluation s"] > 0
        assert row["round s"] == pytest.approx(row["training s"] + row["evaluation s"], abs=2e-3)
        assert row["speed-up"] == pytest.approx(baseline["round s"] / row["round s"], rel=1e-2)
    figures = {f["name"]: f["value"] for f in doc["figures"]}
    assert figures == {
        "batched (vmap) vs one node at a time": vmapped["speed-up"],
        "batched (written out) vs one node at a time": written["speed-up"],
        "written out vs vmap": pytest.approx(vmapped["round s"] / written["round s"], rel=1e-2),
    }
