"""Real `p2pfl run` and `p2pfl monitor` processes for the benches that measure them (`daemon`,
`footprint`): started as a user would, JSON logs in files, always reaped.

Every process started inside `Processes` is stopped when the block ends, however it ends:
SIGTERM first (a node checkpoints and says bye), SIGKILL for any still running after a grace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from p2pfl.bench.core import python_command
from p2pfl.logs import read_json_log

NO_MDNS = ["--discovery", "static,presence", "--interface", "127.0.0.1"]
"""`p2pfl run` flags for the benches: no mDNS (nothing announced on any interface), loopback."""


class Process:
    """One child (`p2pfl run ...` or `p2pfl monitor ...`) with its output in a log file."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        # One torch thread per process: several daemons on one machine would otherwise each
        # start a thread per core and measure oversubscription, not p2pfl.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.started = time.time()
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*python_command(), *command], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def records(self) -> list[dict[str, Any]]:
        """The JSON objects the process logged so far (other lines skipped)."""
        return read_json_log(self.log_path)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Its records of one `event` (`round`, `done`, `reachable`)."""
        return [r for r in self.records() if r.get("event") == event]

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} ---\n" + "\n".join(text)


class Processes:
    """The processes of one measurement; `with` stops every one of them on the way out."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Process] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run(self, name: str, args: Sequence[str]) -> Process:
        """Start `p2pfl run --log-format json ARGS`."""
        return self.start(name, ["run", "--log-format", "json", *args])

    def start(self, name: str, command: Sequence[str]) -> Process:
        """Start `p2pfl COMMAND`."""
        process = Process(name, command, self.workdir / f"{name}.log")
        self.all.append(process)
        return process

    def wait_all(self, timeout: float) -> None:
        """Wait for every process to exit; RuntimeError (with their logs) when one fails or
        they run past `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while any(p.alive() for p in self.all):
            self._check_exits()
            if time.monotonic() > deadline:
                raise RuntimeError(f"still running after {timeout:.0f} s\n{self.tails()}")
            time.sleep(0.2)
        self._check_exits()

    def _check_exits(self) -> None:
        """RuntimeError, with its log, for the first process that exited with an error."""
        for p in self.all:
            if p.proc.poll() not in (None, 0):
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}\n{p.tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every live process, then SIGKILL those still running after `grace` s."""
        running = [p for p in self.all if p.alive()]
        for p in running:
            p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(10)

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.all)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, process: Process) -> None:
    """Poll `condition` until true; RuntimeError naming `what` (and the log) after `timeout` s,
    or at once when `process` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not process.alive():
            raise RuntimeError(f"{process.name} exited waiting for {what}\n{process.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:.0f} s\n{process.tail()}")
        time.sleep(0.1)
