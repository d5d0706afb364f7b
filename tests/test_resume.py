"""Safe resume, end to end: `p2pfl run` killed with SIGKILL while it writes a checkpoint, or
restarted on a damaged state dir, resumes from the newest good checkpoint, never from a bad one.

Acceptance (trust issue): "`kill -9` of a node while it writes a checkpoint: it restarts from the
previous good one."
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.nodeproc import NodeProcess, run_dir, stop_all, wait_until

pytestmark = pytest.mark.timeout(300)

RESUMED = re.compile(r"resumed from checkpoint round=(\d+)")
LIVES = 4
"""Kills in the kill test, half of them mid-write, half at a random moment; each restart costs
a few seconds of start-up (torch, data)."""


def solo(workdir: Path, state: Path, name: str) -> NodeProcess:
    """One node alone on its own network, checkpointing every round until killed."""
    args = [
        "--id", "solo", "--network", f"resume-{uuid.uuid4().hex[:8]}",
        "--listen", "127.0.0.1:0", "--interface", "127.0.0.1",
        "--model", "mlp", "--local-epochs", "1", "--rounds", "0", "--state-dir", str(state),
    ]  # fmt: skip
    return NodeProcess(name, args, workdir).start()


def first_round(node: NodeProcess) -> int:
    wait_until(lambda: bool(node.rounds()), 90, f"{node.name} to finish a round", node.tail)
    return int(node.rounds()[0]["round"])


def resumed_from(node: NodeProcess) -> int | None:
    found = [RESUMED.search(str(r.get("msg", ""))) for r in node.records()]
    rounds = [int(m.group(1)) for m in found if m]
    assert len(rounds) <= 1, node.tail()
    return rounds[0] if rounds else None


def checkpoint_warnings(node: NodeProcess) -> list[str]:
    return [
        str(r.get("msg"))
        for r in node.records()
        if r.get("level") == "warning" and "checkpoint" in str(r.get("msg"))
    ]


def temp_files(state: Path) -> list[Path]:
    dirs = (state, run_dir(state) / "checkpoints")
    return [p for d in dirs for p in d.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]


def checkpoints(state: Path) -> list[Path]:
    return sorted((run_dir(state) / "checkpoints").glob("ckpt-*.npz"))


def kill_mid_write(node: NodeProcess, state: Path, within: float = 60.0) -> None:
    """SIGKILL `node` while a checkpoint is being written, not merely near it: freeze the process
    (SIGSTOP) the moment a temp file appears, and kill it if the file is still there; otherwise
    let it go on and try the next round."""
    ckpts = run_dir(state) / "checkpoints"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(p.name.startswith(".ckpt-") for p in ckpts.iterdir()):
            continue  # spin: a write lasts a millisecond or so
        node.signal(signal.SIGSTOP)
        if any(p.name.startswith(".ckpt-") for p in ckpts.iterdir()):
            node.signal(signal.SIGKILL)
            return
        node.signal(signal.SIGCONT)  # the rename won the race: wait for the next round
    raise AssertionError(f"never caught a checkpoint mid-write in {within}s\n{node.tail()}")


def test_kill_9_at_any_moment_restarts_from_the_previous_good_checkpoint(tmp_path: Path) -> None:
    """Killed over and over, half the time mid-write, at random moments otherwise: every restart
    resumes from the newest whole checkpoint, refuses none, and clears the killed write's temp."""
    rng = random.Random(0)
    state = tmp_path / "state"
    saved = 0  # the last round a killed life reported: its checkpoint (or the next) is on disk
    orphans: list[Path] = []
    nodes: list[NodeProcess] = []
    try:
        for life in range(LIVES + 1):
            node = solo(tmp_path, state, f"life{life}")
            nodes.append(node)
            began = first_round(node)
            resumed = resumed_from(node)
            if life == 0:
                assert resumed is None and began == 1, node.tail()
            else:
                # The round-r report is logged after checkpoint r is renamed into place, so a
                # kill may have left checkpoint `saved` or `saved + 1`, never anything older.
                assert resumed in (saved, saved + 1), f"saved={saved}\n{node.tail()}"
                assert began == resumed + 1, node.tail()
            assert checkpoint_warnings(node) == [], "a kill -9 damaged a checkpoint"
            assert [p for p in orphans if p.exists()] == [], "an orphaned temp file survived"
            if life == LIVES:
                break
            if life % 2:
                time.sleep(rng.uniform(0.0, 0.6))  # a kill at a random moment of a round
                node.signal(signal.SIGKILL)
            else:
                kill_mid_write(node, state)
            node.wait(10)
            saved = max(resumed or 0, node.last_round())
            orphans = temp_files(state)
            if life % 2 == 0:
                assert any(p.name.startswith(".ckpt-") for p in orphans), "killed mid-write"
    finally:
        stop_all(nodes)
    last = nodes[-1]
    assert last.proc is not None and last.proc.returncode == 0, last.tail()


