"""The `p2pfl` command line: `run | sim | peers | doctor`, and the commands of other modules
(`topology | status | pause | resume | stop | monitor | export | bench | keys`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from p2pfl import __version__
from p2pfl.config import NodeConfig
from p2pfl.config_file import ConfigError
from p2pfl.flags import Flag, model_options

M = TypeVar("M")

app = typer.Typer(
    name="p2pfl",
    help=(
        "Decentralized gossip learning: every machine runs the same daemon, finds its peers, "
        "trains on its own data and swaps model weights with neighbours over MQTT. "
        "No aggregation server."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain text: "[default: ...]" must not be read as rich markup and vanish.
    rich_markup_mode=None,
)


def verbatim(epilog: str) -> str:
    """Keep the line breaks of an epilog's example paragraphs (click re-wraps the others)."""
    paragraphs = epilog.strip("\n").split("\n\n")
    kept = [f"\b\n{p}" if any(line.startswith("  ") for line in p.splitlines()) else p
            for p in paragraphs]  # fmt: skip
    return "\n\n".join(kept)


def _node_help(field: str) -> str:
    """A NodeConfig field's description, for a flag that sets it elsewhere than `p2pfl run`."""
    return NodeConfig.model_fields[field].description or ""


def _load_or_exit(load: Callable[[], M]) -> M:
    """Load a config; a bad one ends the command with its one-line message and status 2."""
    try:
        return load()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"p2pfl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Decentralized gossip learning over MQTT, with no aggregation server."""


_RUN_EPILOG = """
Examples:

  # four nodes on one machine, each with its own embedded broker, a ring, 30 sync rounds
  p2pfl run --id n0 --listen 127.0.0.1:18830 --state-dir st/n0 \\
      --peer n1=mqtt://127.0.0.1:18831 --peer n2=mqtt://127.0.0.1:18832 ... \\
      --schedule ring --mode sync --rounds 30 --partition dirichlet:0.5 \\
      --num-partitions 4 --partition-index 0

  # every node on one shared Mosquitto
  p2pfl run --broker mqtt://10.0.0.5:1883 --num-partitions 4 --partition-index 2

Flags override the keys of the TOML file given with --config (same names, with _ for -;
--peer, --interface and --tag are the lists peers, interfaces and tags).
"""


_RUN_FLAGS = {
    "id": Flag("--id"),
    "peers": Flag("--peer"),
    "discovery": Flag(split=","),
    "when": Flag(split=","),
    "metered_interfaces": Flag(split=","),
    "interfaces": Flag("--interface"),
    "tags": Flag("--tag"),
}
"""Flags spelled otherwise than `--field-name`; every other field of NodeConfig is `--its-name`."""


@app.command(epilog=verbatim(_RUN_EPILOG))
@model_options(NodeConfig, _RUN_FLAGS)
def run(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML file with any of these keys."
    ),
    *,
    overrides: dict[str, Any],
) -> None:
    """Run the node daemon on this machine: train, gossip with peers, merge. Stops on Ctrl-C."""
    import asyncio

    from p2pfl.config import load_config
    from p2pfl.logs import setup_logging

    cfg = _load_or_exit(lambda: load_config(config, overrides))
    setup_logging(cfg.log_format, cfg.log_level)
    from p2pfl.daemon import serve
    from p2pfl.identity import KeyFileError
    from p2pfl.learning.datasets import DatasetError
    from p2pfl.learning.models import ModelError
    from p2pfl.learning.privacy import PrivacyError
    from p2pfl.store import StateDirError

    try:
        asyncio.run(serve(cfg))
    except DatasetError as exc:  # a data file or dataset spec that cannot be used
        typer.echo(f"config error: dataset {exc}", err=True)
        raise typer.Exit(code=2) from None
    except ModelError as exc:  # a model spec that does not import or build
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except KeyFileError as exc:  # a key, trust list or certificate file that cannot be used
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except PrivacyError as exc:  # a model or data DP-SGD cannot train (found at start)
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except StateDirError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


