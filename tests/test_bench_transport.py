"""`p2pfl bench transport` at its tiny size, through the real CLI: well-formed JSON."""

from __future__ import annotations

import math
from pathlib import Path

from p2pfl.transport.mosquitto import find_mosquitto
from tests.helpers import run_bench


def test_transport_bench_writes_rows_and_figures(tmp_path: Path) -> None:
    doc = run_bench("transport", tmp_path, timeout=120)
    assert doc["machine"]["cores"] >= 1

    brokers = ["mosquitto", "embedded"] if find_mosquitto() else ["embedded"]
    measured = {(row["broker"], row["model MB"], row["codec"]) for row in doc["rows"]}
    assert measured == {(b, 0.1, c) for b in brokers for c in ("raw", "fp16", "int8")}
    for row in doc["rows"]:
        for column in ("wire / tensor", "aiomqtt MB/s", "p2pfl MB/s", "ratio"):
            assert math.isfinite(row[column]) and row[column] > 0, (row, column)
    # What goes on the wire follows from the codec: 4, 2 and 1 byte per float32 value.
    wire = {row["codec"]: row["wire / tensor"] for row in doc["rows"]}
    assert 1.0 < wire["raw"] < 1.05 and 0.5 < wire["fp16"] < 0.55 and 0.25 < wire["int8"] < 0.3

    figures = {f["name"]: f for f in doc["figures"]}
    assert set(figures) == {
        "throughput vs aiomqtt, mosquitto, raw, 0.1 MB",
        "throughput vs aiomqtt, embedded, raw, 0.1 MB",
        "wire / tensor bytes, raw",
        "wire / tensor bytes, fp16",
        "wire / tensor bytes, int8",
    }
    goals = {name: f["goal"] for name, f in figures.items()}
    assert goals["throughput vs aiomqtt, mosquitto, raw, 0.1 MB"] == ">= 0.8"
    assert goals["wire / tensor bytes, raw"] == "<= 1.01"
    assert goals["wire / tensor bytes, int8"] == "<= 0.27"
    for name, figure in figures.items():
        if "mosquitto" in name and not find_mosquitto():
            assert figure["value"] is None
            continue
        assert math.isfinite(figure["value"]) and figure["value"] > 0, name
        assert figure["met"] in (True, False, None)
        assert (figure["met"] is None) == (figure["goal"] is None)
    assert figures["wire / tensor bytes, int8"]["value"] == wire["int8"]
