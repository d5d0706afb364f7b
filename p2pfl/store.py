"""The node's state directory: identity, checkpoints, metrics log.

Layout of ``--state-dir``::

    identity.json            the node id (stable across restarts)
    lock                     held (flock) while a node runs, so two nodes never share a directory
    privacy.json             with DP: the privacy accountant's history (what was spent)
    runs/<run>/run.json      a run's record: its configuration, hash, status (p2pfl.runs)
    runs/<run>/checkpoints/ckpt-000042.npz  weights + round, model spec, run id; last N kept
    runs/<run>/metrics.jsonl one JSON object per round, each naming the run

Node-wide things (identity, keys, trust store, control socket, DP budget: it is spent on the
node's data whatever the run) stay at the top. Until a run is chosen (`use_run`), checkpoints
and metrics are those of the flat layout of older versions (``checkpoints/``,
``metrics.jsonl`` at the top), which a starting node moves into a run once
(`p2pfl.runs.migrate_legacy`).

Checkpoints are ``.npz`` files loaded with ``allow_pickle=False`` (no code runs from a
checkpoint), written to a temp file, fsynced, renamed, and the directory fsynced, so a crash or a
power cut mid-write leaves the previous checkpoint intact. On resume a checkpoint that cannot be
read, does not fit the model's layout or holds NaN/Inf is refused and the next older one is tried.
Temp files orphaned by a killed writer are removed when the directory is opened. Everything is
private to the user: directories 0700, files 0600. Optimizer state is not checkpointed: a resumed
node restarts its momentum.

``privacy.json`` is written (atomically) *before* each DP fit, counting that fit: a node killed
between a fit and its checkpoint has sent a model its accountant must not forget, so a restart
may over-count one fit, never under-count.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from p2pfl.protocol.model import ExpectedSpec

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^ckpt-(\d{6,})\.npz$")
_META_KEY = "__p2pfl_meta__"
_DIR_MODE = 0o700
_FILE_MODE = 0o600

# What reading a damaged .npz can raise: truncated (BadZipFile), empty (EOFError), bad CRC
# (BadZipFile), bad header (ValueError), bad metadata (ValueError, KeyError, TypeError).
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)


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
        self.run: str | None = None  # the run written to (None: the legacy flat layout)

    @property
    def run_path(self) -> Path:
        """Where the current run's files go: ``runs/<run>`` (the top before `use_run`)."""
        return self.path if self.run is None else self.path / "runs" / self.run

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_path / "metrics.jsonl"

    def use_run(self, run: str) -> None:
        """Write checkpoints and metrics into ``runs/<run>/`` from now on (made if missing)."""
        self.run = run
        try:
            for directory in (self.path / "runs", self.run_path, self.checkpoint_dir):
                directory.mkdir(mode=_DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise StateDirError(f"cannot use state dir {self.path}: {exc}") from exc
        self._remove_orphans()

    def __enter__(self) -> StateDir:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the directory (private to the user), take its lock, remove orphaned temp files."""
        try:
            for directory in (self.path, self.checkpoint_dir):
                directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                if stat.S_IMODE(directory.stat().st_mode) != _DIR_MODE:
                    os.chmod(directory, _DIR_MODE)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise StateDirError(f"cannot use state dir {self.path}: {exc}") from exc
        lock = os.fdopen(fd, "r+")
        try:
            os.fchmod(fd, _FILE_MODE)  # a lock file left by an older version may be 0644
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise StateDirError(
                f"state dir {self.path} is in use by another p2pfl node (pid {owner}); "
                "give each node its own --state-dir"
            ) from None
        except OSError as exc:
            lock.close()
            raise StateDirError(f"cannot use state dir {self.path}: {exc}") from exc
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        # Only now, holding the lock, is it certain that no writer owns these temp files.
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        removed = []
        for directory in (self.path, self.checkpoint_dir):
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                if _is_temp_name(entry.name) and not entry.is_dir(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.name)
        if removed:
            log.info(
                "removed temp files left by an interrupted write dir=%s files=%s",
                self.path,
                ",".join(sorted(removed)),
            )

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
            atomic_write_bytes(path, json.dumps(stored, indent=2).encode())
        return str(node_id)

    def save_checkpoint(
        self, round: int, weights: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a checkpoint atomically and prune old ones. Blocking: call it off the loop."""
        if _META_KEY in weights:
            raise ValueError(f"tensor name {_META_KEY!r} is reserved")
        body = {"round": round, **(meta or {})}
        # Not np.ascontiguousarray: it turns a 0-d tensor (a counter) into shape (1,).
        arrays = {name: np.asarray(arr, order="C") for name, arr in weights.items()}
        arrays[_META_KEY] = np.frombuffer(json.dumps(body).encode(), dtype=np.uint8)
        target = self.checkpoint_dir / f"ckpt-{round:06d}.npz"
        with self._writing:
            atomic_write(target, lambda fh: np.savez(fh, allow_pickle=False, **arrays))
            for old in self._checkpoints()[: -self.keep]:
                old.unlink(missing_ok=True)
        return target

    def quiesce(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for a checkpoint being written, and let none start after.

        For a process about to exit at once: what is on disk is then whole. True if quiet.
        """
        return self._writing.acquire(timeout=timeout)

    def latest_checkpoint(self, expected: ExpectedSpec | None = None) -> Checkpoint | None:
        """The newest usable checkpoint, or None when there is none.

        Newest first, a checkpoint is refused (one warning naming the file and the reason) when
        it cannot be read, holds NaN/Inf, or, given `expected` (tensor name -> (dtype, shape),
        as `p2pfl.protocol.model.layout` computes it), does not fit that layout; the next older
        one is then tried. When every one is refused, one more warning says the node starts
        fresh.
        """
        paths = self._checkpoints()
        for path in reversed(paths):
            try:
                return read_checkpoint(path, expected)
            except CheckpointError as exc:
                log.warning("refusing checkpoint path=%s reason=%s", path, exc)
        if paths:
            log.warning(
                "no usable checkpoint in %s (%d refused): starting fresh",
                self.checkpoint_dir,
                len(paths),
            )
        return None

    @property
    def privacy_path(self) -> Path:
        return self.path / "privacy.json"

    def save_privacy(self, record: Mapping[str, Any]) -> None:
        """Write the privacy accountant's record atomically. Blocking: call it off the loop."""
        atomic_write_bytes(self.privacy_path, json.dumps(dict(record), indent=2).encode())

    def load_privacy(self) -> dict[str, Any] | None:
        """The saved privacy record; None when there is none. StateDirError when unreadable:
        a node that cannot tell what it spent must not train on."""
        try:
            data = json.loads(self.privacy_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateDirError(f"cannot read {self.privacy_path}: {exc}") from exc
        if not isinstance(data, dict):
            raise StateDirError(f"cannot read {self.privacy_path}: not a JSON object")
        return data

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to the metrics log (naming the run, when there is one)."""
        if self.run is not None:
            record = {"run": self.run, **record}
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def checkpoints(self) -> dict[int, Path]:
        """The checkpoint files kept, by round, oldest first (none: empty)."""
        found = {}
        for path in self.checkpoint_dir.iterdir():
            m = _CKPT_RE.match(path.name)
            if m:
                found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def _checkpoints(self) -> list[Path]:
        return list(self.checkpoints().values())


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


def read_checkpoint(path: Path, expected: ExpectedSpec | None = None) -> Checkpoint:
    """Read one checkpoint; CheckpointError when it is unreadable, holds NaN/Inf, or does not
    fit `expected` (see `StateDir.latest_checkpoint`)."""
    try:
        ckpt = _read_checkpoint(path)
    except _UNREADABLE as exc:
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {exc})") from None
    reason = _misfit(ckpt.weights, expected)
    if reason is not None:
        raise CheckpointError(reason)
    return ckpt


# numpy parses each array's header with `ast.literal_eval`, and CPython 3.11's AST builder is
# not safe across threads (gh-106905: "SystemError: AST constructor recursion depth mismatch"
# when simulated nodes resume from their checkpoints at once, each in `asyncio.to_thread`).
_READING = threading.Lock()


def _read_checkpoint(path: Path) -> Checkpoint:
    with _READING, np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data[_META_KEY]).decode())
        weights = {k: data[k] for k in data.files if k != _META_KEY}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return Checkpoint(round=int(meta.pop("round")), weights=weights, meta=meta)


def _misfit(weights: Mapping[str, np.ndarray], expected: ExpectedSpec | None) -> str | None:
    """Why these weights cannot be loaded into a model of layout `expected`; None if they can."""
    if expected is not None:
        if set(weights) != set(expected):
            missing = sorted(set(expected) - set(weights))[:5]
            extra = sorted(set(weights) - set(expected))[:5]
            return f"tensor names differ from the model: missing {missing}, unexpected {extra}"
        for name, (want_dtype, want_shape) in expected.items():
            arr = weights[name]
            if arr.dtype != np.dtype(want_dtype):
                return (
                    f"dtype mismatch for {name}: got {arr.dtype.name}, "
                    f"expected {np.dtype(want_dtype).name}"
                )
            if arr.shape != tuple(want_shape):
                return f"shape mismatch for {name}: got {arr.shape}, expected {tuple(want_shape)}"
    for name, arr in weights.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return f"non-finite values (NaN/Inf) in {name}"
    return None


def _is_temp_name(name: str) -> bool:
    """A temp file of `atomic_write` (hidden, ``.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable: without this a power cut may undo it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole or not at all (temp file 0600, fsync, rename, fsync dir)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Replace `path` with what `write` writes to the file it is given, whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
