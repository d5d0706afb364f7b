"""What `p2pfl runs` shows: each run of several nodes' state dirs (or of monitor exports), merged.

A run's nodes are the state dirs that hold it (``runs/<run>/``, `p2pfl.runs`); its status is
``running`` while any node runs it, else ``failed`` if any failed, else ``interrupted`` if
any was stopped early or killed, else ``finished``. Its accuracy curve is, per round, the mean
of the accuracies its nodes logged for that round; its final accuracy the mean of each node's
last one. A monitor's export (``p2pfl monitor --export``: one snapshot per line) gives runs
from telemetry: nodes, rounds, accuracy, tags, and the configuration the nodes report.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import fmean
from typing import Any

from pydantic import ValidationError

from p2pfl.runs import RunRecord, read_record, run_dirs, shown_status

_ORDER = ("running", "failed", "interrupted", "unknown", "ended", "finished")


class RunsError(ValueError):
    """No runs where asked, or no such run: one line for the user."""


@dataclass
class RunSummary:
    """One run as every source that holds it tells it."""

    run: str
    nodes: dict[str, str] = field(default_factory=dict)  # node -> its status in the run
    records: list[RunRecord] = field(default_factory=list)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # node -> round -> acc
    started: str = ""
    ends: dict[str, str | None] = field(default_factory=dict)  # node -> when it ended
    tags: tuple[str, ...] = ()

    @property
    def ended(self) -> str | None:
        """When the last node ended the run; None while any has not (running, interrupted)."""
        ends = list(self.ends.values())
        return None if not ends or None in ends else max(e for e in ends if e)

    @property
    def status(self) -> str:
        statuses = set(self.nodes.values()) or {"unknown"}
        return next(s for s in _ORDER if s in statuses)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.records[0].config) if self.records else {}

    @property
    def config_hash(self) -> str | None:
        """The configuration's hash; None when the nodes recorded none, or different ones."""
        hashes = {r.config_hash for r in self.records}
        return hashes.pop() if len(hashes) == 1 and "" not in hashes else None

    @property
    def rounds(self) -> int:
        return max((max(c) for c in self.curves.values() if c), default=0)

    @property
    def curve(self) -> dict[int, float]:
        """Round -> mean accuracy of the nodes that logged that round."""
        by_round: dict[int, list[float]] = {}
        for curve in self.curves.values():
            for rnd, acc in curve.items():
                by_round.setdefault(rnd, []).append(acc)
        return {rnd: fmean(accs) for rnd, accs in sorted(by_round.items())}

    @property
    def final_accuracy(self) -> float | None:
        last = [c[max(c)] for c in self.curves.values() if c]
        return fmean(last) if last else None

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON data (`p2pfl runs list --json`, `show --json`)."""
        return {
            "run": self.run, "status": self.status, "started": self.started,
            "ended": self.ended, "nodes": sorted(self.nodes), "rounds": self.rounds,
            "final_accuracy": self.final_accuracy, "tags": list(self.tags),
            "config": self.config, "config_hash": self.config_hash,
            "accuracy": {str(r): round(a, 6) for r, a in self.curve.items()},
        }  # fmt: skip

    def add(
        self,
        node: str,
        status: str,
        curve: dict[int, float],
        started: str,
        ended: str | None,
        tags: Iterable[str] = (),
    ) -> None:
        """One node's part of the run."""
        self.nodes[node] = status
        self.curves[node] = curve
        if started and (not self.started or started < self.started):
            self.started = started
        self.ends[node] = ended or None
        self.tags = tuple(sorted({*self.tags, *tags}))


def collect(state_dirs: Sequence[Path] = (), exports: Sequence[Path] = ()) -> list[RunSummary]:
    """Every run of these state dirs and monitor exports, the earliest started first."""
    runs: dict[str, RunSummary] = {}
    for state_dir in state_dirs:
        if not state_dir.is_dir():
            raise RunsError(f"no state dir at {state_dir}")
        for run, path in run_dirs(state_dir).items():
            summary = runs.setdefault(run, RunSummary(run))
            record = read_record(path)
            node = record.node if record and record.node else _node_id(state_dir)
            status = "unknown" if record is None else shown_status(record, state_dir)
            if record is not None:
                summary.records.append(record)
            started, ended = (record.started, record.ended) if record else ("", None)
            tags = record.tags if record else ()
            summary.add(node or str(state_dir), status, _metrics(path), started, ended, tags)
    for export in exports:
        _from_export(export, runs)
    return sorted(runs.values(), key=lambda s: (s.started, s.run))


def find(runs: Sequence[RunSummary], name: str, where: str) -> RunSummary:
    """The run called ``name``; RunsError naming the runs there are otherwise."""
    for summary in runs:
        if summary.run == name:
            return summary
    known = ", ".join(s.run for s in runs) or "none"
    raise RunsError(f"no run {name!r} in {where}; runs: {known}")


def config_diff(a: RunSummary, b: RunSummary) -> dict[str, tuple[Any, Any]]:
    """Key -> (a's value, b's value) for each configuration key the two runs differ in."""
    ca, cb = a.config, b.config
    return {k: (ca.get(k), cb.get(k)) for k in sorted({*ca, *cb}) if ca.get(k) != cb.get(k)}


def _metrics(run_dir: Path) -> dict[int, float]:
    """Round -> accuracy from a run's metrics log (the last line of each round)."""
    curve: dict[int, float] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return curve
    for line in lines:
        try:
            record = json.loads(line)
            curve[int(record["round"])] = float(record["accuracy"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed node, or not a round line
    return curve


def _node_id(state_dir: Path) -> str:
    try:
        stored = json.loads((state_dir / "identity.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(stored.get("id", "")) if isinstance(stored, dict) else ""


def _from_export(path: Path, runs: dict[str, RunSummary]) -> None:
    """Runs seen by a monitor: each snapshot line's nodes, grouped by the run they announced."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RunsError(f"cannot read {path}: {exc.strerror or exc}") from None
    seen: dict[tuple[str, str], tuple[dict[int, float], str, str, bool]] = {}
    records: dict[tuple[str, str], RunRecord] = {}  # what the node said of its run's config
    for line in lines:
        try:
            snap = json.loads(line)
            when = _iso(float(snap["time"]))
            nodes = list(snap["nodes"])
            configs = snap.get("configs") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        for node in nodes:
            if not isinstance(node, dict) or not node.get("run"):
                continue
            key = (str(node["run"]), str(node.get("id", "")))
            curve, first, _, _ = seen.get(key, ({}, when, when, False))
            rnd, acc = node.get("round"), node.get("accuracy")
            if isinstance(rnd, int) and isinstance(acc, (int, float)) and rnd > 0:
                curve[rnd] = float(acc)
            seen[key] = (curve, first, when, not node.get("offline") and not node.get("stale"))
            digest = node.get("config_hash")
            if isinstance(configs, dict) and isinstance(configs.get(digest), dict):
                with contextlib.suppress(ValidationError):
                    records[key] = RunRecord.model_validate(
                        {"run": key[0], "node": key[1], "tags": node.get("tags") or (),
                         "config": configs[digest], "config_hash": digest}
                    )  # fmt: skip
    for (run, node_id), (curve, first, last, live) in seen.items():
        summary = runs.setdefault(run, RunSummary(run))
        if node_id not in summary.nodes:  # a state dir's record knows better
            record = records.get((run, node_id))
            if record is not None:
                summary.records.append(record)
            summary.add(
                node_id, "running" if live else "ended", curve, first, None if live else last,
                record.tags if record is not None else (),
            )  # fmt: skip


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
