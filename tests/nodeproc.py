"""Run `p2pfl run` as real processes, as a user would, and read their JSON logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from p2pfl.logs import read_json_log
from p2pfl.transport.mosquitto import free_ports as free_ports  # re-exported for the tests
from tests.helpers import wait_until_blocking


class NodeProcess:
    """One `p2pfl run` child process with its JSON log in a file."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pfl", "run", "--log-format", "json", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def records(self) -> list[dict[str, Any]]:
        return read_json_log(self.log_path)

    def rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == "round"]

    def last_round(self) -> int:
        rounds = self.rounds()
        return rounds[-1]["round"] if rounds else 0

    def done(self) -> dict[str, Any] | None:
        return next((r for r in self.records() if r.get("event") == "done"), None)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        stop_all([self])

    def tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text().splitlines()
        return f"--- {self.name} ---\n" + "\n".join(lines[-n:])


def stop_all(nodes: Iterable[NodeProcess], grace: float = 30.0) -> None:
    """SIGTERM every live node at once (each may wait out its drain timeout), then reap them;
    SIGKILL those still running after `grace` seconds."""
    running = [node for node in nodes if node.alive()]
    for node in running:
        node.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for node in running:
        try:
            node.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.signal(signal.SIGKILL)
            node.wait(10)


# Process tests wait without an event loop; the name their modules import.
wait_until = wait_until_blocking


def run_dir(state: Path) -> Path:
    """The one run directory of a node's state dir (``runs/<run>``, p2pfl.runs)."""
    runs = sorted(p for p in (state / "runs").iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run in {state}, found {[p.name for p in runs]}"
    return runs[0]