# ---- a damaged state dir, as a crash without atomic writes (or a bad disk) would leave it --------


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with three whole checkpoints, from a node stopped cleanly."""
    workdir = tmp_path_factory.mktemp("trained")
    state = workdir / "state"
    node = solo(workdir, state, "trainer")
    try:
        wait_until(lambda: node.last_round() >= 4, 90, "round 4", node.tail)
    finally:
        stop_all([node])
    assert node.proc is not None and node.proc.returncode == 0, node.tail()
    assert len(checkpoints(state)) == 3
    return state


def truncate(path: Path) -> str:
    """What a crash mid-write leaves without a temp file and a rename: the first half."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return "unreadable (BadZipFile"


def rewrite(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(path, allow_pickle=False) as data:
        meta = data["__p2pfl_meta__"].copy()
        weights = {k: data[k] for k in data.files}
    change(weights)
    weights["__p2pfl_meta__"] = meta
    np.savez(path, allow_pickle=False, **weights)


def poison(path: Path) -> str:
    """A model that diverged before it was saved."""

    def nan(weights: dict[str, np.ndarray]) -> None:
        name = next(k for k, v in weights.items() if v.dtype.kind == "f")
        weights[name] = weights[name].copy()
        weights[name].flat[0] = np.nan

    rewrite(path, nan)
    return "non-finite values (NaN/Inf)"


def other_model(path: Path) -> str:
    """A checkpoint of another model left in the directory (a changed --model, say)."""

    def widen(weights: dict[str, np.ndarray]) -> None:
        name = next(k for k, v in weights.items() if v.ndim == 2)
        weights[name] = np.zeros((weights[name].shape[0] + 1, weights[name].shape[1]), np.float32)

    rewrite(path, widen)
    return "shape mismatch for"


@pytest.mark.parametrize("damage", [truncate, poison, other_model])
def test_a_bad_newest_checkpoint_is_refused_and_the_previous_one_used(
    tmp_path: Path, trained_state: Path, damage: Callable[[Path], str]
) -> None:
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    *_, previous, newest = checkpoints(state)
    reason = damage(newest)
    orphans = [newest.parent / ".ckpt-x1y2z3.tmp", state / ".identity.json-q9w8e7.tmp"]
    orphans[0].write_bytes(newest.read_bytes()[:100])
    orphans[1].write_text('{"id": "so')
    good_round = int(previous.stem.split("-")[1])

    node = solo(tmp_path, state, "restarted")
    try:
        began = first_round(node)
    finally:
        stop_all([node])
    assert resumed_from(node) == good_round, node.tail()
    assert began == good_round + 1
    (warning,) = checkpoint_warnings(node)
    assert f"path={newest}" in warning and reason in warning, warning
    assert [p for p in orphans if p.exists()] == []
    assert node.proc is not None and node.proc.returncode == 0, node.tail()


def test_when_no_checkpoint_is_good_the_node_starts_fresh_and_says_so(
    tmp_path: Path, trained_state: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(trained_state, state)
    bad = checkpoints(state)
    for path in bad:
        truncate(path)
    node = solo(tmp_path, state, "fresh")
    try:
        began = first_round(node)
    finally:
        stop_all([node])
    assert resumed_from(node) is None and began == 1, node.tail()
    *refused, fresh = checkpoint_warnings(node)
    assert sorted(w.split("path=")[1].split()[0] for w in refused) == [str(p) for p in bad]
    assert "(3 refused): starting fresh" in fresh
    assert node.proc is not None and node.proc.returncode == 0, node.tail()
