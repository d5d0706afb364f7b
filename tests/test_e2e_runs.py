"""End-to-end: runs as real `p2pfl run` processes see them, and `p2pfl runs` over their state dirs.

Acceptance (issue 16): two runs on the same network and state dirs, with different
``--run-name``, keep separate metrics, checkpoints and telemetry; `p2pfl runs list` shows both
finished with their final accuracy; `p2pfl runs compare` shows their config difference. A node
without ``--run-name`` starts ``<network>-<timestamp>``, and a node joining it adopts that run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, free_ports, stop_all, wait_until
from tests.test_e2e_run import FAST, finish, logs

# Each test starts four processes (torch, data): 15-20 s on 2 idle cores, 35-45 s on busy ones.
pytestmark = pytest.mark.timeout(240)


def node(tmp_path: Path, i: int, n: int, ports: list[int], net: str, name: str,
         extra: list[str]) -> NodeProcess:  # fmt: skip
    """Node ``n<i>`` of ``n`` on ``net``, its state dir ``tmp_path/n<i>``, its log ``name``."""
    peers = [a for j in range(n) if j != i for a in ("--peer", f"n{j}=mqtt://127.0.0.1:{ports[j]}")]
    args = [
        "--id", f"n{i}", "--network", net, "--state-dir", str(tmp_path / f"n{i}"),
        "--num-partitions", str(n), "--partition-index", str(i), "--presence-ttl", "6",
        "--interface", "127.0.0.1", "--listen", f"127.0.0.1:{ports[i]}", *peers, *FAST, *extra,
    ]  # fmt: skip
    return NodeProcess(name, args, tmp_path).start()


def runs_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "runs", *map(str, args)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def events(proc: NodeProcess, event: str) -> list[dict[str, object]]:
    return [r for r in proc.records() if r.get("event") == event]


def test_two_named_runs_in_the_same_state_dirs_stay_apart_and_compare(tmp_path: Path) -> None:
    net, ports, n, rounds = f"runs{uuid.uuid4().hex[:6]}", free_ports(2), 2, 2
    sync = ["--schedule", "ring", "--mode", "sync", "--rounds", str(rounds),
            "--round-timeout", "20", "--tag", "suite=e2e"]  # fmt: skip
    done: dict[str, list[float]] = {}
    for run, lr in (("first", "0.05"), ("second", "0.01")):
        extra = [*sync, "--run-name", run, "--lr", lr]
        nodes = [node(tmp_path, i, n, ports, net, f"{run}-n{i}", extra) for i in range(n)]
        finish(nodes, 120)
        for p in nodes:
            assert p.proc is not None and p.proc.returncode == 0, logs(nodes)
            assert {r["run"] for r in events(p, "round")} == {run}, p.tail()
        done[run] = [float(events(p, "done")[0]["accuracy"]) for p in nodes]  # type: ignore[arg-type]
    for i in range(n):
        state = tmp_path / f"n{i}"
        assert sorted(p.name for p in (state / "runs").iterdir()) == ["first", "second"]
        for run in ("first", "second"):
            lines = (state / "runs" / run / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["run"] for line in lines] == [run] * rounds
            ckpts = sorted((state / "runs" / run / "checkpoints").glob("ckpt-*.npz"))
            assert [c.name for c in ckpts][-1] == f"ckpt-{rounds:06d}.npz"
            record = json.loads((state / "runs" / run / "run.json").read_text())
            assert record["status"] == "finished" and record["run"] == run
            assert record["tags"] == ["suite=e2e"] and record["node"] == f"n{i}"
        assert not (state / "metrics.jsonl").exists()
    dirs = [a for i in range(n) for a in ("--state-dir", tmp_path / f"n{i}")]
    listed = runs_cli("list", *dirs, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["run"]: r for r in json.loads(listed.stdout)}
    for run in ("first", "second"):
        assert rows[run]["status"] == "finished" and rows[run]["nodes"] == ["n0", "n1"]
        assert rows[run]["rounds"] == rounds
        assert rows[run]["final_accuracy"] == pytest.approx(sum(done[run]) / n, abs=1e-4)
    table = runs_cli("list", *dirs)
    assert table.returncode == 0 and "first" in table.stdout and "finished" in table.stdout
    compared = runs_cli("compare", "first", "second", *dirs, "--plot", tmp_path / "cmp.png")
    assert compared.returncode == 0, compared.stderr
    assert re.search(r"lr\s+│\s+0\.05\s+│\s+0\.01", compared.stdout), compared.stdout
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    unknown = runs_cli("show", "third", *dirs)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no run 'third'")


def test_without_a_run_name_a_joining_node_adopts_the_run_it_hears(tmp_path: Path) -> None:
    net, ports = f"runs{uuid.uuid4().hex[:6]}", free_ports(2)
    first = node(tmp_path, 0, 2, ports, net, "a", ["--schedule", "ring", "--mode", "async",
                                                   "--period", "0.5"])  # fmt: skip
    nodes = [first]
    try:
        wait_until(lambda: first.last_round() >= 1, 90, "the first node's round 1", first.tail)
        (run,) = {r["run"] for r in events(first, "round")}
        assert re.fullmatch(rf"{net}-\d{{8}}T\d{{6}}Z", str(run)), run
        joining = ["--schedule", "ring", "--mode", "async", "--rounds", "2", "--min-peers", "1"]
        joiner = node(tmp_path, 1, 2, ports, net, "b", joining)
        nodes.append(joiner)
        finish([joiner], 90)
        assert joiner.proc is not None and joiner.proc.returncode == 0, joiner.tail()
        assert {r["run"] for r in events(joiner, "round")} == {run}, joiner.tail()
        assert [p.name for p in (tmp_path / "n1" / "runs").iterdir()] == [run]
        # the first node's status (its telemetry record) names the run too
        status = subprocess.run(
            [sys.executable, "-m", "p2pfl", "status", "--state-dir", str(tmp_path / "n0"),
             "--json"], capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.returncode == 0 and json.loads(status.stdout)["run"] == run, status
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.tail()
    finally:
        stop_all(nodes)
    shown = runs_cli("show", str(run), "--state-dir", tmp_path / "n0", "--state-dir",
                     tmp_path / "n1", "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    # the first node was stopped before its rounds were done: its part is resumable
    assert record["nodes"] == ["n0", "n1"] and record["status"] == "interrupted"
