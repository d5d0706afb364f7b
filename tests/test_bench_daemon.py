"""`p2pfl bench daemon` at its tiny size, through the real CLI: real `p2pfl run` processes on
Mosquitto and on embedded brokers, and well-formed JSON (no timing is asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from p2pfl.transport.mosquitto import find_mosquitto
from tests.helpers import run_bench

# About 30 s on an idle 2-core machine: five processes importing torch, two runs of start-up.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_daemon_bench_writes_a_ratio_per_broker_against_its_goal(tmp_path: Path) -> None:
    doc = run_bench("daemon", tmp_path, timeout=280)
    brokers = ["mosquitto", "embedded"] if find_mosquitto() else ["embedded"]
    assert [(r["broker"], r["schedule"], r["daemons"], r["rounds"]) for r in doc["rows"]] == [
        (broker, "ring", 2, 2) for broker in brokers
    ]
    for row in doc["rows"]:
        for column in ("start-up s", "bare s/round", "daemon s/round", "fit+eval s/round"):
            assert row[column] > 0, column
        assert row["ratio"] == pytest.approx(row["daemon s/round"] / row["bare s/round"], 0.02)
    names = [f["name"] for f in doc["figures"]]
    assert names == [f"daemon wall per round, {broker}, ring" for broker in brokers]
    for figure in doc["figures"]:
        assert math.isfinite(figure["value"]) and figure["value"] > 0
        assert figure["unit"] == "x" and figure["goal"] == "<= 1.5"
        assert figure["met"] == (figure["value"] <= 1.5)
