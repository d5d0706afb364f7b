"""The `p2pfl` command line: `run | sim | monitor | peers | doctor | keys | topology`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from p2pfl import __version__

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


def _not_yet(command: str, what: str) -> None:
    typer.echo(
        f"p2pfl {command}: not implemented yet in p2pfl {__version__} (planned with {what}).",
        err=True,
    )
    raise typer.Exit(code=1)


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

Flags override the keys of the TOML file given with --config (same names, with _ for -).
"""


@app.command(epilog=verbatim(_RUN_EPILOG))
def run(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML file with any of these keys."
    ),
    network: str | None = typer.Option(
        None, help="Network name; nodes only talk within one. [default: default]"
    ),
    node_id: str | None = typer.Option(
        None, "--id", help="Node id. [default: hostname-based, kept in the state dir]"
    ),
    broker: str | None = typer.Option(
        None, help="embedded | local | mqtt[s]://HOST:PORT. [default: embedded]"
    ),
    listen: str | None = typer.Option(
        None, help="HOST:PORT of the embedded/local broker; port 0 = free. [default: 0.0.0.0:0]"
    ),
    advertise: str | None = typer.Option(
        None,
        help="Host(s) peers use to reach this node's broker, comma-separated (NAT, containers). "
        "[default: every non-loopback interface address]",
    ),
    ca: Path | None = typer.Option(None, help="CA file to verify mqtts:// brokers (peers' too)."),
    cert: Path | None = typer.Option(
        None, help="Client certificate for the --broker URI (sent to that broker only)."
    ),
    key: Path | None = typer.Option(None, help="Client key for --cert."),
    username: str | None = typer.Option(
        None, help="User name for the --broker URI (peers' brokers get a key-based login)."
    ),
    password: str | None = typer.Option(
        None, help="Password for the --broker URI; never sent to any other broker."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="Certificate for a TLS listener of this node's broker (mqtts://)."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Key for --tls-cert."),
    password_file: Path | None = typer.Option(
        None,
        "--password-file",
        help="Mosquitto password file for --broker local; with --tls-cert it may listen on "
        "the LAN (without both it listens on loopback only).",
    ),
    peer: list[str] | None = typer.Option(
        None, "--peer", help="Static peer ID=mqtt://HOST:PORT (repeatable)."
    ),
    discovery: str | None = typer.Option(
        None, help="Comma list of mdns,presence,static. [default: all three]"
    ),
    interface: list[str] | None = typer.Option(
        None,
        "--interface",
        help="IP of an interface to use (repeatable): mDNS runs there and it is the address "
        "announced. [default: all interfaces]",
    ),
    schedule: str | None = typer.Option(
        None, help="ring | random-walk | partial-mesh. [default: ring]"
    ),
    degree: int | None = typer.Option(
        None, help="Neighbours per node for partial-mesh. [default: 4]"
    ),
    topology_file: Path | None = typer.Option(
        None, help="Fixed graph (TOML edge list or GraphML) for partial-mesh."
    ),
    walkers: int | None = typer.Option(
        None, help="Model tokens circulating (ring, random-walk); 0 = every node active."
    ),
    token_timeout: float | None = typer.Option(
        None,
        help="Walkers: regenerate a token after this many seconds with no sign of one (none "
        "arrived, no peer's round rose). [default: 30]",
    ),
    mode: str | None = typer.Option(
        None, help="async (gossip) | sync (rounds, reproducible). [default: async]"
    ),
    rounds: int | None = typer.Option(
        None, help="Stop after N rounds; 0 = until stopped. [default: 0]"
    ),
    duration: float | None = typer.Option(None, help="Stop after this many seconds."),
    period: float | None = typer.Option(
        None, help="Async mode: pause between local steps, seconds."
    ),
    round_timeout: float | None = typer.Option(
        None, help="Sync mode: wait this long for neighbours' models. [default: 30]"
    ),
    min_peers: int | None = typer.Option(
        None,
        help="Wait for this many peers before round 1. [default: all static peers if sync]",
    ),
    presence_ttl: float | None = typer.Option(
        None, help="Forget a silent peer after this many seconds. [default: 15]"
    ),
    dataset: str | None = typer.Option(
        None, help="mnist1d | digits | npz:PATH. [default: mnist1d]"
    ),
    partition: str | None = typer.Option(
        None, help="iid | dirichlet:ALPHA | shards:K. [default: iid]"
    ),
    num_partitions: int | None = typer.Option(
        None, help="How many shares the dataset is cut into. [default: 1]"
    ),
    partition_index: int | None = typer.Option(
        None, help="Which share this node trains on. [default: 0]"
    ),
    model: str | None = typer.Option(
        None, help="logreg | mlp | cnn1d | package.module:factory. [default: cnn1d]"
    ),
    merge: str | None = typer.Option(
        None,
        help="clipped[:F] (bounds any peer's pull and distrusts peers whose models keep "
        "landing far; best on partial-mesh) | average (no defence) | weighted[:C] | median | "
        "trimmed-mean:F | krum:F (several models per merge: partial-mesh only). "
        "[default: clipped]",
    ),
    secure_aggregation: bool | None = typer.Option(
        None,
        "--secure-aggregation",
        help="Sync partial-mesh with --merge average: mask the models sent each round so a "
        "receiver learns only their sum (pairwise X25519 masks; one extra message when a "
        "sender drops out). Does not combine with robust merges.",
    ),
    optimizer: str | None = typer.Option(None, help="sgd | adam. [default: sgd]"),
    lr: float | None = typer.Option(None, help="Learning rate. [default: 0.05]"),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round. [default: 3]"),
    batch_size: int | None = typer.Option(None, help="Batch size. [default: 32]"),
    mu: float | None = typer.Option(None, help="FedProx proximal term; 0 = off. [default: 0]"),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        help="Differential privacy: train with DP-SGD (Opacus) so that this node's whole "
        "planned run (--rounds) spends at most this epsilon on its own samples. "
        "[default: off]",
    ),
    dp_delta: float | None = typer.Option(
        None, "--dp-delta", help="Delta of the DP budget. [default: 1e-5]"
    ),
    dp_max_grad_norm: float | None = typer.Option(
        None, "--dp-max-grad-norm", help="DP-SGD per-sample gradient clipping norm. [default: 1.0]"
    ),
    codec: str | None = typer.Option(None, help="raw | fp16 | int8 | topk:F. [default: raw]"),
    seed: int | None = typer.Option(
        None, help="Seed for data split, model init and schedule. [default: 0]"
    ),
    max_message_size: int | None = typer.Option(
        None, help="Refuse incoming messages larger than this, bytes. [default: 64 MiB]"
    ),
    max_chunk: int | None = typer.Option(
        None, help="Split models into MQTT messages of at most this many bytes. [default: 1 MiB]"
    ),
    metrics_port: int | None = typer.Option(
        None, help="Serve Prometheus metrics (p2pfl_*) on this port."
    ),
    metrics_host: str | None = typer.Option(
        None, help="Address the metrics endpoint binds. [default: 127.0.0.1]"
    ),
    telemetry_interval: float | None = typer.Option(
        None, help="Publish status for monitors every N seconds; 0 = off. [default: 5]"
    ),
    telemetry_detail: str | None = typer.Option(
        None,
        help="What telemetry reveals: full | metrics (no confusion matrix, no weight "
        "projection: monitors leave the node out of global metrics) | off (no telemetry "
        "records; warnings are still forwarded). [default: full]",
    ),
    run_name: str | None = typer.Option(None, help="A name for this run, shown by monitors."),
    tag: list[str] | None = typer.Option(None, "--tag", help="A tag for this run (repeatable)."),
    state_dir: Path | None = typer.Option(
        None, help="Identity, checkpoints, metrics. [default: ~/.local/state/p2pfl/NET/ID]"
    ),
    trust: str | None = typer.Option(
        None,
        help="Whose messages to believe: tofu (pin the first key seen per id) | allowlist "
        "(only trusted_keys: see p2pfl keys) | ca (nodes with a certificate from the network "
        "key --ca-key: see p2pfl keys ca) | open (no checks: demos). [default: tofu]",
    ),
    ca_key: str | None = typer.Option(
        None,
        "--ca-key",
        help="With --trust ca: the network's public key ('p2pfl-ed25519 ...', printed by "
        "p2pfl keys ca init) or a file holding it.",
    ),
    max_peers: int | None = typer.Option(
        None, help="Track at most this many peer ids (keys, replay state). [default: 256]"
    ),
    max_clock_skew: float | None = typer.Option(
        None, help="Refuse messages stamped further than this from our clock, s. [default: 300]"
    ),
    log_format: str | None = typer.Option(None, help="text | json. [default: text]"),
    log_level: str | None = typer.Option(
        None, help="debug | info | warning | error. [default: info]"
    ),
) -> None:
    """Run the node daemon on this machine: train, gossip with peers, merge. Stops on Ctrl-C."""
    import asyncio

    from p2pfl.config import ConfigError, StaticPeer, load_config
    from p2pfl.logs import setup_logging

    overrides: dict[str, Any] = {
        "network": network,
        "id": node_id,
        "broker": broker,
        "listen": listen,
        "advertise": advertise,
        "ca": ca,
        "cert": cert,
        "key": key,
        "username": username,
        "password": password,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "password_file": password_file,
        "schedule": schedule,
        "degree": degree,
        "topology_file": topology_file,
        "walkers": walkers,
        "token_timeout": token_timeout,
        "mode": mode,
        "rounds": rounds,
        "duration": duration,
        "period": period,
        "round_timeout": round_timeout,
        "presence_ttl": presence_ttl,
        "min_peers": min_peers,
        "dataset": dataset,
        "partition": partition,
        "num_partitions": num_partitions,
        "partition_index": partition_index,
        "model": model,
        "merge": merge,
        "secure_aggregation": secure_aggregation,
        "optimizer": optimizer,
        "lr": lr,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "mu": mu,
        "dp_epsilon": dp_epsilon,
        "dp_delta": dp_delta,
        "dp_max_grad_norm": dp_max_grad_norm,
        "codec": codec,
        "seed": seed,
        "state_dir": state_dir,
        "trust": trust,
        "ca_key": ca_key,
        "max_peers": max_peers,
        "max_clock_skew": max_clock_skew,
        "telemetry_interval": telemetry_interval,
        "telemetry_detail": telemetry_detail,
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,
        "run_name": run_name,
        "tags": tag or None,
        "max_message_size": max_message_size,
        "max_chunk": max_chunk,
        "log_format": log_format,
        "log_level": log_level,
    }
    if interface:
        overrides["interfaces"] = list(interface)
    if discovery is not None:
        overrides["discovery"] = [s.strip() for s in discovery.split(",") if s.strip()]
    try:
        if peer:
            overrides["peers"] = [StaticPeer.parse(p).model_dump() for p in peer]
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError) as exc:
        message = str(exc)
        if not message.startswith("config error"):
            message = f"config error: peer: {message}"
        typer.echo(message, err=True)
        raise typer.Exit(code=2) from None
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
  p2pfl sim sim/dp.toml                       # accuracy against the DP budget epsilon
  p2pfl sim --schedule partial-mesh --dp-epsilon 8 --dp-delta 1e-5

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
    seed: int | None = typer.Option(None, help="Seed: data split, init, schedule, faults."),
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
    broker: str | None = typer.Option(
        None, help="Run every node on this real broker (mqtt://HOST:PORT) instead of in memory."
    ),
    processes: int = typer.Option(
        1, min=1, help="Spread the nodes over this many OS processes (needs --broker)."
    ),
    matrix: bool = typer.Option(
        False,
        "--matrix",
        help="Run every attack x merge rule x schedule (x DP budget) (the scenario's attacks, "
        "compare_merges and compare_dp) and print one table of mean honest accuracy, clean "
        "run included. On by itself when the scenario lists any of them.",
    ),
) -> None:
    """Simulate a whole network on this machine and compare schedules (no broker needed)."""
    from p2pfl.config import ConfigError
    from p2pfl.learning.datasets import DatasetError
    from p2pfl.learning.models import ModelError, check_model
    from p2pfl.learning.privacy import PrivacyError
    from p2pfl.simulation.cli import run_sim
    from p2pfl.simulation.scenario import load_scenario

    overrides = {"nodes": nodes, "schedule": schedule, "rounds": rounds, "seed": seed,
                 "merge": merge, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta,
                 "dp_max_grad_norm": dp_max_grad_norm}  # fmt: skip
    try:
        loaded = load_scenario(scenario, overrides)
        if broker is not None:
            from p2pfl.transport.address import parse_broker_uri

            parse_broker_uri(broker)
        elif processes > 1:
            raise ValueError("--processes needs --broker: processes share no memory bus")
        matrix = matrix or bool(loaded.attacks or loaded.compare_merges or loaded.compare_dp)
        if matrix and broker is not None:
            raise ValueError("--matrix runs on the in-memory bus only; drop --broker")
        check_model(loaded.node.model)
        from p2pfl.simulation.engine import check_privacy

        check_privacy(loaded)
    except DatasetError as exc:
        typer.echo(f"config error: dataset {exc}", err=True)
        raise typer.Exit(code=2) from None
    except PrivacyError as exc:  # a model DP-SGD cannot train: said before anything runs
        typer.echo(f"config error: node.{exc}", err=True)
        raise typer.Exit(code=2) from None
    except (ConfigError, ValueError) as exc:
        message = str(exc)
        if not message.startswith("config error"):
            message = f"config error: {message}"
        typer.echo(message, err=True)
        raise typer.Exit(code=2) from None
    try:
        if matrix:
            from p2pfl.simulation.cli import run_matrix

            run_matrix(loaded, out=out, json_out=json_out, plots=not no_plots)
            return
        run_sim(
            loaded, out=out, json_out=json_out, plots=not no_plots, broker=broker,
            processes=processes,
        )  # fmt: skip
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


