"""The `p2pfl bench` command: run one bench or all, print tables, write JSON."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from p2pfl.bench import BENCHES
from p2pfl.bench.core import BenchOptions, BenchResult, Size, machine


def _listing() -> str:
    return "\n".join(f"  {name:<12} {b.summary}" for name, b in BENCHES.items())


EPILOG = f"""\
Benches:

{_listing()}

Every bench measures its own baseline in the same run and prints a ratio (or a growth factor
per doubling), so figures from different machines compare. Results go to --out as
NAME.json (and all.json for `all`), with the machine they ran on.

  p2pfl bench all --quick            # every bench, under 10 minutes on 2 cores
  p2pfl bench overhead               # one bench at full size
  p2pfl bench scale --big            # adds 4,096 nodes
  p2pfl bench all --quick --json     # the JSON on stdout (tables go to stderr)
"""


def bench(
    name: str = typer.Argument(
        ..., help="`all`, or one of the benches listed below.", show_default=False, metavar="NAME"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Smaller sizes: `bench all --quick` takes under 10 minutes."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the results as JSON on stdout (tables go to stderr)."
    ),
    out: Path = typer.Option(Path("bench-results"), help="Where NAME.json files are written."),
    big: bool = typer.Option(False, "--big", help="scale: add 4,096 nodes."),
    size: str | None = typer.Option(
        None, hidden=True, help="tiny | quick | full (tiny: seconds, for the tests)."
    ),
) -> None:
    """Measure speed, scale, network cost and footprint as ratios against same-run baselines."""
    names = list(BENCHES) if name == "all" else [name]
    if name != "all" and name not in BENCHES:
        _fail(f"unknown bench {name!r}; choose all or one of: {', '.join(BENCHES)}")
    chosen: Size = "quick" if quick else "full"
    if size is not None:
        if size not in ("tiny", "quick", "full"):
            _fail(f"--size must be tiny, quick or full, not {size!r}")
        chosen = size  # type: ignore[assignment]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--out {out}: {exc.strerror or exc}")
    # The nodes a bench runs would say every warning a real network deserves (peers slow to
    # appear at start-up, most of all): the figures are what the user asked for.
    logging.getLogger("p2pfl").setLevel(logging.ERROR)
    tables = Console(stderr=json_out)
    facts = machine()
    docs: list[dict[str, Any]] = []
    failed = False
    for bench_name in names:
        doc = _run_one(bench_name, chosen, big, facts, tables)
        failed |= "error" in doc
        (out / f"{bench_name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        docs.append(doc)
    if name == "all":
        (out / "all.json").write_text(json.dumps(_all(docs, facts), indent=2) + "\n")
        tables.print(figures_table(docs))
    tables.print(f"[dim]results in {out}/ (machine: {facts['cpu']}, {facts['cores']} cores)")
    if json_out:
        print(json.dumps(_all(docs, facts) if name == "all" else docs[0], indent=2))
    if failed:
        raise typer.Exit(code=1)


def _run_one(
    name: str, size: Size, big: bool, facts: dict[str, Any], console: Console
) -> dict[str, Any]:
    started = time.monotonic()
    with console.status(f"{name}…") as status:

        def progress(line: str) -> None:
            status.update(line)

        options = BenchOptions(size=size, big=big, progress=progress)
        try:
            result = BENCHES[name].run(options)
        except Exception as exc:  # one broken bench must not hide the others' figures
            logging.getLogger(__name__).exception("bench %s failed", name)
            console.print(f"[red]bench {name} failed: {exc}")
            return {"bench": name, "size": size, "machine": facts, "error": str(exc)}
    seconds = round(time.monotonic() - started, 1)
    console.print(result_table(result, seconds))
    for line in figure_lines(result):
        console.print(line)
    return {"bench": name, "size": size, "seconds": seconds, "machine": facts} | result.as_json()


def result_table(result: BenchResult, seconds: float) -> Table:
    """One bench's rows, then its figures against their goals."""
    table = Table(title=f"{result.name}: {result.title} ({seconds:.0f} s)", title_justify="left")
    for column in result.columns:
        table.add_column(column, justify="left" if column == result.columns[0] else "right")
    for row in result.rows:
        table.add_row(*(_cell(row.get(column)) for column in result.columns))
    return table


def figure_lines(result: BenchResult) -> list[str]:
    """A bench's headline figures against their goals, then its notes."""
    lines = []
    for figure in result.figures:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: ""}[figure.met]
        goal = f" (goal {figure.goal}: {verdict})" if figure.goal else ""
        note = f" [dim]{figure.note}[/]" if figure.note else ""
        lines.append(f"  [bold]{figure.name}[/]: {figure.text()}{goal}{note}")
    lines.extend(f"  [dim]{note}[/]" for note in result.notes)
    return lines


def figures_table(docs: list[dict[str, Any]]) -> Table:
    """Every bench's headline figures in one table (what the README's Performance section shows)."""
    table = Table(title="p2pfl bench: figures", title_justify="left")
    for column in ("bench", "figure", "value", "goal", "met"):
        table.add_column(column)
    for doc in docs:
        if "error" in doc:
            table.add_row(doc["bench"], "[red]failed", doc["error"], "", "")
            continue
        for f in doc["figures"]:
            value = "n/a" if f["value"] is None else f"{f['value']:.3g} {f['unit']}".strip()
            met = {True: "yes", False: "[red]no", None: ""}[f["met"]]
            table.add_row(doc["bench"], f["name"], value, f["goal"] or "", met)
    return table


def _all(docs: list[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    return {"machine": facts, "benches": {doc["bench"]: doc for doc in docs}}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)