_SIM_EPILOG = """
Examples:

  p2pfl sim                                   # built-in default: 16 nodes, three schedules
  p2pfl sim sim/byzantine.toml --merge trimmed-mean:0.2
  p2pfl sim sim/default.toml --schedule ring --rounds 50 --seed 1 --out results/ring
  p2pfl sim sim/default.toml --seed 0 --json > summary.json
  p2pfl sim sim/attacks.toml --matrix         # attack x merge rule x schedule, one table
  p2pfl sim sim/attacks.toml --merge clipped --seeds 0,1  # mean over two seeds
  p2pfl sim sim/dp.toml                       # accuracy against the DP budget epsilon
  p2pfl sim sim/batched.toml                  # 1,024 nodes, batched engine
  p2pfl sim --engine batched --kernels per-node   # the node engine's records, bit for bit
  p2pfl sim --schedule partial-mesh --dp-epsilon 8 --dp-delta 1e-5
  p2pfl sim sim/default.toml --broker mqtt://10.0.0.5:1883 --processes 2 --shard 0/2
                                              # machine A; machine B runs --shard 1/2

Scenario files are TOML (see sim/README.md); flags override them.
"""


@app.command(epilog=verbatim(_SIM_EPILOG))
def sim(
    scenario: Path | None = typer.Argument(
        None, help="Scenario TOML file. [default: the built-in default scenario]"
    ),
    nodes: int | None = typer.Option(None, help="Number of simulated nodes."),
    schedule: str | None = typer.Option(
        None, help="Run only this schedule instead of the scenario's compare list."
    ),
    rounds: int | None = typer.Option(None, help="Rounds per node."),
    engine: str | None = typer.Option(
        None,
        help="node | batched: real daemons on an in-memory bus, or every model as rows of "
        "stacked tensors trained together (sync rounds; for hundreds to thousands of nodes). "
        "[default: the scenario's engine; else batched from 128 nodes when it can run the "
        "scenario, else node]",
    ),
    eval_precision: str | None = typer.Option(
        None,
        "--eval-precision",
        help="auto | float32 | bfloat16: what the batched engine evaluates in (auto: bfloat16 "
        "where the CPU has bfloat16 instructions; accuracy within ~0.3 points of float32's). "
        "[default: the scenario's, else auto]",
    ),
    train_precision: str | None = typer.Option(
        None,
        "--train-precision",
        help="float32 | bfloat16: what the batched engine's training steps compute in "
        "(bfloat16: mixed precision, ~1.4x faster training with bfloat16 instructions, results not "
        "float32's). [default: the scenario's, else float32]",
    ),
    kernels: str | None = typer.Option(
        None,
        "--kernels",
        help="stacked | per-node: the batched engine trains the nodes of a chunk together, or "
        "each node with its own learner, the node engine's (float32; the node engine's records "
        "bit for bit without crashes or network faults, at about its speed: a fidelity "
        "check). [default: the scenario's, else stacked]",
    ),
    seed: int | None = typer.Option(
        None, help="Seed: data split, init, schedule, faults; replaces the scenario's seeds."
    ),
    seeds: str | None = typer.Option(
        None,
        help="Run the bench once per seed, e.g. 0,1,2, and show the mean over them "
        "(--matrix implied); replaces the scenario's seeds.",
    ),
    model: str | None = typer.Option(None, help="Every node's model: " + _node_help("model")),
    dataset: str | None = typer.Option(
        None, help="The data the nodes share out: " + _node_help("dataset")
    ),
    partition: str | None = typer.Option(
        None, help="How it is shared out: " + _node_help("partition")
    ),
    merge: str | None = typer.Option(
        None,
        help="Merge rule: clipped[:F] | average | weighted[:C] | median | trimmed-mean:F | "
        "krum:F (see `p2pfl run --help`).",
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="Every node trains with DP-SGD within this epsilon for its whole run "
        "(see `p2pfl run --help`); replaces the scenario's compare_dp.",
    ),
    dp_delta: float | None = typer.Option(None, "--dp-delta", help="Delta of the DP budget."),
    dp_max_grad_norm: float | None = typer.Option(
        None, "--dp-max-grad-norm", help="DP-SGD per-sample gradient clipping norm."
    ),
    out: Path = typer.Option(
        Path("p2pfl-sim"), help="Where metrics.jsonl, summary.json and the plots go."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print summary.json to stdout."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    html: bool = typer.Option(
        False,
        "--html",
        help="Also write report.html in --out: summary table, interactive curves and "
        "topology in one self-contained file (no --matrix).",
    ),
    broker: str | None = typer.Option(
        None, help="Run every node on this real broker (mqtt://HOST:PORT) instead of in memory."
    ),
    processes: int = typer.Option(
        1,
        min=1,
        help="Spread the nodes (with --shard: this shard's nodes) over this many local OS "
        "processes (needs --broker).",
    ),
    shard: str | None = typer.Option(
        None,
        help="I/P: run shard I of P here, the nodes i with i % P == I (needs --broker; start "
        "every shard with the same scenario, seed and flags). Shard 0 writes the summary.",
    ),
    matrix: bool = typer.Option(
        False,
        "--matrix",
        help="Run every attack x merge rule x schedule (x DP budget) (the scenario's attacks, "
        "compare_merges and compare_dp), once per seed (seeds), and print one table of mean "
        "honest accuracy, clean run included. On by itself when the scenario lists any of them.",
    ),
) -> None:
    """Simulate a whole network on this machine and compare schedules (no broker needed)."""
    from p2pfl.learning.datasets import DatasetError
    from p2pfl.learning.models import ModelError
    from p2pfl.simulation.cli import prepare, run_matrix, run_sim
    from p2pfl.simulation.shard import ShardError, parse_shard
    from p2pfl.transport.base import TransportError

    overrides = {"nodes": nodes, "schedule": schedule, "rounds": rounds, "engine": engine,
                 "eval_precision": eval_precision, "train_precision": train_precision,
                 "kernels": kernels, "seed": seed, "seeds": seeds,
                 "model": model, "dataset": dataset, "partition": partition,
                 "merge": merge, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta,
                 "dp_max_grad_norm": dp_max_grad_norm}  # fmt: skip
    if seed is not None and seeds is not None:
        typer.echo("config error: give --seed or --seeds, not both", err=True)
        raise typer.Exit(code=2)
    loaded, matrix = _load_or_exit(
        lambda: prepare(
            scenario, overrides, broker=broker, processes=processes, matrix=matrix, shard=shard
        )
    )
    if html and matrix:
        typer.echo("config error: --html reports a comparison run, not a --matrix", err=True)
        raise typer.Exit(code=2)
    try:
        if matrix:
            run_matrix(loaded, out=out, json_out=json_out, plots=not no_plots)
            return
        run_sim(
            loaded, out=out, json_out=json_out, plots=not no_plots, broker=broker, html=html,
            processes=processes, shard=None if shard is None else parse_shard(shard, loaded.nodes),
        )  # fmt: skip
    except (ShardError, TransportError) as exc:  # the shards could not finish together
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except (DatasetError, ModelError) as exc:  # the data file, read before any node starts
        prefix = "dataset " if isinstance(exc, DatasetError) else ""
        typer.echo(f"config error: {prefix}{exc}", err=True)
        raise typer.Exit(code=2) from None


