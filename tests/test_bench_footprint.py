"""`p2pfl bench footprint` at its tiny size, through the real CLI: a real idle `p2pfl run`
and a real `p2pfl monitor`, and well-formed JSON (no timing is asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import run_bench

pytestmark = pytest.mark.timeout(240)


def test_footprint_bench_measures_an_idle_daemon_alone_and_monitored(tmp_path: Path) -> None:
    doc = run_bench("footprint", tmp_path, timeout=220)
    alone, watched = doc["rows"]
    assert (alone["setting"], watched["setting"]) == ("alone", "with a monitor")
    assert alone["seconds"] >= 3 and watched["seconds"] >= 3
    assert alone["monitor RSS MB"] is None
    assert watched["monitor RSS MB"] > 0  # the monitor was really running beside the node
    figures = {f["name"]: f for f in doc["figures"]}
    assert list(figures) == [
        "idle CPU",
        "idle RSS",
        "idle CPU, with a monitor",
        "idle RSS, with a monitor",
    ]
    for name, figure in figures.items():
        assert math.isfinite(figure["value"]), name
        # CPU is counted in 10 ms ticks: an idle node may use none in a 3 s window.
        assert figure["value"] >= 0 if "CPU" in name else figure["value"] > 0, name
        goal = "< 1" if "CPU" in name else "< 300"
        assert figure["goal"] == goal and figure["met"] == (figure["value"] < float(goal[2:]))
    # the figures are the table's, not fixed values
    assert figures["idle RSS"]["value"] == pytest.approx(alone["daemon RSS MB"], abs=0.1)
    assert figures["idle CPU, with a monitor"]["value"] == pytest.approx(
        watched["daemon CPU %"], abs=0.001
    )
