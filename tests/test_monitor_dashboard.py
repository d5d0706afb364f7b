"""The dashboard fits an 80x24 terminal whatever the network looks like, and shows what matters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from p2pfl.monitor.dashboard import fmt_bytes, render_dashboard, render_report
from p2pfl.monitor.plot import write_plot
from p2pfl.monitor.state import NetworkState

WALL = 1_800_000_000.0


def network(
    n: int,
    *,
    long_ids: bool = False,
    logs: int = 10,
    epsilon: float | None = None,
    paused: str | None = None,
) -> dict[str, Any]:
    now = [0.0]
    state = NetworkState("demo", stale_after=3.0, clock=lambda: now[0], wall=lambda: WALL + now[0])
    for i in range(n):
        node_id = f"node-{i:03d}-of-a-rather-long-name" if long_ids else f"n{i}"
        body = {
            "id": node_id, "round": 1000 + i, "accuracy": 0.9, "loss": 0.25,
            "confusion": [[9, 1], [1, 9]], "models_sent": 123456, "models_received": 654321,
            "bytes_out": 98_765_432_100, "bytes_in": 12_345_678_900, "cpu": 187.0,
            "rss": 3 << 30, "peers": ["x"] * 40, "sent_to": [f"n{(i + 1) % n}", f"n{(i + 2) % n}"],
            "projection": [float(i)] * 32, "epsilon": epsilon,
            "paused": paused if i == 1 else None,
        }  # fmt: skip
        # The first node reported long ago: it is stale by now.
        state.on_telemetry(node_id, body, sent_at=WALL - (10 if i == 0 else 0), retained=True)
    for k in range(logs):
        line = {"level": "error" if k % 2 else "warning", "logger": "p2pfl.node",
                "msg": f"problem {k} " + "x" * 200, "time": WALL}  # fmt: skip
        state.on_log("n1", line, sent_at=WALL)
    return state.snapshot()


def render(snap: dict[str, Any], width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, record=True, color_system=None)
    console.print(render_dashboard(snap, height=height))
    return console.export_text().rstrip("\n").split("\n")


@pytest.mark.parametrize(
    ("nodes", "long_ids", "logs"), [(0, False, 0), (3, False, 2), (50, False, 40), (12, True, 5)]
)
def test_the_dashboard_fits_80x24(nodes: int, long_ids: bool, logs: int) -> None:
    lines = render(network(nodes, long_ids=long_ids, logs=logs))
    assert len(lines) == 24
    assert max(len(line) for line in lines) <= 80
    assert "global acc" in lines[1]


def test_the_dashboard_shows_nodes_metrics_staleness_overlay_and_logs() -> None:
    lines = render(network(3, logs=3))
    text = "\n".join(lines)
    for node_id in ("n0", "n1", "n2"):
        assert any(line.startswith(node_id + " ") for line in lines), text
    assert "acc 0.900" in lines[1] and "divergence" in lines[1]
    assert "2 live" in lines[0] and "1 stale" in lines[0]
    row = next(line for line in lines if line.startswith("n0 "))
    assert row.rstrip().endswith("10s!")  # stale: seen 10 s ago, marked
    row = next(line for line in lines if line.startswith("n1 "))
    assert "123k/654k" in row and "99G/12G" in row and "187%" in row and row.rstrip().endswith("0s")
    assert "n0 -> n1, n2" in text
    assert "problem 2" in text and "…" in text  # the newest log line, cut with an ellipsis


def test_nodes_with_dp_show_the_epsilon_they_spent_within_80_columns() -> None:
    lines = render(network(3, logs=1, epsilon=7.25))
    assert max(len(line) for line in lines) <= 80
    assert "eps" in next(line for line in lines if "node" in line and "round" in line)
    row = next(line for line in lines if line.startswith("n1 "))
    assert "7.25" in row and "3.2G" not in row  # epsilon in place of memory
    plain = render(network(3, logs=1))
    assert "3.2G" in next(line for line in plain if line.startswith("n1 "))


def test_many_nodes_collapse_into_a_count_and_stale_ones_stay_visible() -> None:
    lines = render(network(50))
    text = "\n".join(lines)
    assert "more" in text
    assert any(line.startswith("n0 ") for line in lines)  # the stale one is kept on screen


def test_a_taller_terminal_shows_more_rows() -> None:
    lines = render(network(50), width=120, height=60)
    assert len(lines) == 60 and max(map(len, lines)) <= 120
    assert sum(1 for line in lines if line.startswith("n")) > 30


def test_the_printed_report_lists_every_node() -> None:
    console = Console(width=80, record=True, color_system=None)
    console.print(render_report(network(20)))
    text = console.export_text()
    assert all(f"n{i} " in text for i in range(20))
    assert max(len(line) for line in text.splitlines()) <= 80


def test_byte_counts_are_short() -> None:
    assert [fmt_bytes(n) for n in (0, 999, 1234, 12_345, 9_876_543, None)] == [
        "0", "999", "1.2k", "12k", "9.9M", "-"
    ]  # fmt: skip


def test_the_plot_is_written(tmp_path: Path) -> None:
    history = [(WALL + t, 0.5 + t / 100, None if t == 0 else 3.0 - t / 10) for t in range(10)]
    out = tmp_path / "sub" / "acc.png"
    write_plot(history, out, "demo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_paused_node_shows_why_in_the_table() -> None:
    lines = render(network(3, logs=0, paused="window"))
    header = next(line for line in lines if "node" in line and "round" in line)
    assert "paused" in header and "bytes o/i" not in header
    row = next(line for line in lines if line.startswith("n1 "))
    assert "window" in row
    assert max(len(line) for line in lines) <= 80
    plain = "\n".join(render(network(3, logs=0)))
    assert "paused" not in plain and "bytes o/i" in plain