@app.command()
def peers(
    network: str | None = typer.Option(None, help="Only this network. [default: every network]"),
    interface: list[str] | None = typer.Option(
        None, "--interface", help="IP of an interface to browse on (repeatable). [default: all]"
    ),
    timeout: float = typer.Option(3.0, help="Seconds to listen for announcements."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the p2pfl nodes announcing themselves over mDNS on the local network."""
    import asyncio
    import json

    from rich.console import Console

    from p2pfl.discovery.browse import browse, format_peers_table, peers_json

    try:
        found = asyncio.run(browse(network, interfaces=interface or (), duration=timeout))
    except OSError as exc:
        typer.echo(f"error: cannot use mDNS here: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if json_out:
        typer.echo(json.dumps(peers_json(found), indent=2))
    elif not found:
        where = f"network {network!r}" if network else "any network"
        typer.echo(f"no p2pfl nodes found on {where} within {timeout:g}s", err=True)
    else:
        Console().print(format_peers_table(found))


_DOCTOR_EPILOG = """
Checks the interfaces mDNS would use (with a multicast self-test that stays on this host), the
address a node here would advertise, and, for every node found over mDNS or given with --peer,
that its broker accepts a TCP connection and an MQTT CONNECT from here.

Examples:

  # this machine does not see the others of network "lab"
  p2pfl doctor --network lab

  # check a static setup (no multicast needed), only on the LAN interface
  p2pfl doctor --interface 192.168.1.20 --peer n1=mqtt://192.168.1.21:1883

  # the same checks as JSON, e.g. to attach to a bug report
  p2pfl doctor --network lab --timeout 5 --json > doctor.json

Exit status: 0 when everything checked works, 1 when a problem was found, 2 for bad arguments.
"""


@app.command(epilog=verbatim(_DOCTOR_EPILOG))
def doctor(
    network: str | None = typer.Option(
        None, help="The network the others run (p2pfl run --network). [default: any network]"
    ),
    interface: list[str] | None = typer.Option(
        None,
        "--interface",
        help="IP of an interface to check and browse on (repeatable), as given to p2pfl run. "
        "[default: all interfaces]",
    ),
    timeout: float = typer.Option(
        3.0, help="Seconds to listen for mDNS answers, and to wait for each broker."
    ),
    peer: list[str] | None = typer.Option(
        None, "--peer", help="Also check the broker of ID=mqtt://HOST:PORT (repeatable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object, not tables."),
) -> None:
    """Find out why this machine does not see the others, and what to fix."""
    import asyncio
    import ipaddress
    import json

    from rich.console import Console

    from p2pfl.config import StaticPeer
    from p2pfl.doctor import diagnose, render, report_json
    from p2pfl.protocol.topics import validate_name

    try:
        if network is not None:
            validate_name(network, "network name")
        if not timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {timeout:g}")
        chosen = []
        for ip in interface or ():
            try:
                chosen.append(str(ipaddress.IPv4Address(ip)))
            except ValueError:
                raise ValueError(f"--interface {ip!r} is not an IPv4 address") from None
        static = [StaticPeer.parse(text) for text in peer or ()]
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    try:
        report = asyncio.run(diagnose(network, chosen, timeout, static))
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    if json_out:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        render(report, Console())
    raise typer.Exit(code=0 if report.ok else 1)


def _register() -> None:
    """The commands whose code lives in modules of their own, in the order --help lists them."""
    from p2pfl import control_command as control
    from p2pfl import export_command, keys_command, runs_command, topology_command
    from p2pfl.bench import command as bench
    from p2pfl.monitor import command as monitor

    app.command()(topology_command.topology)
    app.add_typer(keys_command.app, name="keys", epilog=verbatim(keys_command.EPILOG))
    for command in (control.status, control.pause, control.resume, control.stop):
        app.command(epilog=verbatim(control.EPILOG))(command)
    app.command(name="monitor", epilog=verbatim(monitor.EPILOG))(monitor.monitor)
    app.command(name="export", epilog=verbatim(export_command.EPILOG))(export_command.export)
    app.add_typer(runs_command.app, name="runs", epilog=verbatim(runs_command.EPILOG))
    app.command(name="bench", epilog=verbatim(bench.EPILOG))(bench.bench)


_register()
