"""Eligibility (`--when`): train only while the machine can spare it, as production federated
learning does (Gboard: charging, idle, on an unmetered network).

`parse_when` reads the conditions (a comma list, or a TOML list); `Eligibility.check` says why
the node may not train now (``window``, ``charging``, ``idle``, ``unmetered``) or None. What the
machine is doing comes through `Readers`, plain callables (psutil, /proc/net/route, nmcli by
default), so tests give their own and every predicate here is a pure function.

``max-cpu=PCT`` is no condition: it throttles the node's own training (`rest_after_fit`, and
the daemon caps torch's threads at the matching share of the cores).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from p2pfl.discovery.addresses import default_route_interface

log = logging.getLogger(__name__)

DEFAULT_IDLE = 20.0  # % of the machine's CPU that other processes may use: still idle
CHECK_INTERVAL = 5.0  # seconds between checks while paused
MAX_REASON = 32  # a reason as carried in presence and telemetry
REASONS = ("window", "charging", "idle", "unmetered")
"""The reasons `Eligibility.check` gives, in the order it checks them."""


@dataclass(frozen=True)
class Conditions:
    """What `--when` asks for; all unset: always eligible, never throttled."""

    window: tuple[int, int] | None = None  # minutes after local midnight: [start, end)
    charging: bool = False
    idle: float | None = None  # others' CPU use must stay below this %
    unmetered: bool = False
    max_cpu: float | None = None  # % of one core's time own training may take

    @property
    def any(self) -> bool:
        """Whether a condition can make the node ineligible (max-cpu cannot)."""
        return self.window is not None or self.charging or self.idle is not None or self.unmetered


def parse_when(value: str | Iterable[str]) -> Conditions:
    """The conditions of a comma list (or a list of items); ValueError naming a bad item."""
    items = value.split(",") if isinstance(value, str) else list(value)
    found: dict[str, object] = {}
    for raw in items:
        if not isinstance(raw, str):
            raise ValueError(f"expected text, got {raw!r}")
        item = raw.strip().lower()
        if not item:
            continue
        name, sep, arg = item.partition("=") if "=" in item else item.partition(":")
        if name in found:
            raise ValueError(f"{name} given twice")
        if name in ("charging", "unmetered") and not sep:
            found[name] = True
        elif name == "idle":
            found[name] = _percent(arg, item) if sep else DEFAULT_IDLE
        elif name == "max-cpu" and sep:
            found[name] = _percent(arg, item)
        elif name == "window" and sep:
            found[name] = parse_window(arg)
        else:
            raise ValueError(
                f"unknown condition {raw.strip()!r}: expected charging, idle[:PCT], unmetered, "
                "window=HH:MM-HH:MM or max-cpu=PCT"
            )
    return Conditions(
        window=found.get("window"),  # type: ignore[arg-type]
        charging=bool(found.get("charging")),
        idle=found.get("idle"),  # type: ignore[arg-type]
        unmetered=bool(found.get("unmetered")),
        max_cpu=found.get("max-cpu"),  # type: ignore[arg-type]
    )


def _percent(text: str, item: str) -> float:
    try:
        pct = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"{item}: expected a percentage, got {text!r}") from None
    if not 0 < pct <= 100 or not math.isfinite(pct):
        raise ValueError(f"{item}: the percentage must be above 0 and at most 100")
    return pct


def parse_window(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` as minutes after midnight; the end may be earlier (it wraps midnight)."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"window={text}: expected HH:MM-HH:MM")
    window = _minute(start, text), _minute(end, text)
    if window[0] == window[1]:
        raise ValueError(f"window={text}: start and end are the same time")
    return window


def _minute(hhmm: str, text: str) -> int:
    hours, sep, minutes = hhmm.strip().partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"window={text}: expected HH:MM-HH:MM")
    h, m = int(hours), int(minutes)
    if h > 23 or m > 59:
        raise ValueError(f"window={text}: {hhmm.strip()} is not a time of day")
    return h * 60 + m


def in_window(minute: int, window: tuple[int, int]) -> bool:
    """Whether `minute` (after local midnight) falls in [start, end), wrapping midnight."""
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def rest_after_fit(fit_seconds: float, max_cpu: float | None) -> float:
    """Seconds to rest after a fit of `fit_seconds` so training takes about `max_cpu` % of the
    time (0 without a limit)."""
    if max_cpu is None or max_cpu >= 100 or fit_seconds <= 0:
        return 0.0
    return fit_seconds * (100.0 - max_cpu) / max_cpu


def torch_threads(max_cpu: float | None, cores: int) -> int | None:
    """Threads torch may use under `max_cpu` (None: no limit): that share of the cores, >= 1."""
    if max_cpu is None:
        return None
    return max(1, math.floor(cores * max_cpu / 100))


# ---- what the machine is doing ---------------------------------------------------------------


def _minute_now() -> int:
    now = datetime.now()  # local time: the window is the user's wall clock
    return now.hour * 60 + now.minute


def _on_power() -> bool:
    import psutil

    battery = psutil.sensors_battery()
    return battery is None or bool(battery.power_plugged)


class _OtherCpu:
    """CPU use of other processes since the last call, in % of the whole machine."""

    def __init__(self) -> None:
        import psutil

        self._own = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # start both counters now
        self._own.cpu_percent(interval=None)

    def __call__(self) -> float:
        import psutil

        total = psutil.cpu_percent(interval=None)
        own = self._own.cpu_percent(interval=None) / self._cores
        return max(0.0, total - own)


def _nm_metered(interface: str) -> bool | None:
    """NetworkManager's metered flag of `interface` (None: no nmcli, or it does not know)."""
    nmcli = shutil.which("nmcli")
    if nmcli is None:
        return None
    try:
        out = subprocess.run(
            [nmcli, "-t", "-f", "GENERAL.METERED", "device", "show", interface],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.strip().partition(":")[2].lower()
    return True if value.startswith("yes") else False if value.startswith("no") else None


@dataclass
class Readers:
    """Where `Eligibility` reads the machine's state; each reader is called only when a
    condition needs it."""

    minute: Callable[[], int] = _minute_now
    on_power: Callable[[], bool] = _on_power
    other_cpu: Callable[[], float] | None = None  # None: psutil, started on first need
    interface: Callable[[], str | None] = default_route_interface
    metered: Callable[[str], bool | None] = _nm_metered
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)


class Eligibility:
    """Checks `--when`'s conditions; `check()` is blocking (nmcli): call it off the loop."""

    def __init__(
        self,
        conditions: Conditions,
        metered_interfaces: Collection[str] = (),
        readers: Readers | None = None,
    ) -> None:
        self.conditions = conditions
        self.metered_interfaces = frozenset(metered_interfaces)
        self.readers = readers or Readers()
        if conditions.idle is not None and self.readers.other_cpu is None:
            self.readers.other_cpu = _OtherCpu()

    def check(self) -> str | None:
        """Why the node may not train now, or None when it may."""
        c, read = self.conditions, self.readers
        if c.window is not None and not in_window(read.minute(), c.window):
            return "window"
        if c.charging and not read.on_power():
            return "charging"
        if c.idle is not None and read.other_cpu is not None and read.other_cpu() >= c.idle:
            return "idle"
        if c.unmetered and self._metered():
            return "unmetered"
        return None

    def _metered(self) -> bool:
        interface = self.readers.interface()
        if interface is None:
            return False  # no default route: nothing is sent anywhere metered
        return interface in self.metered_interfaces or bool(self.readers.metered(interface))
