"""End-to-end: `--secure-aggregation` as a user gives it, to `p2pfl run` and `p2pfl sim`, and
the settings it refuses at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pfl.config import ConfigError, load_config
from tests.nodeproc import NodeProcess, free_ports

pytestmark = pytest.mark.timeout(240)

FAST = ["--model", "mlp", "--local-epochs", "1", "--dataset", "mnist1d", "--seed", "0"]
SYNC_MESH = ["--mode", "sync", "--merge", "average", "--schedule", "partial-mesh"]
SYNC_MESH_KEYS = {"mode": "sync", "merge": "average", "schedule": "partial-mesh"}


def p2pfl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=120,
        cwd=cwd,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({}, "mode = sync"),
        ({"mode": "sync"}, "merge = average"),
        ({"mode": "sync", "merge": "median"}, "merge = average"),
        ({"mode": "sync", "merge": "average"}, "schedule = partial-mesh"),
        ({**SYNC_MESH_KEYS, "degree": 1}, "degree >= 2"),
        ({**SYNC_MESH_KEYS, "discovery": ["static"]}, "presence"),
    ],
)
def test_settings_it_cannot_work_with_are_refused(args: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"secure_aggregation": True, **args})
    lines = str(err.value).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("config error: ") and "secure_aggregation: needs" in lines[0]
    assert says in lines[0]
    assert load_config(None, {**args, "secure_aggregation": False})  # only the flag is wrong


def test_the_flag_refused_at_start_in_one_line_exit_2() -> None:
    out = p2pfl("run", "--secure-aggregation", "--mode", "sync")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "secure_aggregation: needs merge = average" in lines[0]
    assert "Traceback" not in out.stderr


def test_config_file_key_and_a_graph_file_with_a_lonely_node(tmp_path: Path) -> None:
    graph = tmp_path / "line.toml"
    graph.write_text('edges = [["a", "b"], ["b", "c"]]\n')
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'secure_aggregation = true\nmode = "sync"\nmerge = "average"\n'
        f'schedule = "partial-mesh"\ntopology_file = "{graph}"\n'
    )
    out = p2pfl("run", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1
    assert "two neighbours" in out.stderr and "a, c" in out.stderr


def test_sim_scenario_refuses_other_schedules(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "s"\nnodes = 4\ncompare = ["ring", "partial-mesh"]\n'
        '[node]\nmode = "sync"\nrounds = 1\nmerge = "average"\nsecure_aggregation = true\n'
    )
    out = p2pfl("sim", str(scenario), "--no-plots", "--out", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1
    assert "schedule = partial-mesh" in out.stderr and "(schedule ring)" in out.stderr


@pytest.mark.slow  # about 30 s on 2 cores: three processes importing torch
def test_three_processes_merge_masked_models_every_round(tmp_path: Path) -> None:
    ports = free_ports(3)
    ids = ["a0", "a1", "a2"]
    nodes = []
    for i, node_id in enumerate(ids):
        peers = [
            arg
            for j, other in enumerate(ids)
            if j != i
            for arg in ("--peer", f"{other}=mqtt://127.0.0.1:{ports[j]}")
        ]
        args = [
            "--id", node_id, "--network", "e2esa", "--state-dir", str(tmp_path / node_id),
            "--num-partitions", "3", "--partition-index", str(i), "--presence-ttl", "6",
            "--interface", "127.0.0.1", "--listen", f"127.0.0.1:{ports[i]}", *peers, *FAST,
            *SYNC_MESH, "--degree", "2", "--rounds", "3", "--round-timeout", "20",
            "--secure-aggregation",
        ]  # fmt: skip
        nodes.append(NodeProcess(node_id, args, tmp_path).start())
    try:
        for node in nodes:
            node.wait(180)
    finally:
        for node in nodes:
            if node.alive():
                node.stop()
    for node in nodes:
        assert node.proc is not None and node.proc.returncode == 0, node.tail()
        done = node.done()
        assert done is not None, node.tail()
        assert done["round"] == 3
        # Both neighbours' masked models summed in every round, nothing refused.
        assert [r["merged"] for r in node.rounds()] == [2, 2, 2], node.tail()
        assert done["rejected"] == 0, node.tail()


def test_sim_runs_a_secure_aggregation_scenario(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "s"\nnodes = 4\ncompare = ["partial-mesh"]\n'
        '[node]\nmode = "sync"\nrounds = 2\nmerge = "average"\nsecure_aggregation = true\n'
        'model = "mlp"\nlocal_epochs = 1\ndegree = 2\n'
    )
    out = p2pfl("sim", str(scenario), "--no-plots", "--json", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["schedules"]["partial-mesh"]
    assert summary["rejected"] == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    merged = [r["merged"] for r in records if "merged" in r]
    assert merged and all(m == 2 for m in merged)
