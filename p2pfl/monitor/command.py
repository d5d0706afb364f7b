"""The `p2pfl monitor` command's options (typer); registered by `p2pfl.cli`.

Kept apart from the monitor itself so that `p2pfl --help` imports typer only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from p2pfl.flags import Flag, model_options
from p2pfl.monitor.config import MonitorConfig

EPILOG = """
Examples:

  p2pfl monitor --network demo                      # live dashboard, nodes found over mDNS
  p2pfl monitor --network demo --broker mqtt://10.0.0.5:1883   # nodes on a shared broker
  p2pfl monitor --network demo --once --json        # one snapshot for scripts
  p2pfl monitor --network demo --export run.jsonl --plot run.png --metrics-port 9100
  p2pfl monitor --config monitor.toml --once       # keys as the flags: network = "demo"
  p2pfl monitor --network demo --web 8080           # and in a browser: http://127.0.0.1:8080/

Flags override the keys of the TOML file given with --config (same names, with _ for -;
--broker, --peer and --interface are the lists brokers, peers and interfaces).
"""


_FLAGS = {"brokers": Flag("--broker"), "peers": Flag("--peer"), "interfaces": Flag("--interface")}
"""Flags spelled otherwise than `--field-name`: a list field's flag names one item."""


@model_options(MonitorConfig, _FLAGS)
def monitor(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML file with any of these keys."
    ),
    *,
    overrides: dict[str, Any],
) -> None:
    """Watch a running network: peers, rounds, accuracy, traffic, overlay, logs."""
    from p2pfl.config_file import ConfigError, load_model, read_toml
    from p2pfl.logs import setup_logging
    from p2pfl.monitor.cli import MonitorConfigError, run_monitor

    try:
        cfg = load_model(MonitorConfig, {} if config is None else read_toml(config), overrides)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from None
    setup_logging("text", cfg.log_level)
    try:
        code = run_monitor(
            peers=[f"{p.id}={p.broker}" for p in cfg.peers],
            **cfg.model_dump(exclude={"peers", "log_level"}),
        )
    except MonitorConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as exc:  # e.g. the metrics port is taken
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=code)
