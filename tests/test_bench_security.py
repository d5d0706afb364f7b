"""`p2pfl bench security` at its tiny size, through the real CLI: well-formed JSON."""

from __future__ import annotations

import math
from pathlib import Path

from tests.helpers import run_bench


def test_security_bench_writes_rows_and_figures(tmp_path: Path) -> None:
    doc = run_bench("security", tmp_path, timeout=120)

    measures = [row["measure"] for row in doc["rows"]]
    expected = [
        "default sim, partial-mesh, 4 nodes x 1 rounds: wall",
        "default sim, partial-mesh, 4 nodes x 1 rounds: CPU",
        "model message (cnn1d, ",
        "small message (",
    ]
    assert len(measures) == len(expected), measures
    assert all(m.startswith(e) for m, e in zip(measures, expected, strict=True)), measures
    assert [row["unit"] for row in doc["rows"]] == ["s", "s", "µs", "µs"]
    for row in doc["rows"]:
        for column in ("unsigned", "signed", "ratio"):
            assert math.isfinite(row[column]) and row[column] > 0, (row, column)
    # Ed25519 dwarfs packing a few hundred bytes: signing must show on a small message.
    small = doc["rows"][3]
    assert small["measure"].startswith("small message") and small["ratio"] > 1

    figures = {f["name"]: f for f in doc["figures"]}
    assert set(figures) == {
        "default sim wall, signed / unsigned",
        "default sim CPU, signed / unsigned",
        "model message cost, signed / unsigned",
        "sign + verify, model message",
    }
    assert figures["default sim wall, signed / unsigned"]["goal"] == "<= 1.05"
    assert figures["sign + verify, model message"]["unit"] == "µs"
    for name, figure in figures.items():
        assert math.isfinite(figure["value"]) and figure["value"] > 0, name
        assert (figure["met"] is None) == (figure["goal"] is None)
