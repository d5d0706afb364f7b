"""What every bench shares: its sizes, its result, the goals it reports against, machine facts.

A bench measures its own baseline in the same run and reports ratios (or growth factors), so
its figures compare across machines; nothing here is asserted against a fixed time.
"""

from __future__ import annotations

import datetime
import math
import operator
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

Size = Literal["tiny", "quick", "full"]
"""`tiny`: seconds, for the tests; `quick`: `bench all` within 10 minutes on 2 cores; `full`."""

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Figure:
    """One headline number of a bench, with the goal it is held to (if any)."""

    name: str
    value: float | None  # None: the bench could not measure it (the note says why)
    unit: str = "x"
    goal: str | None = None  # e.g. "<= 1.2"
    note: str = ""

    @property
    def met(self) -> bool | None:
        """Whether `value` meets `goal`; None without a goal or a value."""
        if self.goal is None or self.value is None:
            return None
        op, threshold = self.goal.split()
        return _OPS[op](self.value, float(threshold))

    def text(self) -> str:
        """The value as printed: `1.07x`, `0.4 %`, `n/a`."""
        if self.value is None:
            return "n/a"
        digits = 3 if abs(self.value) < 10 else 1
        sep = "" if self.unit == "x" else " "
        return f"{self.value:.{digits}f}{sep}{self.unit}"


@dataclass
class BenchResult:
    """A bench's table (one row per measurement) and its headline figures."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON form; each figure carries its `met` verdict."""
        doc = asdict(self)
        doc["figures"] = [dict(asdict(f), met=f.met) for f in self.figures]
        return doc


Progress = Callable[[str], None]
"""Called with a short line saying what the bench starts next (shown under a spinner)."""


@dataclass(frozen=True)
class BenchOptions:
    """How big to run, and where to report progress."""

    size: Size = "quick"
    big: bool = False
    progress: Progress = lambda _line: None
    workdir: Path | None = None  # scratch space; a temporary directory when None

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The value for this size."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.size]


def ratio(numerator: float, denominator: float) -> float | None:
    """`numerator / denominator`, or None when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else None


def growth_per_doubling(sizes: list[int], values: list[float]) -> float | None:
    """The factor a value grows by each time the size doubles, fitted over the whole range."""
    pairs = [(s, v) for s, v in zip(sizes, values, strict=True) if s > 0 and v > 0]
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return None
    (s0, v0), (s1, v1) = pairs[0], pairs[-1]
    doublings = math.log2(s1 / s0)
    return float((v1 / v0) ** (1 / doublings))


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed:` ... `elapsed()` gives the seconds since the block began."""
    started = time.perf_counter()
    yield lambda: time.perf_counter() - started


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, versions, the git commit."""
    import torch

    import p2pfl

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "p2pfl": getattr(p2pfl, "__version__", None),
        "commit": _git_commit(Path(p2pfl.__file__).resolve().parent.parent),
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(source: Path) -> str | None:
    """The checkout's commit (`-dirty` when it has changes), None for an installed wheel."""
    if not (source / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def python_command() -> list[str]:
    """How to start `p2pfl` as a child process with this interpreter."""
    return [sys.executable, "-m", "p2pfl"]
