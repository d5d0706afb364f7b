"""State directory: identity, atomic checkpoints, resume, lock."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.protocol.model import layout
from p2pfl.store import StateDir, StateDirError


def _weights(value: float) -> dict[str, np.ndarray]:
    return {
        "fc.weight": np.full((3, 4), value, dtype=np.float32),
        "fc.bias": np.arange(3, dtype=np.float32) + value,
        "counter": np.array(7, dtype=np.int64),
    }


def test_node_id_is_stable_across_restarts(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        first = state.node_id()
    with StateDir(tmp_path) as state:
        assert state.node_id() == first
        assert state.node_id("alice") == "alice"
    with StateDir(tmp_path) as state:
        assert state.node_id() == "alice"


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    with StateDir(tmp_path, keep=2) as state:
        assert state.latest_checkpoint() is None
        for r in range(1, 6):
            state.save_checkpoint(r, _weights(float(r)), {"age": r * 10.0})
        names = sorted(p.name for p in state.checkpoint_dir.iterdir())
        assert names == ["ckpt-000004.npz", "ckpt-000005.npz"]
        ckpt = state.latest_checkpoint()
    assert ckpt is not None
    assert ckpt.round == 5
    assert ckpt.meta == {"age": 50.0}
    for name, arr in _weights(5.0).items():
        np.testing.assert_array_equal(ckpt.weights[name], arr)
        assert ckpt.weights[name].dtype == arr.dtype
        assert ckpt.weights[name].shape == arr.shape  # a 0-d counter stays 0-d


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        state.save_checkpoint(1, _weights(1.0))
        newest = state.save_checkpoint(2, _weights(2.0))
        newest.write_bytes(b"not a zip file")
        ckpt = state.latest_checkpoint()
    assert ckpt is not None and ckpt.round == 1


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        state.save_checkpoint(3, _weights(0.5))
        assert [p.name for p in state.checkpoint_dir.iterdir()] == ["ckpt-000003.npz"]


def test_second_node_on_same_dir_gets_a_clear_error(tmp_path: Path) -> None:
    with StateDir(tmp_path), pytest.raises(StateDirError, match="in use by another p2pfl node"):
        StateDir(tmp_path).open()
    # released on exit
    with StateDir(tmp_path):
        pass


def test_metrics_log_is_json_lines(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        state.append_metrics({"round": 1, "accuracy": 0.5})
        state.append_metrics({"round": 2, "accuracy": 0.75})
        lines = state.metrics_path.read_text().splitlines()
    assert [json.loads(line)["accuracy"] for line in lines] == [0.5, 0.75]


# ---- safe resume: a checkpoint that does not fit is refused, an older one used -----------------


def _layout() -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    return layout(_weights(0.0))


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda w: w.pop("fc.bias"), "missing ['fc.bias']"),
        (lambda w: w.update(extra=np.zeros(2, np.float32)), "unexpected ['extra']"),
        (lambda w: w.update({"fc.weight": np.zeros((4, 3), np.float32)}), "shape mismatch"),
        (lambda w: w.update({"fc.bias": np.zeros(3, np.float64)}), "dtype mismatch for fc.bias"),
        (lambda w: w["fc.weight"].__setitem__((1, 2), np.nan), "non-finite values"),
        (lambda w: w["fc.bias"].__setitem__(0, -np.inf), "non-finite values (NaN/Inf) in fc.bias"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf"],
)
def test_a_checkpoint_that_does_not_fit_is_refused_and_the_older_one_used(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[dict[str, np.ndarray]], object],
    reason: str,
) -> None:
    bad = _weights(3.0)
    damage(bad)
    with StateDir(tmp_path) as state:
        state.save_checkpoint(1, _weights(1.0))
        state.save_checkpoint(2, _weights(2.0))
        newest = state.save_checkpoint(3, bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="p2pfl.store"):
            ckpt = state.latest_checkpoint(_layout())
    assert ckpt is not None and ckpt.round == 2
    np.testing.assert_array_equal(ckpt.weights["fc.weight"], _weights(2.0)["fc.weight"])
    (line,) = _refusals(caplog)
    assert f"path={newest}" in line and reason in line


def test_non_finite_values_are_refused_even_without_a_layout(tmp_path: Path) -> None:
    bad = _weights(2.0)
    bad["fc.weight"][0, 0] = np.nan
    with StateDir(tmp_path) as state:
        state.save_checkpoint(1, _weights(1.0))
        state.save_checkpoint(2, bad)
        ckpt = state.latest_checkpoint()
    assert ckpt is not None and ckpt.round == 1


def test_a_truncated_newest_checkpoint_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a crash mid-write without an atomic rename would leave: half a zip file."""
    with StateDir(tmp_path) as state:
        state.save_checkpoint(4, _weights(4.0))
        newest = state.save_checkpoint(5, _weights(5.0))
        whole = newest.read_bytes()
        newest.write_bytes(whole[: len(whole) // 2])
        with caplog.at_level(logging.WARNING, logger="p2pfl.store"):
            ckpt = state.latest_checkpoint(_layout())
    assert ckpt is not None and ckpt.round == 4
    (line,) = _refusals(caplog)
    assert f"path={newest}" in line and "unreadable (BadZipFile" in line


def test_when_no_checkpoint_fits_none_is_returned_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = {"conv.weight": np.zeros((2, 2), np.float32)}
    with StateDir(tmp_path) as state:
        state.save_checkpoint(1, other)
        state.save_checkpoint(2, other)
        (state.checkpoint_dir / "ckpt-000003.npz").write_bytes(b"")
        with caplog.at_level(logging.WARNING, logger="p2pfl.store"):
            assert state.latest_checkpoint(_layout()) is None
    lines = _refusals(caplog)
    assert len(lines) == 4
    assert [line.startswith("refusing checkpoint") for line in lines] == [True] * 3 + [False]
    assert "(3 refused): starting fresh" in lines[-1]


def test_an_empty_state_dir_has_nothing_to_say(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with StateDir(tmp_path) as state, caplog.at_level(logging.WARNING, logger="p2pfl.store"):
        assert state.latest_checkpoint(_layout()) is None
    assert _refusals(caplog) == []


# ---- orphaned temp files, durable renames, private files ---------------------------------------


def test_orphaned_temp_files_are_removed_when_the_dir_is_opened(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        state.node_id("alice")
        good = state.save_checkpoint(1, _weights(1.0))
    orphans = [
        tmp_path / "checkpoints" / ".ckpt-k1l2m3.tmp",
        tmp_path / ".identity.json-a1b2c3.tmp",
    ]
    for orphan in orphans:
        orphan.write_bytes(b"half written")
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden-config"]  # not ours: left alone
    for path in kept:
        path.write_text("user's")
    with StateDir(tmp_path) as state:
        assert [p for p in orphans if p.exists()] == []
        assert all(p.exists() for p in kept)
        assert good.exists() and state.node_id() == "alice"
        ckpt = state.latest_checkpoint(_layout())
    assert ckpt is not None and ckpt.round == 1


def test_a_node_refused_the_lock_leaves_the_running_writers_temp_files(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        in_flight = state.checkpoint_dir / ".ckpt-inflight.tmp"
        in_flight.write_bytes(b"being written")
        with pytest.raises(StateDirError, match="in use"):
            StateDir(tmp_path).open()
        assert in_flight.exists()


def test_the_directory_is_fsynced_after_each_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without it a power cut can lose the rename even though the file's data is on disk."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    with StateDir(tmp_path) as state:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        state.node_id("alice")
        state.save_checkpoint(7, _weights(7.0))
    assert events == [
        "fsync file",
        "rename identity.json",
        "fsync dir",
        "fsync file",
        "rename ckpt-000007.npz",
        "fsync dir",
    ]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private_to_the_user(tmp_path: Path) -> None:
    root = tmp_path / "state"
    with StateDir(root) as state:
        state.node_id("alice")
        ckpt = state.save_checkpoint(1, _weights(1.0))
        state.append_metrics({"round": 1})
    assert _mode(root) == _mode(root / "checkpoints") == 0o700
    for path in (ckpt, root / "identity.json", root / "metrics.jsonl", root / "lock"):
        assert _mode(path) == 0o600, path


def test_an_existing_open_state_dir_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "checkpoints").mkdir(parents=True)
    (root / "lock").write_text("")
    for path, mode in ((root, 0o755), (root / "checkpoints", 0o777), (root / "lock", 0o644)):
        path.chmod(mode)
    with StateDir(root):
        pass
    assert _mode(root) == _mode(root / "checkpoints") == 0o700
    assert _mode(root / "lock") == 0o600
