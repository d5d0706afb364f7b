"""Runs: a training run's identity, its record in a node's state dir, and reading them back.

A run is named by ``--run-name`` or, without one, joins the run its peers announce or starts
one named ``<network>-<UTC timestamp>`` (`p2pfl.run_identity`). Each node keeps each run apart
in its state dir (``runs/<run>/``, see `p2pfl.store`) with a record, ``run.json``: the run id,
its tags, the node, the full learning configuration and its hash, when it started and ended,
and its status. `p2pfl runs` reads those records (several nodes' state dirs merged per run).

Status: ``finished`` when the node completed its rounds (or its duration), ``failed`` when it
exited on an error, ``running`` otherwise: a node stopped early or killed resumes the run when
started again without ``--run-name``. A reader shows a ``running`` record whose node is gone
(no process holds the state dir's lock as that run's pid) as ``interrupted``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from p2pfl.config import NodeConfig
from p2pfl.protocol.topics import MAX_RUN, is_run_id
from p2pfl.store import CheckpointError, StateDir, atomic_write_bytes, read_checkpoint

_AUTO_RE = re.compile(r"-\d{8}T\d{6}Z$")  # the suffix of a run named by default
RECORD = "run.json"
LEGACY = "legacy"  # the run of an older version's flat state dir, unless its checkpoints name one

# What a run learned with: everything that changes the model it ends with. Per-node values
# (id, partition_index, addresses, credentials, state dir) are not part of it, so every node
# of one run records the same configuration and hash.
LEARNING_KEYS = (
    "network", "mode", "schedule", "degree", "topology_file", "walkers", "token_timeout",
    "view_size", "min_peers", "period", "round_timeout", "rounds", "duration", "dataset",
    "partition", "num_partitions", "model", "merge", "secure_aggregation", "optimizer", "lr",
    "momentum", "local_epochs", "batch_size", "mu", "dp_epsilon", "dp_delta",
    "dp_max_grad_norm", "seed", "codec", "max_round_lag",
)  # fmt: skip

Status = Literal["running", "finished", "failed"]


class RunRecord(BaseModel):
    """``runs/<run>/run.json``: one node's record of one run."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    run: str
    node: str = ""
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = {}
    config_hash: str = ""
    started: str = ""
    ended: str | None = None
    status: Status = "running"
    pid: int | None = None  # the process that ran it last


def utc_stamp(now: datetime | None = None) -> str:
    """``20261202T051200Z``: a UTC timestamp usable in a run id."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_run_name(network: str, now: datetime | None = None) -> str:
    """``<network>-<UTC timestamp>``, the network's characters that a run id cannot hold
    replaced by ``-``."""
    prefix = re.sub(r"[^A-Za-z0-9._+-]", "-", network)[: MAX_RUN - 17].lstrip("._+-") or "run"
    return f"{prefix}-{utc_stamp(now)}"


def preferred(runs: Iterable[str]) -> str:
    """The run every node hearing the same ids picks: a named one (``--run-name``) before
    default-named ones, the smallest id first (for default names: the earliest started)."""
    return min(runs, key=lambda r: (_AUTO_RE.search(r) is not None, r))


def learning_config(config: NodeConfig) -> dict[str, Any]:
    """The run's learning configuration, as JSON data."""
    return config.model_dump(mode="json", include=set(LEARNING_KEYS))


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``config``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(run_dir: Path) -> RunRecord | None:
    """The record in ``run_dir``; None when there is none or it cannot be read."""
    try:
        return RunRecord.model_validate_json((run_dir / RECORD).read_bytes())
    except (OSError, ValidationError):
        return None


def write_record(run_dir: Path, record: RunRecord) -> None:
    """Replace ``run_dir/run.json`` atomically. Blocking."""
    atomic_write_bytes(run_dir / RECORD, record.model_dump_json(indent=2).encode())


def run_dirs(state_dir: Path) -> dict[str, Path]:
    """Each run of a state dir and its directory, oldest started first; an older version's
    flat layout (checkpoints at the top) is one run, named by its checkpoints or ``legacy``."""
    found: dict[str, Path] = {}
    runs = state_dir / "runs"
    if runs.is_dir():
        for entry in sorted(runs.iterdir()):
            if entry.is_dir() and is_run_id(entry.name):
                found[entry.name] = entry
    if _has_flat_run(state_dir):
        found.setdefault(legacy_name(state_dir), state_dir)
    return dict(sorted(found.items(), key=lambda kv: (_started(kv[1]), kv[0])))


def _started(run_dir: Path) -> str:
    record = read_record(run_dir)
    return "" if record is None else record.started


def latest_run(state_dir: Path) -> str | None:
    """The run of ``state_dir`` started last; None when it holds none."""
    runs = run_dirs(state_dir)
    return next(reversed(runs)) if runs else None


def unfinished_run(state_dir: Path) -> str | None:
    """The run started last whose record says ``running`` (a node stopped or killed in it)."""
    for run, path in reversed(run_dirs(state_dir).items()):
        record = read_record(path)
        if record is not None and record.status == "running" and path != state_dir:
            return run
    return None


def _has_flat_run(state_dir: Path) -> bool:
    ckpts = state_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.suffix == ".npz" for p in ckpts.iterdir())
    return has_ckpt or (state_dir / "metrics.jsonl").is_file()


def legacy_name(state_dir: Path) -> str:
    """The run an older version's flat state dir held: the run name its newest checkpoint
    records, else ``legacy``."""
    kept = StateDir(state_dir).checkpoints() if (state_dir / "checkpoints").is_dir() else {}
    for path in reversed(kept.values()):
        try:
            meta = read_checkpoint(path).meta
        except CheckpointError:  # a damaged checkpoint names nothing: try the next one
            continue
        name = meta.get("run") or meta.get("run_name")
        if is_run_id(name):
            return str(name)
    return LEGACY


def migrate_legacy(state_dir: Path) -> str | None:
    """Move an older version's flat layout (``checkpoints/``, ``metrics.jsonl`` at the top)
    into ``runs/<run>/``, once; the run it became (a ``running`` one: a node resumes it), or
    None when there was none. Blocking; the caller holds the state dir's lock."""
    if not _has_flat_run(state_dir):
        return None
    run = legacy_name(state_dir)
    target = state_dir / "runs" / run
    (target / "checkpoints").mkdir(mode=0o700, parents=True, exist_ok=True)
    if read_record(target) is None:
        write_record(target, RunRecord(run=run, started=iso_now(), status="running"))
    for ckpt in sorted((state_dir / "checkpoints").glob("ckpt-*.npz")):
        os.replace(ckpt, target / "checkpoints" / ckpt.name)
    metrics = state_dir / "metrics.jsonl"
    if metrics.is_file():
        if (target / "metrics.jsonl").exists():  # a migration interrupted before: append
            with (target / "metrics.jsonl").open("a") as fh:
                fh.write(metrics.read_text())
            metrics.unlink()
        else:
            os.replace(metrics, target / "metrics.jsonl")
    return run


def shown_status(record: RunRecord, state_dir: Path) -> str:
    """The record's status, ``interrupted`` for a ``running`` one whose node is gone."""
    if record.status != "running":
        return record.status
    alive = record.pid is not None and _lock_pid(state_dir) == record.pid
    return "running" if alive else "interrupted"


def _lock_pid(state_dir: Path) -> int | None:
    """The pid of the node holding ``state_dir``'s lock now; None when none holds it."""
    try:
        fh = (state_dir / "lock").open()
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = fh.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None