@app.command()
def topology(
    schedule: str = typer.Option("partial-mesh", help="ring | random-walk | partial-mesh."),
    nodes: int = typer.Option(8, min=1, help="How many nodes (ids n01, n02, ...)."),
    ids: str | None = typer.Option(None, help="Comma list of node ids instead of --nodes."),
    degree: int = typer.Option(4, min=1, help="Neighbours per node (partial-mesh)."),
    topology_file: Path | None = typer.Option(None, help="A fixed graph (TOML or GraphML)."),
    seed: int = typer.Option(0, help="The network's seed (as in p2pfl run --seed)."),
    round: int = typer.Option(1, min=0, help="Round to plan (random-walk changes per round)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    out: Path | None = typer.Option(
        None, help="Write the overlay as a topology file (.toml or .graphml) to edit and reuse."
    ),
) -> None:
    """Show the overlay a schedule builds for a set of node ids: who sends to whom."""
    import json

    import networkx as nx
    from rich.console import Console
    from rich.table import Table

    from p2pfl.topology import load_graph, make_schedule, write_graph

    members = (
        [i.strip() for i in ids.split(",") if i.strip()]
        if ids
        else [f"n{i + 1:0{max(2, len(str(nodes)))}d}" for i in range(nodes)]
    )
    try:
        graph = None if topology_file is None else load_graph(topology_file)
        plan_of = make_schedule(schedule, degree=degree, seed=seed, graph=graph)
    except (ValueError, OSError) as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    plans = {m: plan_of.plan(m, members, round) for m in members}
    if out is not None:
        undirected = nx.Graph()
        undirected.add_nodes_from(members)
        undirected.add_edges_from((m, t) for m, p in plans.items() for t in p.send_to)
        write_graph(undirected, out)
    if json_out:
        rows = {m: {"send_to": list(p.send_to), "expect_from": list(p.expect_from)}
                for m, p in plans.items()}  # fmt: skip
        edges = [[m, t] for m, p in plans.items() for t in p.send_to]
        typer.echo(json.dumps({"schedule": schedule, "round": round, "nodes": rows,
                               "edges": edges}, indent=2))  # fmt: skip
        return
    table = Table(title=f"{schedule}, round {round}")
    table.add_column("node")
    table.add_column("sends to")
    table.add_column("waits for (sync)")
    for m, p in plans.items():
        table.add_row(m, ", ".join(p.send_to) or "-", ", ".join(p.expect_from) or "-")
    Console().print(table)


def _register_keys() -> None:
    from p2pfl.keys_command import EPILOG as KEYS_EPILOG
    from p2pfl.keys_command import app as keys_app

    app.add_typer(keys_app, name="keys", epilog=verbatim(KEYS_EPILOG))


_register_keys()


def _register_monitor() -> None:
    from p2pfl.monitor.command import EPILOG as MONITOR_EPILOG
    from p2pfl.monitor.command import monitor as monitor_command

    app.command(name="monitor", epilog=verbatim(MONITOR_EPILOG))(monitor_command)


_register_monitor()
