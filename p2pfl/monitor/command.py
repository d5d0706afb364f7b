"""The `p2pfl monitor` command's options (typer); registered by `p2pfl.cli`.

Kept apart from the monitor itself so that `p2pfl --help` imports typer only.
"""

from __future__ import annotations

from pathlib import Path

import typer

EPILOG = """
Examples:

  p2pfl monitor --network demo                      # live dashboard, nodes found over mDNS
  p2pfl monitor --network demo --broker mqtt://10.0.0.5:1883   # nodes on a shared broker
  p2pfl monitor --network demo --once --json        # one snapshot for scripts
  p2pfl monitor --network demo --export run.jsonl --plot run.png --metrics-port 9100
"""


def monitor(
    network: str = typer.Option("default", help="Network to watch."),
    broker: list[str] | None = typer.Option(
        None, "--broker", help="Broker to listen on, mqtt[s]://HOST:PORT (repeatable)."
    ),
    peer: list[str] | None = typer.Option(
        None, "--peer", help="Static peer ID=mqtt://HOST:PORT (repeatable)."
    ),
    interface: list[str] | None = typer.Option(
        None, "--interface", help="IP of an interface mDNS uses (repeatable). [default: all]"
    ),
    mdns: bool = typer.Option(True, "--mdns/--no-mdns", help="Discover nodes over mDNS."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    json_out: bool = typer.Option(False, "--json", help="With --once: JSON instead of a table."),
    wait: float = typer.Option(
        5.0, help="With --once: listen at most this long for every discovered node to report."
    ),
    export: Path | None = typer.Option(
        None, help="Append a JSON snapshot every second to this .jsonl file."
    ),
    plot: Path | None = typer.Option(
        None, help="On exit, write global accuracy and divergence over time to this PNG."
    ),
    metrics_port: int | None = typer.Option(
        None, help="Serve Prometheus metrics on this port (0 = any free port)."
    ),
    metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics server binds."),
    stale_after: float | None = typer.Option(
        None, help="Seconds of silence before a node is stale. [default: 3 telemetry periods]"
    ),
    forget_after: float = typer.Option(60.0, help="Seconds of silence before a node is dropped."),
    log_level: str = typer.Option("warning", help="debug | info | warning | error."),
    trust: str = typer.Option(
        "tofu", help="Which nodes' records to believe: tofu | allowlist | ca | open (as p2pfl run)."
    ),
    ca_key: str | None = typer.Option(
        None, "--ca-key", help="With --trust ca: the network's public key, or a file holding it."
    ),
    state_dir: Path | None = typer.Option(
        None,
        help="The monitor's key, trusted_keys and pinned keys. "
        "[default: ~/.local/state/p2pfl/NET/monitor]",
    ),
) -> None:
    """Watch a running network: peers, rounds, accuracy, traffic, overlay, logs."""
    from p2pfl.logs import setup_logging
    from p2pfl.monitor.cli import MonitorConfigError, run_monitor

    setup_logging("text", log_level)
    try:
        code = run_monitor(
            network,
            broker or (),
            peer or (),
            interface or (),
            once=once,
            json_out=json_out,
            export=export,
            plot=plot,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            wait=wait,
            mdns=mdns,
            stale_after=stale_after,
            forget_after=forget_after,
            trust=trust,
            ca_key=ca_key,
            state_dir=state_dir,
        )
    except MonitorConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as exc:  # e.g. the metrics port is taken
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=code)
