"""`p2pfl sim --html`: `report.html`, the run's report as one self-contained page.

The summary table (as `summary_table` prints it), per schedule the mean, min and max accuracy
per round and every node's accuracy (interactive uPlot charts), and the schedule's overlay as a
graph (Cytoscape; nodes coloured by final accuracy). The monitor's dashboard script, styles and
vendored libraries (`p2pfl/monitor/webui/`) are inlined with the data: the file opens from disk,
offline, and requests nothing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pfl.simulation.engine import node_ids
from p2pfl.simulation.report import Record, _curve, _group, summary_cells
from p2pfl.simulation.scenario import Scenario
from p2pfl.topology import node_schedule, overlay

REPORT_FILE = "report.html"
ASSETS = Path(__file__).parent.parent / "monitor" / "webui"
_SCRIPTS = ("vendor/uPlot.iife.min.js", "vendor/cytoscape.min.js", "dashboard.js")
_STYLES = ("vendor/uPlot.min.css", "dashboard.css")

Edges = Sequence[tuple[str, str]]


def overlays(scenario: Scenario) -> dict[str, Edges]:
    """Each compared schedule's overlay at round 0 (who sends to whom), over the scenario's ids."""
    ids = node_ids(scenario.nodes)
    graphs = {
        name: overlay(node_schedule(scenario.node_config(name, 0, ids[0])), ids)
        for name in scenario.compare
    }
    return {name: sorted(graph.edges()) for name, graph in graphs.items()}


def report_data(records: Iterable[Record], overlays: Mapping[str, Edges]) -> dict[str, Any]:
    """Per schedule: the accuracy curves by round, every honest node's accuracy, the overlay."""
    schedules = []
    for name, nodes in _group(records).items():
        points = _curve(nodes)
        rounds = [p.round for p in points]
        per_node: dict[str, list[float | None]] = {}
        final: dict[str, float | None] = {}
        for node, recs in nodes.items():
            honest = {int(r["round"]): float(r["accuracy"]) for r in recs if r["honest"]}
            per_node[node] = [honest.get(rnd) for rnd in rounds]
            final[node] = honest[max(honest)] if honest else None
        schedules.append(
            {
                "name": name,
                "round": rounds,
                "mean": [p.mean for p in points],
                "min": [p.low for p in points],
                "max": [p.high for p in points],
                "nodes": per_node,
                "final": final,
                "ids": sorted(nodes),
                "edges": [list(edge) for edge in overlays.get(name, ())],
            }
        )
    return {"schedules": schedules}


def summary_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and rows as text, the columns of `summary_table`."""
    header = ["schedule", "mean acc", "min acc", "rounds to 80%", "time to 80%",
              "messages sent", "bytes sent", "rejected", "wall time"]  # fmt: skip
    private = any(s.get("max_epsilon") is not None for s in summary["schedules"].values())
    if private:
        header.append("max epsilon")
    rows = []
    for name, s in summary["schedules"].items():
        rows.append(summary_cells(name, s, private=private))
    return header, rows


def render(
    records: Iterable[Record],
    summary: Mapping[str, Any],
    scenario: str,
    overlays: Mapping[str, Edges],
) -> str:
    """The whole page as text."""
    data = report_data(records, overlays)
    header, rows = summary_rows(summary)
    esc = html.escape
    best = summary.get("best")
    table = "".join(
        f'<tr class="{"best" if row[0] == best else ""}">'
        + "".join(f"<td>{esc(cell)}</td>" for cell in row)
        + "</tr>\n"
        for row in rows
    )
    table = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n" + table
    caption = ""
    if best is not None:
        caption = f"<p>best: <b>{esc(str(best))}</b> (honest accuracy at the last round)</p>"
    sections = "".join(
        f'<section class="panel wide"><h2>{esc(s["name"])}</h2>'
        f'<div class="pair"><div id="curve-{i}" class="chart"></div>'
        f'<div id="nodes-{i}" class="chart"></div></div>'
        "<h2>overlay <small>who sends to whom at round 0; colour: final accuracy</small></h2>"
        f'<div id="topo-{i}" class="topology"></div></section>\n'
        for i, s in enumerate(data["schedules"])
    )
    # "</" inside the inlined data or code would end its <script> element early.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    styles = "\n".join(_asset(name) for name in _STYLES)
    scripts = "\n".join(f"<script>\n{_asset(name)}\n</script>" for name in _SCRIPTS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>p2pfl sim — {esc(scenario)}</title>
<style>
{styles}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: .8em; }}
.topology {{ height: 320px; }}
tr.best td {{ font-weight: bold; }}
</style>
</head>
<body>
<header><h1>p2pfl sim — {esc(scenario)}</h1></header>
<main>
<section class="panel wide"><h2>Summary</h2>
<table class="summary" id="summary">
{table}</table>
{caption}</section>
{sections}</main>
<script type="application/json" id="report-data">{payload}</script>
{scripts}
</body>
</html>
"""


def write_html(
    records: Iterable[Record],
    summary: Mapping[str, Any],
    scenario: str,
    overlays: Mapping[str, Edges],
    out_dir: Path,
) -> Path:
    """Write `<out_dir>/report.html`; its path."""
    path = out_dir / REPORT_FILE
    path.write_text(render(records, summary, scenario, overlays), encoding="utf-8")
    return path


def _asset(name: str) -> str:
    text = (ASSETS / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise ValueError(f"{name} cannot be inlined: it holds a closing tag")
    return text
