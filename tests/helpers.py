"""Helpers shared by the tests: clocks the test moves by hand, and waiting for a condition.

Wait for what you expect with `wait_until` (async tests) or `wait_until_blocking` (tests that
drive processes), never with a sleep of a guessed length: a slow machine then fails the test,
a fast one wastes its time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += 5``); with ``tick``, every
    reading also moves it on by ``tick`` (time passes as the code under test looks)."""

    def __init__(self, now: float = 0.0, *, tick: float = 0.0) -> None:
        self.now = now
        self.tick = tick

    def __call__(self) -> float:
        now = self.now
        self.now += self.tick
        return now


class MonitorClock:
    """A monotonic and a wall clock moved by hand together (``clock.t += 5``), as a monitor's
    `NetworkState` reads them (``clock=clock.mono, wall=clock.wall``)."""

    WALL = 1_800_000_000.0

    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.WALL + self.t


def small_scenario(name: str, nodes: int, *, degree: int = 2, **node: object) -> str:
    """A `p2pfl sim` scenario of a few seconds: ring and partial mesh compared, two sync rounds
    of one local epoch of `logreg`, seed 0; ``node`` adds keys to its ``[node]`` table."""
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in node.items())
    return (
        f'name = "{name}"\nnodes = {nodes}\ncompare = ["ring", "partial-mesh"]\n\n'
        f'[node]\nmode = "sync"\nrounds = 2\nmodel = "logreg"\nlocal_epochs = 1\n'
        f"degree = {degree}\n{extra}seed = 0\n"
    )


def _timed_out(within: float, what: object, logs: Callable[[], str] | str) -> AssertionError:
    detail = logs() if callable(logs) else logs
    return AssertionError(f"timed out after {within} s waiting for {what}\n{detail}".rstrip())


async def wait_until(
    condition: Callable[[], bool],
    within: float = 5.0,
    *,
    what: str = "",
    logs: Callable[[], str] | str = "",
    interval: float = 0.01,
) -> None:
    """Poll ``condition`` on the event loop until it holds; AssertionError after ``within``
    seconds, naming ``what`` (the condition itself by default) and showing ``logs``."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise _timed_out(within, what or condition, logs)
        await asyncio.sleep(interval)


def wait_until_blocking(
    condition: Callable[[], bool],
    within: float,
    what: str = "",
    logs: Callable[[], str] | str = "",
    *,
    interval: float = 0.2,
) -> None:
    """`wait_until` for tests without an event loop (processes, threads): blocks while it
    polls. ``logs`` may be a callable, read only on a timeout."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise _timed_out(within, what or condition, logs)
        time.sleep(interval)


def run_bench(name: str, out: Path, *, timeout: float) -> dict[str, Any]:
    """`p2pfl bench NAME --size tiny --json --out OUT` as a user runs it: it exits 0, and the
    JSON it prints is the file it wrote, for this bench at this size, without an error."""
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "bench", name, "--size", "tiny", "--json",
         "--out", str(out)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    assert doc == json.loads((out / f"{name}.json").read_text())
    assert doc["bench"] == name and doc["size"] == "tiny" and "error" not in doc
    return doc
