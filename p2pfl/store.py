"""The node's state directory: identity, checkpoints, metrics log.

Layout of ``--state-dir``::

    identity.json            the node id (stable across restarts)
    lock                     held (flock) while a node runs, so two nodes never share a directory
    checkpoints/ckpt-000042.npz    weights + round metadata, last N kept
    metrics.jsonl            one JSON object per round

Checkpoints are ``.npz`` files loaded with ``allow_pickle=False`` (no code runs from a
checkpoint), written to a temp file, fsynced and renamed, so a crash mid-write leaves the previous
checkpoint intact. Optimizer state is not checkpointed: a resumed node restarts its momentum.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^ckpt-(\d{6,})\.npz$")
_META_KEY = "__p2pfl_meta__"


class StateDirError(RuntimeError):
    """The state directory cannot be used (locked by another node, unreadable)."""


@dataclass(frozen=True)
class Checkpoint:
    """A saved model and where the node was when it saved it."""

    round: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def default_node_id() -> str:
    """A readable id derived from the hostname plus a short random suffix."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "node"
    return f"{host[:40]}-{uuid.uuid4().hex[:6]}"


class StateDir:
    """One node's state directory; use as a context manager to hold its lock."""

    def __init__(self, path: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.path = Path(path)
        self.keep = keep
        self._lock: IO[str] | None = None
        self._writing = threading.Lock()  # held while a checkpoint is being written

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def __enter__(self) -> StateDir:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the directory and take its lock."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.path / "lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise StateDirError(
                f"state dir {self.path} is in use by another p2pfl node (pid {owner}); "
                "give each node its own --state-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def node_id(self, requested: str | None = None) -> str:
        """The node id: `requested` if given (and remembered), else the stored or a new one."""
        path = self.path / "identity.json"
        stored: dict[str, Any] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise StateDirError(f"cannot read {path}: {exc}") from exc
        node_id = requested or stored.get("id") or default_node_id()
        if stored.get("id") != node_id:
            stored["id"] = node_id
            _atomic_write_bytes(path, json.dumps(stored, indent=2).encode())
        return str(node_id)

    def save_checkpoint(
        self, round: int, weights: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a checkpoint atomically and prune old ones. Blocking: call it off the loop."""
        if _META_KEY in weights:
            raise ValueError(f"tensor name {_META_KEY!r} is reserved")
        body = {"round": round, **(meta or {})}
        arrays = {name: np.ascontiguousarray(arr) for name, arr in weights.items()}
        arrays[_META_KEY] = np.frombuffer(json.dumps(body).encode(), dtype=np.uint8)
        target = self.checkpoint_dir / f"ckpt-{round:06d}.npz"
        with self._writing:
            fd, tmp = tempfile.mkstemp(dir=self.checkpoint_dir, prefix=".ckpt-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.savez(fh, allow_pickle=False, **arrays)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            for old in self._checkpoints()[: -self.keep]:
                old.unlink(missing_ok=True)
        return target

    def quiesce(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for a checkpoint being written, and let none start after.

        For a process about to exit at once: what is on disk is then whole. True if quiet.
        """
        return self._writing.acquire(timeout=timeout)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint, skipping damaged ones (logged)."""
        for path in reversed(self._checkpoints()):
            try:
                with np.load(path, allow_pickle=False) as data:
                    meta = json.loads(bytes(data[_META_KEY]).decode())
                    weights = {k: data[k] for k in data.files if k != _META_KEY}
                return Checkpoint(round=int(meta.pop("round")), weights=weights, meta=meta)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("skipping unreadable checkpoint path=%s error=%s", path, exc)
        return None

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to the metrics log."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _checkpoints(self) -> list[Path]:
        found = []
        for path in self.checkpoint_dir.iterdir():
            m = _CKPT_RE.match(path.name)
            if m:
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
