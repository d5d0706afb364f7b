"""Terminal views of a monitor snapshot (rich): the live full-screen dashboard and a printed report.

The dashboard is built for the smallest usual terminal, 80x24, and grows with it: a two-line
header with the global metrics (and the live nodes they leave out, with the reason); the nodes
table (a stale node in yellow with "!" after its age, a crashed one in red, "down"; `glob`
says whether the node's evaluation is in the global metrics); below it the overlay as an
adjacency list and the latest log lines. Every line is cut with an ellipsis rather than
wrapped, and surplus rows collapse into "... N more", so nothing ever spills into the next
region."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from p2pfl.monitor.state import EXCLUDED_REASONS

Snapshot = Mapping[str, Any]

HEADER_LINES = 2
_LEVEL_STYLES = {"warning": "yellow", "error": "red", "critical": "bold red"}
_COLUMNS: tuple[tuple[str, JustifyMethod, int], ...] = (
    # title, justify, max width: with one space between columns they fill 80 columns
    ("node", "left", 13),
    ("round", "right", 6),
    ("acc", "right", 5),
    ("glob", "left", 4),
    ("loss", "right", 5),
    ("peers", "right", 5),
    ("sent/recv", "right", 9),
    ("bytes o/i", "right", 9),
    ("cpu", "right", 4),
    ("mem", "right", 5),
    ("seen", "right", 5),
)
_EPSILON_COLUMN: tuple[str, JustifyMethod, int] = ("eps", "right", 5)
"""With differential privacy on some node: epsilon spent, shown in place of memory (80 columns)."""
_PAUSED_COLUMN: tuple[str, JustifyMethod, int] = ("paused", "right", 9)
"""With some node paused (`--when`, `p2pfl pause`): why, shown in place of traffic."""


def fmt_bytes(n: float | None) -> str:
    """A short count, SI-style: 1234567 -> '1.2M'."""
    if n is None:
        return "-"
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" or n >= 10 else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.0f}P"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _line(text: str | Text, style: str = "") -> Text:
    out = text if isinstance(text, Text) else Text(text, style=style)
    out.no_wrap = True
    out.overflow = "ellipsis"
    return out


def header(snap: Snapshot) -> Group:
    """Two lines: the network and its nodes, then the global metrics."""
    glob = snap.get("global", {})
    when = time.strftime("%H:%M:%S", time.localtime(snap.get("time", time.time())))
    top = Text.assemble(
        ("p2pfl monitor ", "bold"),
        f"net={snap.get('network', '?')}  ",
        (f"{glob.get('nodes', 0)} live", "green"),
        "  ",
        (f"{glob.get('stale', 0)} stale", "yellow" if glob.get("stale") else ""),
        f"  {when}",
    )
    bottom = Text.assemble(
        ("global ", "bold"),
        f"acc {fmt_num(glob.get('accuracy'))}  ",
        f"macro-F1 {fmt_num(glob.get('macro_f1'))}  ",
        f"divergence {fmt_num(glob.get('divergence'))}  ",
        f"samples {glob.get('samples', 0)}",
    )
    # Stale nodes are counted (and coloured) already; these are the live ones left out.
    left_out = [e for e in snap.get("excluded_from_global", []) if e.get("reason") != "stale"]
    if left_out:
        names = ", ".join(f"{e.get('id')} ({e.get('reason')})" for e in left_out)
        bottom.append(f"  not in global: {names}", style="yellow")
    return Group(_line(top), _line(bottom))


def nodes_table(nodes: Sequence[Mapping[str, Any]], max_rows: int | None = None) -> Table:
    """One row per node; at most `max_rows` rows, the last saying how many were left out."""
    table = Table(
        box=None, padding=(0, 1, 0, 0), pad_edge=False, header_style="bold reverse", expand=True
    )
    private = any(n.get("epsilon") is not None for n in nodes)
    paused = any(n.get("paused") for n in nodes)
    swap = {
        "mem": _EPSILON_COLUMN if private else None,
        "bytes o/i": _PAUSED_COLUMN if paused else None,
    }
    columns = [swap.get(c[0]) or c for c in _COLUMNS]
    for title, justify, width in columns:
        table.add_column(title, justify=justify, max_width=width, no_wrap=True, overflow="ellipsis")
    shown = list(nodes)
    hidden = 0
    if max_rows is not None and len(shown) > max_rows:
        keep = max(max_rows - 1, 0)
        # Stale nodes are the ones an operator looks for: keep them on screen first.
        shown = sorted(shown, key=lambda n: not n.get("stale"))[:keep]
        shown.sort(key=lambda n: str(n.get("id")))
        hidden = len(nodes) - keep
    for n in shown:
        models = traffic = "-"
        if n.get("models_sent") is not None:
            models = f"{fmt_bytes(n['models_sent'])}/{fmt_bytes(n['models_received'])}"
        if n.get("bytes_out") is not None:
            traffic = f"{fmt_bytes(n['bytes_out'])}/{fmt_bytes(n['bytes_in'])}"
        style = "red" if n.get("offline") else "yellow" if n.get("stale") else ""
        table.add_row(
            str(n.get("id")),
            "-" if n.get("round") is None else str(n["round"]),
            fmt_num(n.get("accuracy")),
            "yes" if n.get("in_global") else "no",
            fmt_num(n.get("loss")),
            "-" if n.get("peers") is None else str(n["peers"]),
            models,
            (n.get("paused") or "-") if paused else traffic,
            "-" if n.get("cpu") is None else f"{n['cpu']:.0f}%",
            fmt_num(n.get("epsilon"), 2) if private else fmt_bytes(n.get("rss")),
            _seen(n),
            style=style,
        )
    if hidden:
        table.add_row(f"... {hidden} more", *[""] * (len(_COLUMNS) - 1), style="dim")
    return table


def _seen(node: Mapping[str, Any]) -> str:
    if node.get("offline"):
        return "down"
    return fmt_age(node.get("last_seen_s")) + ("!" if node.get("stale") else "")


def overlay_lines(edges: Iterable[Sequence[str]]) -> list[str]:
    """The overlay as an adjacency list: `src -> dst1, dst2`."""
    out: dict[str, list[str]] = {}
    for src, dst in edges:
        out.setdefault(src, []).append(dst)
    return [f"{src} -> {', '.join(dsts)}" for src, dsts in sorted(out.items())]


def log_lines(logs: Iterable[Mapping[str, Any]]) -> list[Text]:
    """`HH:MM:SS node level message`, coloured by level."""
    out = []
    for entry in logs:
        when = time.strftime("%H:%M:%S", time.localtime(entry.get("time") or 0))
        level = str(entry.get("level", ""))
        out.append(
            _line(
                Text.assemble(
                    f"{when} ",
                    (f"{entry.get('node', '')} ", "bold"),
                    (f"{level[:4]} ", _LEVEL_STYLES.get(level, "")),
                    str(entry.get("msg", "")),
                )
            )
        )
    return out


def _fit(lines: Sequence[Text], rows: int, empty: str) -> Group:
    """The last `rows` lines (or a placeholder), each cut to one line."""
    if not lines:
        return Group(_line(empty, "dim"))
    if len(lines) > rows:
        lines = [_line(f"... {len(lines) - rows + 1} more", "dim"), *lines[len(lines) - rows + 1 :]]
    return Group(*lines)


def render_dashboard(snap: Snapshot, *, height: int = 24) -> Layout:
    """The full-screen view for a terminal `height` lines high (at least 12 are needed)."""
    height = max(height, 12)
    rest = height - HEADER_LINES
    nodes = snap.get("nodes", [])
    # The table takes what it needs (its header and one line per node) and leaves the overlay
    # and the logs at least 6 lines (4 inside their borders).
    nodes_height = min(max(len(nodes) + 1, 2), rest - 6)
    bottom = rest - nodes_height
    layout = Layout()
    layout.split_column(
        Layout(header(snap), name="header", size=HEADER_LINES),
        Layout(name="nodes", size=nodes_height),
        Layout(name="bottom", size=bottom),
    )
    # One line is the table's header.
    layout["nodes"].update(nodes_table(nodes, max_rows=nodes_height - 1))
    rows = bottom - 2
    edges = [_line(text) for text in overlay_lines(snap.get("overlay", []))]
    layout["bottom"].split_row(
        Layout(
            Panel(_fit(edges, rows, "no traffic yet"), title="overlay", title_align="left"),
            ratio=1,
        ),
        Layout(
            Panel(
                _fit(log_lines(snap.get("logs", [])), rows, "no warnings"),
                title="logs",
                title_align="left",
            ),
            ratio=2,
        ),
    )
    return layout


def render_report(snap: Snapshot) -> RenderableType:
    """Everything in the snapshot, for printing once (`p2pfl monitor --once`)."""
    edges = overlay_lines(snap.get("overlay", []))
    logs = log_lines(snap.get("logs", []))
    parts: list[RenderableType] = [header(snap), nodes_table(snap.get("nodes", []))]
    excluded = snap.get("excluded_from_global", [])
    if excluded:
        parts.append(Text("not in global metrics", style="bold"))
        for entry in excluded:
            why = EXCLUDED_REASONS.get(str(entry.get("reason")), "")
            parts.append(_line(f"{entry.get('id')}  {entry.get('reason')}: {why}"))
    if edges:
        parts += [Text("overlay", style="bold"), *(_line(e) for e in edges)]
    if logs:
        parts += [Text("logs", style="bold"), *logs]
    return Group(*parts)
