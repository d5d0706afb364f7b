"""State directory: identity, atomic checkpoints, resume, lock."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
