"""`p2pfl runs list|show RUN|compare RUN RUN`: the runs of nodes' state dirs (p2pfl.run_summary)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from p2pfl.run_summary import RunsError, RunSummary, collect, config_diff, find

EPILOG = """
Examples:

  p2pfl runs list --state-dir st/n1 --state-dir st/n2      # every run of these nodes
  p2pfl runs list --export monitor.jsonl --json            # runs a monitor saw
  p2pfl runs show e2e-20261202T051200Z --state-dir st/n1   # record, config, accuracy per round
  p2pfl runs compare trial-1 trial-2 --state-dir st/n1 --plot cmp.png

Exit status: 0 shown, 2 no runs there, no such run, or a file that cannot be used.
"""

app = typer.Typer(
    help="List, show and compare training runs (each node's state dir keeps each run apart).",
    no_args_is_help=True,
)

_STATE = typer.Option(
    None, "--state-dir", help="A node's state dir (repeatable: several nodes' runs merge)."
)
_EXPORT = typer.Option(
    None, "--export", help="A monitor's export (p2pfl monitor --export FILE; repeatable)."
)
_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _runs(
    state_dirs: list[Path] | None, exports: list[Path] | None
) -> tuple[list[RunSummary], str]:
    dirs, files = list(state_dirs or ()), list(exports or ())
    where = ", ".join(map(str, [*dirs, *files])) or "nothing"
    if not dirs and not files:
        raise RunsError("give --state-dir DIR (repeatable) or --export FILE")
    runs = collect(dirs, files)
    if not runs:
        raise RunsError(f"no runs in {where}")
    return runs, where


def _fail(exc: RunsError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=2)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command(name="list")
def list_runs(
    state_dir: list[Path] | None = _STATE,
    export: list[Path] | None = _EXPORT,
    json_out: bool = _JSON,
) -> None:
    """One row per run: status, start and end, nodes, rounds, final accuracy, tags."""
    try:
        runs, _ = _runs(state_dir, export)
    except RunsError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(json.dumps([r.as_dict() for r in runs], indent=2))
        return
    table = Table("run", "status", "started", "ended", "nodes", "rounds", "accuracy", "tags")
    for r in runs:
        table.add_row(
            r.run, r.status, r.started or "-", r.ended or "-", str(len(r.nodes)),
            str(r.rounds), _acc(r.final_accuracy), ", ".join(r.tags),
        )  # fmt: skip
    Console(width=200).print(table)


@app.command()
def show(
    run: str = typer.Argument(..., help="The run (as p2pfl runs list names it)."),
    state_dir: list[Path] | None = _STATE,
    export: list[Path] | None = _EXPORT,
    json_out: bool = _JSON,
) -> None:
    """A run's record, configuration and accuracy per round."""
    try:
        runs, where = _runs(state_dir, export)
        summary = find(runs, run, where)
    except RunsError as exc:
        raise _fail(exc) from None
    data = summary.as_dict()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console(width=200)
    head = Table("field", "value", show_header=False)
    for key in ("run", "status", "started", "ended", "nodes", "rounds", "tags", "config_hash"):
        value = data[key]
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        head.add_row(key, "-" if shown in (None, "") else str(shown))
    head.add_row("final accuracy", _acc(summary.final_accuracy))
    console.print(head)
    config = Table("config", "value")
    for key, value in sorted(summary.config.items()):
        config.add_row(key, json.dumps(value))
    console.print(config)
    console.print(_curves([summary]))


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="RUN", help="The first run."),
    b: str = typer.Argument(..., metavar="RUN", help="The second run."),
    state_dir: list[Path] | None = _STATE,
    export: list[Path] | None = _EXPORT,
    plot: Path | None = typer.Option(None, "--plot", help="Write both accuracy curves (PNG)."),
    json_out: bool = _JSON,
) -> None:
    """Two runs' configuration differences and both accuracy curves."""
    try:
        runs, where = _runs(state_dir, export)
        first, second = find(runs, a, where), find(runs, b, where)
    except RunsError as exc:
        raise _fail(exc) from None
    diff = config_diff(first, second)
    if plot is not None:
        write_curves([first, second], plot)
    if json_out:
        typer.echo(json.dumps({
            "runs": [first.run, second.run],
            "config": {k: {first.run: va, second.run: vb} for k, (va, vb) in diff.items()},
            "accuracy": {s.run: s.as_dict()["accuracy"] for s in (first, second)},
        }, indent=2))  # fmt: skip
        return
    console = Console(width=200)
    table = Table("config", first.run, second.run, title="configuration differences")
    for key, (va, vb) in diff.items():
        table.add_row(key, json.dumps(va), json.dumps(vb))
    console.print(table if diff else "configurations are the same")
    console.print(_curves([first, second]))
    if plot is not None:
        console.print(f"wrote {plot}")


def _curves(runs: list[RunSummary]) -> Table:
    """Accuracy per round, one column per run."""
    table = Table("round", *(r.run for r in runs), title="accuracy (mean of the nodes)")
    curves = [r.curve for r in runs]
    for rnd in sorted({k for c in curves for k in c}):
        table.add_row(str(rnd), *(_acc(c.get(rnd)) for c in curves))
    return table


def write_curves(runs: list[RunSummary], path: Path) -> None:
    """The runs' accuracy curves in one PNG (matplotlib's object API, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in runs:
        curve = r.curve
        ax.plot(list(curve), list(curve.values()), marker="o", label=r.run)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean of the nodes)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
