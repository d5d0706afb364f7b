"""Report of a `p2pfl sim` run: the metrics log, the summary, the table and the plots.

Everything is a pure function of the records the engine emits, one per node per round (keys in
`RECORD_KEYS`; `models_sent`, `bytes_sent`, `rejected`, `membership_received` (presence
records delivered), ... are cumulative per node, across its restarts too, while `fit_seconds`,
`eval_seconds` and `round_seconds` (the whole round, ending at `t`) are that round's durations,
`restarts` counts the node's crashes so far, and `epsilon` is the DP budget the node has spent,
null without DP), so a report can be rebuilt from `metrics.jsonl` alone. Byzantine records
(`honest` false) count for traffic, never for accuracy.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.table import Table

Record = Mapping[str, Any]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RECORD_KEYS = (
    "schedule", "node", "round", "t", "accuracy", "test_loss", "train_loss", "merged",
    "models_sent", "models_received", "bytes_sent", "rejected", "membership_received",
    "fit_seconds", "eval_seconds", "round_seconds", "honest", "restarts", "epsilon",
)  # fmt: skip
TARGET_FRACTION = 0.8  # "time to 80%": of the schedule's own final mean accuracy


class MetricsWriter:
    """Appends records to `<out_dir>/metrics.jsonl`, one compact JSON line each."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        _drop_partial_tail(self.path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, records: Iterable[Record]) -> None:
        """Write one batch (typically a round of every node) and flush it."""
        # One write per batch, so a crash leaves at most one partial line, at the end.
        text = "".join(json.dumps(dict(r), separators=(",", ":")) + "\n" for r in records)
        if text:
            self._file.write(text)
            self._file.flush()

    def close(self) -> None:
        """Close the file; records already written stay."""
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drop_partial_tail(path: Path) -> None:
    """Cut a line a crash left half-written, so appended records start on a line of their own."""
    if not path.exists():
        return
    with path.open("r+b") as f:
        end = pos = f.seek(0, os.SEEK_END)
        cut = 0
        while pos > 0:
            step = min(4096, pos)
            f.seek(pos - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                cut = pos - step + newline + 1
                break
            pos -= step
        if cut < end:
            f.truncate(cut)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records from a `metrics.jsonl` file (or the directory holding one), in file order.

    A last line without its newline is a write cut short and is skipped if it does not parse;
    any other bad line raises `ValueError` naming the line.
    """
    if path.is_dir():
        path = path / METRICS_FILE
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: unfinished write
                break
            raise ValueError(f"{path}:{number}: not a JSON record: {e}") from e
    return records


@dataclass(frozen=True)
class _Point:
    """The honest nodes of one schedule at one round."""

    round: int
    t: float  # latest time an honest node reported this round
    mean: float
    low: float
    high: float
    bytes_sent: int  # all nodes, cumulative; a node that missed the round counts its last value


def _group(records: Iterable[Record]) -> dict[str, dict[str, list[Record]]]:
    """schedule -> node -> records by round, both keys sorted so sums come out the same."""
    grouped: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[str(r["schedule"])][str(r["node"])].append(r)
    return {
        name: {
            node: sorted(recs, key=lambda r: (int(r["round"]), float(r["t"])))
            for node, recs in sorted(nodes.items())
        }
        for name, nodes in sorted(grouped.items())
    }


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _curve(nodes: Mapping[str, Sequence[Record]]) -> list[_Point]:
    by_round: dict[int, list[Record]] = defaultdict(list)
    for recs in nodes.values():
        for r in recs:
            by_round[int(r["round"])].append(r)
    last_bytes = dict.fromkeys(nodes, 0)
    points = []
    for rnd in sorted(by_round):
        batch = by_round[rnd]
        for r in batch:
            last_bytes[str(r["node"])] = int(r["bytes_sent"])
        honest = [r for r in batch if r["honest"]]
        if not honest:
            continue
        accs = [float(r["accuracy"]) for r in honest]
        t = max(float(r["t"]) for r in honest)
        points.append(_Point(rnd, t, _mean(accs), min(accs), max(accs), sum(last_bytes.values())))
    return points


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _summarize_schedule(
    nodes: Mapping[str, Sequence[Record]], wall: float | None, compute: float | None
) -> dict[str, Any]:
    finals = [recs[-1] for recs in nodes.values()]
    accs = [float(r["accuracy"]) for r in finals if r["honest"]]
    final_mean = _mean(accs) if accs else None
    reached = None
    if final_mean is not None:
        target = TARGET_FRACTION * final_mean
        reached = next((p for p in _curve(nodes) if p.mean >= target), None)
    if compute is None:
        compute = math.fsum(
            float(r["fit_seconds"]) + float(r["eval_seconds"])
            for recs in nodes.values()
            for r in recs
        )
    # DP: the most any node (Byzantine ones too) reports having spent; None without DP.
    spent = [float(r["epsilon"]) for recs in nodes.values() for r in recs
             if r.get("epsilon") is not None]  # fmt: skip
    return {
        "nodes": len(nodes),
        "rounds": max(int(r["round"]) for r in finals),
        "final_mean_accuracy": _round(final_mean, 6),
        "final_min_accuracy": _round(min(accs), 6) if accs else None,
        "final_max_accuracy": _round(max(accs), 6) if accs else None,
        "rounds_to_80pct": reached.round if reached else None,
        "seconds_to_80pct": _round(reached.t, 4) if reached else None,
        "messages_sent": sum(int(r["models_sent"]) for r in finals),
        "bytes_sent": sum(int(r["bytes_sent"]) for r in finals),
        "rejected": sum(int(r["rejected"]) for r in finals),
        "wall_seconds": _round(wall, 4),
        "compute_seconds": round(compute, 4),
        "max_epsilon": _round(max(spent), 4) if spent else None,
    }


def first_reaching(records: Iterable[Record], target: float) -> dict[str, dict[str, float] | None]:
    """Per schedule: the first round whose honest nodes' mean accuracy reaches `target`, with
    its time (`t`, when the last honest node reported it) and the bytes all nodes had sent by
    then; None for a schedule that never reached it."""
    out: dict[str, dict[str, float] | None] = {}
    for name, nodes in _group(records).items():
        p = next((p for p in _curve(nodes) if p.mean >= target), None)
        out[name] = None if p is None else {"round": p.round, "t": p.t, "bytes": p.bytes_sent}
    return out


def summarize(
    records: Iterable[Record],
    *,
    wall_seconds: Mapping[str, float],
    compute_seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The content of `summary.json`: per-schedule results and the `best` schedule's name.

    `compute_seconds` overrides the sum of the records' fit and eval seconds per schedule.
    The result depends only on the records' content, not their order.
    """
    schedules = {
        name: _summarize_schedule(nodes, wall_seconds.get(name), (compute_seconds or {}).get(name))
        for name, nodes in _group(records).items()
    }
    ranked = [n for n, s in schedules.items() if s["final_mean_accuracy"] is not None]
    best = max(ranked, key=lambda n: schedules[n]["final_mean_accuracy"], default=None)
    return {"schedules": schedules, "best": best}


def summary_json(summary: Mapping[str, Any]) -> str:
    """The summary as stable, indented JSON text."""
    return json.dumps(summary, indent=2, sort_keys=True) + "\n"


def write_summary(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """Write `<out_dir>/summary.json` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUMMARY_FILE
    path.write_text(summary_json(summary), encoding="utf-8")
    return path


def human_bytes(n: float) -> str:
    """`12.3 MB`-style size, decimal units."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 999.95:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summary_cells(name: str, s: Mapping[str, Any], *, private: bool) -> list[str]:
    """One schedule's row of the summary table (the terminal's and report.html's)."""
    row = [
        name,
        _fmt(s["final_mean_accuracy"], ".4f"),
        _fmt(s["final_min_accuracy"], ".4f"),
        _fmt(s["rounds_to_80pct"], "d"),
        _fmt(s["seconds_to_80pct"], ".1f", " s"),
        _fmt(s["messages_sent"], ","),
        human_bytes(s["bytes_sent"]),
        _fmt(s["rejected"], ","),
        _fmt(s["wall_seconds"], ".1f", " s"),
    ]
    return [*row, _fmt(s.get("max_epsilon"), ".3f")] if private else row


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def sim_table(title: str, **layout: Any) -> Table:
    """A table of `p2pfl sim` results titled ``title``, its first column the schedule."""
    # Two-line headers and no vertical rules keep ten columns inside 100 terminal columns.
    table = Table(
        title=f"p2pfl sim — {title}",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        **layout,
    )
    table.add_column("schedule", style="cyan", no_wrap=True)
    return table


def summary_table(summary: Mapping[str, Any], scenario: str) -> Table:
    """One row per schedule; the best one in bold."""
    table = sim_table(scenario)
    for header in (
        "mean\nacc", "min\nacc", "rounds\nto 80%", "time\nto 80%", "messages\nsent",
        "bytes\nsent", "rejected", "wall\ntime",
    ):  # fmt: skip
        table.add_column(header, justify="right", no_wrap=True)
    private = any(s.get("max_epsilon") is not None for s in summary["schedules"].values())
    if private:
        table.add_column("max\nepsilon", justify="right", no_wrap=True)
    for name, s in summary["schedules"].items():
        table.add_row(
            *summary_cells(name, s, private=private),
            style="bold" if name == summary.get("best") else None,
        )
    if summary.get("best") is not None:
        table.caption = f"best: {summary['best']} (accuracy of honest nodes at their last round)"
        if private:
            table.caption += "; max epsilon: the most DP budget any node spent"
    return table


def plot(records: Iterable[Record], out_dir: Path) -> list[Path]:
    """Write the accuracy plots as PNGs in `out_dir`; returns their paths (none without data)."""
    # Imported here: the summary and table need no matplotlib, and Agg keeps it headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grouped = _group(records)
    curves = {name: c for name, nodes in grouped.items() if (c := _curve(nodes))}
    if not curves:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {name: f"C{i % 10}" for i, name in enumerate(curves)}
    written = []

    def save(fig: Figure, filename: str) -> None:
        FigureCanvasAgg(fig)
        fig.savefig(out_dir / filename, dpi=110)
        written.append(out_dir / filename)

    lines = (
        ("accuracy_vs_round.png", "round", "Mean accuracy per round (band: min–max over nodes)"),
        ("accuracy_vs_time.png", "time since start (s)", "Mean accuracy over time"),
        ("accuracy_vs_bytes.png", "bytes sent by all nodes (MB)", "Mean accuracy vs traffic"),
    )
    for filename, xlabel, title in lines:
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        for name, points in curves.items():
            if filename == "accuracy_vs_round.png":
                xs = [float(p.round) for p in points]
                lows, highs = [p.low for p in points], [p.high for p in points]
                ax.fill_between(xs, lows, highs, color=colors[name], alpha=0.2, linewidth=0)
            elif filename == "accuracy_vs_time.png":
                xs = [p.t for p in points]
            else:
                xs = [p.bytes_sent / 1e6 for p in points]
            ax.plot(xs, [p.mean for p in points], color=colors[name], label=name)
        ax.set(xlabel=xlabel, ylabel="test accuracy, mean of honest nodes", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, filename)

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    finals = {
        name: sorted(
            float(recs[-1]["accuracy"]) for recs in grouped[name].values() if recs[-1]["honest"]
        )
        for name in curves
    }
    names = [n for n in curves if finals[n]]
    ax.boxplot([finals[n] for n in names], tick_labels=names, showfliers=False)
    for i, name in enumerate(names, start=1):
        values = finals[name]
        # Spread the dots sideways deterministically so equal accuracies stay visible.
        xs = [i + 0.3 * (k / max(len(values) - 1, 1) - 0.5) for k in range(len(values))]
        ax.scatter(xs, values, s=12, color=colors[name], alpha=0.7, zorder=3)
    ax.set(xlabel="schedule", ylabel="test accuracy at each node's last round")
    ax.set_title("Final accuracy per node (honest nodes)")
    ax.grid(axis="y", alpha=0.3)
    save(fig, "spread.png")
    return written
