"""`p2pfl status | pause | resume | stop`: ask a node running on this machine, through the
control socket in its state dir (`p2pfl.control`).

Without ``--state-dir`` the node is looked for where `p2pfl run` keeps state by default
(``$XDG_STATE_HOME/p2pfl/<network>/<id>``), and in the system service's state dir
(``/var/lib/p2pfl``, deploy/p2pfl.service); when several nodes run there, the command lists
them and asks for one.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import NoReturn

import typer

from p2pfl.config import state_root
from p2pfl.control import SOCKET_NAME, ControlError, ControlStatus, NoNode, call, wait_exit

SERVICE_STATE_DIR = Path("/var/lib/p2pfl")
"""Where deploy/p2pfl.service keeps its state (systemd's StateDirectory=p2pfl)."""

EPILOG = """
Examples:

  p2pfl status                          # the node running here (default state dir)
  p2pfl status --state-dir st/n1 --json
  p2pfl pause --state-dir st/n1         # stop training at the next round boundary
  p2pfl resume --state-dir st/n1
  sudo p2pfl stop --state-dir /var/lib/p2pfl   # the system service's node

Exit status: 0 done, 1 no node answered, 2 bad arguments.
"""

StateDirOption = typer.Option(
    None,
    "--state-dir",
    help="The node's state dir (as given to p2pfl run). [default: the one node running under "
    "the default state root, or the system service's]",
)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def _listening(state_dir: Path) -> bool:
    """Whether a node accepts connections on the control socket of ``state_dir``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(state_dir / SOCKET_NAME))
    except OSError:
        return False
    return True


def find_state_dir(given: Path | None) -> Path:
    """The state dir of the node to ask: ``given``, else the one running node found."""
    if given is not None:
        if not given.is_dir():
            _fail(f"--state-dir {given} is not a directory", 2)
        return given
    root = state_root()
    found = sorted({sock.parent for sock in root.glob(f"*/*/{SOCKET_NAME}")})
    try:
        if (SERVICE_STATE_DIR / SOCKET_NAME).exists():
            found.append(SERVICE_STATE_DIR)
    except OSError:  # the service's dir is private to it: give --state-dir (as root)
        pass
    running = [d for d in found if _listening(d)]
    if not running:
        _fail(f"no node running: no control socket answers under {root} (give --state-dir)", 1)
    if len(running) > 1:
        listed = "\n".join(f"  {d}" for d in running)
        _fail(f"several nodes run here; choose one with --state-dir:\n{listed}", 2)
    return running[0]


def _ask(state_dir: Path | None, command: str) -> dict[str, object]:
    where = find_state_dir(state_dir)
    try:
        return call(where, command)
    except NoNode as exc:
        _fail(str(exc), 1)
    except ControlError as exc:
        _fail(str(exc), 1)


def status(
    state_dir: Path | None = StateDirOption,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show what the node running here is doing: round, peers, paused or eligible, accuracy."""
    reply = _ask(state_dir, "status")
    try:
        record = ControlStatus.model_validate(reply.get("status"))
    except ValueError as exc:
        _fail(f"the node sent a status that does not validate: {exc}", 1)
    if json_out:
        shown = record.model_dump(mode="json", exclude={"confusion", "projection"})
        typer.echo(json.dumps(shown, indent=2))
        return
    _print_status(record)


def _print_status(s: ControlStatus) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rejected = ", ".join(f"{reason} {n}" for reason, n in s.rejected.items())
    rows = {
        "node": f"{s.id} (pid {s.pid}, up {s.uptime or 0:.0f} s)",
        "run": s.run or "-",
        "state": f"paused: {s.paused}" if s.paused else "eligible",
        "round": f"{s.round} ({s.mode}, {s.schedule}; local steps: {s.rounds or 0})",
        "peers": f"{len(s.peers)}: {', '.join(s.peers)}" if s.peers else "0",
        "accuracy": "n/a" if s.accuracy is None else f"{s.accuracy:.4f}",
        "models": f"sent {s.models_sent}, received {s.models_received}",
        "rejected": f"{sum(s.rejected.values())} ({rejected})" if s.rejected else "0",
        "trust": s.trust,
        "broker": s.broker,
    }
    for name, value in rows.items():
        table.add_row(name, value)
    Console().print(table)


def pause(state_dir: Path | None = StateDirOption) -> None:
    """Pause the node running here by hand: it stops training at its next round boundary."""
    reply = _ask(state_dir, "pause")
    typer.echo(f"paused: {reply.get('paused')} (p2pfl resume to train again)")


def resume(state_dir: Path | None = StateDirOption) -> None:
    """Undo `p2pfl pause`: the node trains again once it is eligible."""
    reply = _ask(state_dir, "resume")
    paused = reply.get("paused")
    typer.echo("resumed" if paused is None else f"resumed by hand; still paused: {paused}")


def stop(
    state_dir: Path | None = StateDirOption,
    timeout: float = typer.Option(
        60.0, help="Seconds to wait for the node to exit (it finishes its local step first)."
    ),
) -> None:
    """Stop the node running here gracefully (as SIGTERM does): checkpoint, bye, exit."""
    if not timeout > 0:
        _fail(f"--timeout must be > 0 seconds, got {timeout:g}", 2)
    reply = _ask(state_dir, "stop")
    pid = reply.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        _fail(f"the node's reply names no process: {reply!r}", 1)
    if not wait_exit(pid, timeout):
        _fail(f"the node (pid {pid}) is still stopping after {timeout:g} s", 1)
    typer.echo(f"stopped (pid {pid})")
