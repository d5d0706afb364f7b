"""What `p2pfl sim` shows: a progress bar while it runs, a comparison table and files after.

`run_sim` runs a scenario once per schedule; `run_matrix` runs the attack bench (every attack
with every merge rule and schedule, and DP budget, once per seed, see `p2pfl.simulation.matrix`)
with the same engine.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from p2pfl.config_file import ConfigError
from p2pfl.learning.datasets import Dataset, DatasetError, load_dataset
from p2pfl.learning.models import check_model
from p2pfl.learning.privacy import PrivacyError
from p2pfl.logs import setup_logging
from p2pfl.simulation.batched import (
    BATCHED_FROM,
    BatchedSimulation,
    engine_for,
    model_refusal,
    refusal,
)
from p2pfl.simulation.engine import Record, ScheduleRun, Simulation, check_privacy
from p2pfl.simulation.html_report import overlays, write_html
from p2pfl.simulation.matrix import (
    Cell,
    MatrixRow,
    axes,
    cell_scenario,
    matrix_json,
    matrix_rows,
    matrix_table,
    mean_over_seeds,
    plot_privacy,
    privacy_axis,
    seed_axis,
    write_matrix,
)
from p2pfl.simulation.procs import run_in_processes
from p2pfl.simulation.report import (
    MetricsWriter,
    plot,
    summarize,
    summary_json,
    summary_table,
    write_summary,
)
from p2pfl.simulation.scenario import Scenario, load_scenario
from p2pfl.simulation.shard import Shard, parse_shard, run_shard
from p2pfl.transport.address import parse_broker_uri


def prepare(
    path: Path | None,
    overrides: Mapping[str, Any],
    *,
    broker: str | None = None,
    processes: int = 1,
    matrix: bool = False,
    shard: str | None = None,
) -> tuple[Scenario, bool]:
    """The scenario `p2pfl sim` runs, its `engine` resolved, and whether as the attack bench
    (`--matrix`).

    Raises ConfigError, one line naming the problem, for anything unusable before it runs.
    """
    loaded = load_scenario(path, overrides)
    try:
        if broker is not None:
            parse_broker_uri(broker)
        elif processes > 1:
            raise ValueError("--processes needs --broker: processes share no memory bus")
        if shard is not None:
            if broker is None:
                raise ValueError("--shard needs --broker: the shards meet on a shared broker")
            parse_shard(shard, loaded.nodes)
        matrix = matrix or bool(
            loaded.attacks or loaded.compare_merges or loaded.compare_dp or loaded.seeds
        )
        if matrix and broker is not None:
            raise ValueError("--matrix runs on the in-memory bus only; drop --broker")
        check_model(loaded.node.model)
        check_privacy(loaded)
        loaded = loaded.model_copy(update={"engine": _engine(loaded, broker, matrix)})
    except DatasetError as exc:
        raise ConfigError(f"config error: dataset {exc}") from None
    except PrivacyError as exc:  # a model DP-SGD cannot train: said before anything runs
        raise ConfigError(f"config error: node.{exc}") from None
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None
    return loaded, matrix


def _engine(scenario: Scenario, broker: str | None, matrix: bool) -> str:
    """The engine to run with (ValueError: `_pick_engine`'s, or bfloat16 training on the node
    engine, which trains each node's own learner in float32)."""
    chosen = _pick_engine(scenario, broker, matrix)
    if chosen == "node" and scenario.train_precision != "float32":
        raise ValueError(
            f"train_precision = {scenario.train_precision!r}: only the batched engine trains in "
            "it (the node engine trains in float32); use --engine batched or drop the key"
        )
    return chosen


def _pick_engine(scenario: Scenario, broker: str | None, matrix: bool) -> str:
    """The engine to run with. One the scenario (or --engine) names must be able to run it
    (ValueError saying why not); an automatic choice of `batched` falls back to `node`."""
    chosen = engine_for(scenario, broker=broker, matrix=matrix)
    if chosen != "batched":
        return chosen
    why = refusal(scenario, broker=broker, matrix=matrix)
    if why is None:
        node = scenario.node
        why = model_refusal(scenario, load_dataset(node.dataset, seed=node.seed))
    if why is None:
        return "batched"
    if scenario.engine == "batched":
        raise ValueError(why)
    return "node"


def run_sim(
    scenario: Scenario,
    *,
    out: Path,
    json_out: bool,
    plots: bool = True,
    broker: str | None = None,
    processes: int = 1,
    shard: Shard | None = None,
    html: bool = False,
) -> dict[str, Any]:
    """Run the scenario with a progress bar; write metrics, summary, plots and report.html in `out`.

    With `shard` (and `broker`), only this machine's shard of the nodes runs here; shard 0
    gathers the others' records and writes the summary, the others return `{}`.
    """
    console = Console(stderr=True)
    setup_logging("text", "warning")
    config = scenario.node_config(scenario.compare[0], 0, "n01")
    # Loaded here, before the progress bar and any output: a bad data file is one line.
    dataset = load_dataset(config.dataset, seed=config.seed)
    _say(console, full_view_note(scenario))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shown = scenario.nodes  # nodes whose records this command sees
    if shard is not None and shard.index > 0:
        shown = len(shard.indices(scenario.nodes))
    per_schedule = shown * config.rounds if config.rounds else None
    latest: dict[str, dict[str, float]] = defaultdict(dict)

    with (
        MetricsWriter(out) as writer,
        _progress(console, json_out, width=14, acc="acc ") as progress,
    ):
        tasks = {
            name: progress.add_task(name, total=per_schedule, acc="  -  ", start=False)
            for name in scenario.compare
        }
        started: set[str] = set()

        def on_record(record: Record) -> None:
            name = record["schedule"]
            if name not in started:
                started.add(name)
                progress.start_task(tasks[name])
            writer.write([record])
            if record["honest"]:
                latest[name][record["node"]] = record["accuracy"]
            accs = latest[name].values()
            mean = sum(accs) / len(accs) if accs else 0.0
            progress.update(tasks[name], advance=1, acc=f"{mean:.3f}")

        runs = _run_engine(scenario, dataset, on_record, broker, processes, shard)

    if shard is not None and shard.index > 0:
        line = f"shard {shard}: {shown} nodes done; shard 0 writes the summary"
        (Console(stderr=True) if json_out else Console()).print(line)
        return {}
    records = [r for run in runs for r in run.records]
    summary = summarize(records, wall_seconds={run.schedule: run.wall_seconds for run in runs})
    summary["scenario"] = scenario.name
    for run in runs:
        summary["schedules"][run.schedule]["network_drops"] = run.dropped
    write_summary(summary, out)
    written = _figures(records, summary, scenario, out, plots=plots, html=html)
    if json_out:
        sys.stdout.write(summary_json(summary) + "\n")
    else:
        stdout = Console()
        if not stdout.is_terminal:
            stdout = Console(width=120)  # piped: no terminal width to follow
        stdout.print(summary_table(summary, scenario.name))
        files = ", ".join(p.name for p in [out / "metrics.jsonl", out / "summary.json", *written])
        stdout.print(f"[dim]wrote {files} in {out}[/dim]")
    logging.getLogger(__name__).debug("sim done scenario=%s", scenario.name)
    return summary


def _say(console: Console, note: str | None) -> None:
    if note is not None:
        console.print(note, style="yellow", highlight=False, markup=False)


def full_view_note(scenario: Scenario) -> str | None:
    """A note for a node-engine run of many nodes with full views, where presence alone (every
    node hearing every other's heartbeats, N^2 records) grows to dominate the rounds."""
    n = scenario.nodes
    if scenario.engine != "node" or n < BATCHED_FROM or scenario.node.view_size:
        return None
    return (
        f"note: {n:,} nodes on the node engine with full views (view_size = 0): every node "
        f"hears every other's presence ({n * (n - 1):,} records a heartbeat, growing as N^2); "
        "view_size = 32 under [node] bounds that per node (as sim/large.toml does; not with a "
        "sync random walk, walkers or topology_file)"
    )


def _figures(
    records: list[Record],
    summary: dict[str, Any],
    scenario: Scenario,
    out: Path,
    *,
    plots: bool,
    html: bool,
) -> list[Path]:
    """The PNG plots (`plots`) and report.html (`html`) written in `out`."""
    written = plot(records, out) if plots else []
    if html:
        written.append(write_html(records, summary, scenario.name, overlays(scenario), out))
    return written


def _run_engine(
    scenario: Scenario,
    dataset: Dataset,
    on_record: Callable[[Record], None],
    broker: str | None,
    processes: int,
    shard: Shard | None,
) -> list[ScheduleRun]:
    """Every schedule's run, by the engine and placement asked for."""
    if scenario.engine == "batched":
        return BatchedSimulation(scenario, on_record=on_record, dataset=dataset).run()
    if shard is not None and broker is not None:
        return run_shard(
            scenario, shard, broker=broker, processes=processes, on_record=on_record,
            dataset=dataset,
        )  # fmt: skip
    if processes > 1 and broker is not None:
        return run_in_processes(scenario, broker=broker, processes=processes, on_record=on_record)
    simulation = Simulation(scenario, on_record=on_record, broker=broker, dataset=dataset)
    return asyncio.run(simulation.run())


class _CellRecorder:
    """Writes one bench cell's records, tagged with its attack and merge rule (and DP budget,
    seed), and shows the honest nodes' mean accuracy on its progress bar."""

    def __init__(
        self,
        writer: MetricsWriter,
        progress: Progress,
        task: TaskID,
        *,
        attack: str,
        merge: str,
        dp: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.writer = writer
        self.progress = progress
        self.task = task
        self.tag: dict[str, str | int] = {"attack": attack, "merge": merge}
        if dp is not None:
            self.tag["dp"] = dp
        if seed is not None:
            self.tag["seed"] = seed
        self.latest: dict[str, float] = {}

    def __call__(self, record: Record) -> None:
        self.writer.write([{**self.tag, **record}])
        if record["honest"]:
            self.latest[record["node"]] = record["accuracy"]
        mean = sum(self.latest.values()) / len(self.latest) if self.latest else 0.0
        self.progress.update(self.task, advance=1, acc=f"acc {mean:.3f}")


BenchRun = tuple[str, str, str, str | None, int]
"""One run of the bench: (attack, merge, schedule, DP budget or None, seed)."""


def _bench_runs(scenario: Scenario) -> list[BenchRun]:
    """Every run of the bench, seed by seed, in the table's order within a seed."""
    attacks, merges = axes(scenario)
    budgets: tuple[str | None, ...] = privacy_axis(scenario) or (None,)
    return [(a, m, s, dp, seed) for seed in seed_axis(scenario) for s in scenario.compare
            for m in merges for dp in budgets for a in attacks]  # fmt: skip


def _run_cell(cell: Scenario, dataset: Dataset, recorder: _CellRecorder) -> dict[str, Any]:
    """One bench run (a single-schedule scenario): its schedule's summary, empty when no
    node reported."""
    (schedule,) = cell.compare
    simulation = Simulation(cell, on_record=recorder, dataset=dataset)
    (run,) = asyncio.run(simulation.run())
    result = summarize(run.records, wall_seconds={schedule: run.wall_seconds})
    reached: dict[str, Any] = result["schedules"].get(schedule, {})
    return reached


def run_matrix(
    scenario: Scenario, *, out: Path, json_out: bool, plots: bool = True
) -> list[dict[str, Any]]:
    """Run every (attack, merge rule, schedule[, DP budget]) of `scenario`, once per seed of
    its seed axis, with a progress bar over the runs; print one table (or, with `json_out`,
    its rows as JSON) and write it into `out`, with the plot of accuracy against epsilon when
    there is a privacy axis.

    Every cell is a single-schedule run of the same engine with the same rounds, once per
    seed (the dataset loaded once per seed: the seed draws the data and its split); with a
    seed axis the table shows the mean over the seeds. `metrics.jsonl` holds every run's
    records, tagged with `attack` and `merge` (and `dp`, and `seed` with a seed axis).
    """
    console = Console(stderr=True)
    setup_logging("text", "warning")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    bench = _bench_runs(scenario)
    config = scenario.node_config(scenario.compare[0], 0, "n01")
    datasets = {s: load_dataset(config.dataset, seed=s) for s in seed_axis(scenario)}
    per_run = scenario.nodes * config.rounds if config.rounds else None
    accuracies: dict[Cell, dict[int, float | None]] = defaultdict(dict)
    spent: dict[Cell, dict[int, float | None]] = defaultdict(dict)
    tag_seed = bool(scenario.seeds)

    with (
        MetricsWriter(out) as writer,
        _progress(console, json_out, width=40) as progress,
    ):
        runs = progress.add_task(f"{scenario.name}: runs", total=len(bench), acc="")
        rounds = progress.add_task("", total=per_run, acc="")
        for attack, merge, schedule, dp, seed in bench:
            what = " · ".join(x for x in (attack, merge, schedule) if x)
            what += ("" if dp is None else f" · dp {dp}") + (f" · seed {seed}" if tag_seed else "")
            progress.reset(rounds, description=f"  {what}", acc="")
            recorder = _CellRecorder(writer, progress, rounds, attack=attack, merge=merge, dp=dp,
                                     seed=seed if tag_seed else None)  # fmt: skip
            cell = cell_scenario(scenario, attack, merge, schedule, dp, seed=seed)
            reached = _run_cell(cell, datasets[seed], recorder)
            key: Cell = (attack, merge, schedule) if dp is None else (attack, merge, schedule, dp)
            accuracies[key][seed] = reached.get("final_mean_accuracy")
            spent[key][seed] = reached.get("max_epsilon")
            progress.advance(runs)

    rows = matrix_rows(
        {cell: mean_over_seeds(by_seed) for cell, by_seed in accuracies.items()},
        {cell: _most(by_seed.values()) for cell, by_seed in spent.items()},
        per_seed=accuracies if tag_seed else None,
    )
    _show_matrix(rows, scenario.name, out, json_out=json_out, plots=plots)
    return [row.model_dump() for row in rows]


def _most(values: Iterable[float | None]) -> float | None:
    """The most epsilon any run of a cell spent (None: no DP in it)."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _show_matrix(
    rows: list[MatrixRow], name: str, out: Path, *, json_out: bool, plots: bool
) -> None:
    """Write the bench's files (and privacy plot) in `out`; print its table or JSON rows."""
    written = write_matrix(rows, name, out)
    if plots and (drawn := plot_privacy(rows, out)) is not None:
        written.append(drawn)
    if json_out:
        sys.stdout.write(matrix_json(rows, name))
        return
    stdout = Console()
    if not stdout.is_terminal:
        stdout = Console(width=160)  # piped: no terminal width to follow
    stdout.print(matrix_table(rows, name))
    files = ", ".join(p.name for p in [out / "metrics.jsonl", *written])
    stdout.print(f"[dim]wrote {files} in {out}[/dim]")


def _progress(console: Console, json_out: bool, *, width: int, acc: str = "") -> Progress:
    """The progress display of a run or a matrix of runs (quiet when JSON goes to a pipe)."""
    return Progress(
        TextColumn(f"{{task.description:<{width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(acc + "{task.fields[acc]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and json_out,
    )
