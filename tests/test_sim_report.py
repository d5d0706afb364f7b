"""Tests for the simulator report: summary arithmetic, table, plots, metrics log."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from p2pfl.simulation.report import (
    METRICS_FILE,
    RECORD_KEYS,
    MetricsWriter,
    first_reaching,
    human_bytes,
    plot,
    read_metrics,
    summarize,
    summary_json,
    summary_table,
    write_summary,
)

RING_BASE = (0.9, 0.8, 0.7, 0.6)  # final accuracies: mean 0.75, min 0.6, max 0.9
MESH_BASE = (0.95, 0.9, 0.85, 0.8)  # final accuracies: mean 0.875, min 0.8, max 0.95


def record(schedule: str, node: str, rnd: int, accuracy: float, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "schedule": schedule,
        "node": node,
        "round": rnd,
        "t": 2.0 * rnd,
        "accuracy": accuracy,
        "test_loss": 1.0 - accuracy,
        "train_loss": 1.0 - accuracy,
        "merged": rnd,
        "models_sent": rnd,
        "models_received": rnd,
        "bytes_sent": 1000 * rnd,
        "rejected": 0,
        "membership_received": 3 * rnd,
        "fit_seconds": 0.5,
        "eval_seconds": 0.1,
        "round_seconds": 2.0,
        "honest": True,
        "restarts": 0,
        "epsilon": None,
    }
    r.update(kw)
    return r


def synthetic() -> list[dict[str, Any]]:
    """2 schedules x 4 honest nodes x 10 rounds, plus one Byzantine node in `ring`."""
    records = []
    for rnd in range(1, 11):
        for i, base in enumerate(RING_BASE):
            # Mean over nodes = 0.75 * sqrt(r / 10): first >= 0.6 (80% of 0.75) at round 7.
            acc = base * math.sqrt(rnd / 10)
            records.append(record("ring", f"r{i}", rnd, acc, t=2.0 * rnd + 0.1 * i, rejected=rnd))
        records.append(record("ring", "byz", rnd, 0.0, honest=False, bytes_sent=5000 * rnd, t=99.0))
        for i, base in enumerate(MESH_BASE):
            if i == 3 and rnd > 8:
                continue  # m3 crashed after round 8: its final accuracy is the round-8 one
            # Mean = 0.875 * min(1, r / 6): first >= 0.7 at round 5.
            records.append(record("mesh", f"m{i}", rnd, base * min(1.0, rnd / 6)))
    return records


def test_record_keys_match_the_engine_contract() -> None:
    assert set(synthetic()[0]) == set(RECORD_KEYS)


def test_max_epsilon_is_the_most_any_node_spent() -> None:
    records = synthetic()
    assert summarize(records, wall_seconds={})["schedules"]["ring"]["max_epsilon"] is None
    private = [
        {**r, "epsilon": 0.1 * r["round"] + (0.5 if r["node"] == "byz" else 0.0)} for r in records
    ]
    summary = summarize(private, wall_seconds={})
    assert summary["schedules"]["ring"]["max_epsilon"] == 1.5  # a Byzantine node counts too
    assert summary["schedules"]["mesh"]["max_epsilon"] == 1.0
    text = Console(width=160, record=True)
    text.print(summary_table(summary, "dp"))
    assert "epsilon" in text.export_text()


def test_summarize_gives_hand_computed_values() -> None:
    summary = summarize(synthetic(), wall_seconds={"ring": 15.0, "mesh": 20.0})

    ring, mesh = summary["schedules"]["ring"], summary["schedules"]["mesh"]
    assert summary["best"] == "mesh"
    assert ring["nodes"] == 5 and ring["rounds"] == 10
    # The Byzantine node's 0.0 accuracy is left out...
    assert ring["final_mean_accuracy"] == 0.75
    assert ring["final_min_accuracy"] == 0.6
    assert ring["final_max_accuracy"] == 0.9
    assert ring["rounds_to_80pct"] == 7
    assert ring["seconds_to_80pct"] == 14.3  # latest honest node at round 7, not byz's t=99
    # ...but its traffic counts.
    assert ring["bytes_sent"] == 4 * 10_000 + 50_000
    assert ring["messages_sent"] == 50
    assert ring["rejected"] == 40
    assert ring["compute_seconds"] == 30.0  # 50 records x (0.5 + 0.1)
    assert ring["wall_seconds"] == 15.0
    assert "overhead" not in ring  # see `p2pfl bench overhead`

    assert mesh["nodes"] == 4 and mesh["rounds"] == 10
    assert mesh["final_mean_accuracy"] == 0.875
    assert mesh["final_min_accuracy"] == 0.8
    assert mesh["rounds_to_80pct"] == 5
    assert mesh["seconds_to_80pct"] == 10.0
    assert mesh["messages_sent"] == 10 + 10 + 10 + 8
    assert mesh["bytes_sent"] == 38_000


def test_summarize_uses_given_compute_seconds_and_tolerates_missing_wall_time() -> None:
    summary = summarize(synthetic(), wall_seconds={"ring": 12.0}, compute_seconds={"ring": 4.0})
    assert summary["schedules"]["ring"]["compute_seconds"] == 4.0
    assert summary["schedules"]["mesh"]["wall_seconds"] is None


def test_schedule_without_honest_nodes_has_no_accuracy_and_is_never_best() -> None:
    records = [record("evil", "b", r, 0.99, honest=False) for r in (1, 2)]
    records.append(record("ok", "a", 1, 0.1))
    summary = summarize(records, wall_seconds={})
    evil = summary["schedules"]["evil"]
    assert evil["final_mean_accuracy"] is None
    assert evil["rounds_to_80pct"] is None and evil["seconds_to_80pct"] is None
    assert evil["bytes_sent"] == 2000
    assert summary["best"] == "ok"
    assert summarize([], wall_seconds={}) == {"schedules": {}, "best": None}


def test_summary_is_deterministic_whatever_the_record_order() -> None:
    records = synthetic()
    walls = {"ring": 15.0, "mesh": 20.0}
    first = summary_json(summarize(records, wall_seconds=walls))
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    assert summary_json(summarize(records, wall_seconds=walls)) == first
    assert summary_json(summarize(shuffled, wall_seconds=walls)) == first
    assert list(json.loads(first)["schedules"]) == ["mesh", "ring"]


def test_write_summary_round_trips(tmp_path: Path) -> None:
    summary = summarize(synthetic(), wall_seconds={"ring": 15.0})
    path = write_summary(summary, tmp_path / "out")
    assert json.loads(path.read_text()) == summary


def test_table_renders_names_and_numbers_within_100_columns() -> None:
    summary = summarize(synthetic(), wall_seconds={"ring": 15.0, "mesh": 20.0})
    console = Console(record=True, width=100)
    console.print(summary_table(summary, "two-schedules"))
    text = console.export_text()

    assert "p2pfl sim — two-schedules" in text
    assert "best: mesh" in text
    for expected in ("ring", "mesh", "0.7500", "0.6000", "0.8750", "90.0 kB", "38.0 kB"):
        assert expected in text
    assert "14.3 s" in text and "15.0 s" in text and "overhead" not in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(12_345_678) == "12.3 MB"
    assert human_bytes(999_999) == "1.0 MB"
    assert human_bytes(3e12) == "3.0 TB"


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    paths = plot(synthetic(), tmp_path / "plots")
    names = {p.name for p in paths}
    assert names == {
        "accuracy_vs_round.png",
        "accuracy_vs_time.png",
        "accuracy_vs_bytes.png",
        "spread.png",
    }
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000


def test_plot_without_honest_data_writes_nothing(tmp_path: Path) -> None:
    assert plot([record("evil", "b", 1, 0.5, honest=False)], tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_metrics_writer_round_trip_and_append(tmp_path: Path) -> None:
    records = synthetic()
    with MetricsWriter(tmp_path) as writer:
        writer.write(records[:10])
        writer.write(records[10:])
    with MetricsWriter(tmp_path) as writer:  # a resumed run appends
        writer.write(records[:3])
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == len(records) + 3
    assert ": " not in lines[0] and ", " not in lines[0]  # compact
    assert read_metrics(tmp_path) == records + records[:3]
    assert read_metrics(tmp_path / METRICS_FILE) == records + records[:3]


def test_partial_last_line_is_skipped_then_cut_before_appending(tmp_path: Path) -> None:
    records = synthetic()[:2]
    with MetricsWriter(tmp_path) as writer:
        writer.write(records[:1])
    path = tmp_path / METRICS_FILE
    with path.open("a") as f:
        f.write('{"schedule":"ri')  # a crash mid-write
    assert read_metrics(path) == records[:1]
    with MetricsWriter(tmp_path) as writer:
        writer.write(records[1:])
    assert read_metrics(path) == records


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"a":1}\nnot json\n{"b":2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_first_reaching_gives_the_first_round_at_a_target_with_its_time_and_bytes() -> None:
    reached = first_reaching(synthetic(), 0.6)
    # ring: mean 0.75 * sqrt(r / 10) first >= 0.6 at round 7; bytes include the Byzantine node's
    assert reached["ring"] == {"round": 7, "t": pytest.approx(14.3), "bytes": 4 * 7000 + 35000}
    assert reached["mesh"] is not None and reached["mesh"]["round"] == 5  # 0.875 * 5 / 6
    assert first_reaching(synthetic(), 0.99) == {"ring": None, "mesh": None}
