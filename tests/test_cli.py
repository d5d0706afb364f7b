"""The `p2pfl` command as a user runs it: help, versions, config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def p2pfl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_command() -> None:
    out = p2pfl("--help")
    assert out.returncode == 0
    for command in ("run", "sim", "monitor", "peers", "doctor", "keys", "topology"):
        assert command in out.stdout


def test_run_help_teaches_the_flags() -> None:
    out = p2pfl("run", "--help")
    assert out.returncode == 0
    for flag in ("--schedule", "--peer", "--broker", "--partition-index", "--state-dir",
                 "--advertise", "--interface", "--trust", "--max-peers"):  # fmt: skip
        assert flag in out.stdout
    assert "Examples" in out.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--schedule", "rign"], "schedule"),
        (["--lr", "-1"], "lr"),
        (["--partition", "dirichlet:0"], "partition"),
        (["--merge", "mean"], "merge"),
        (["--codec", "zip"], "codec"),
        (["--broker", "http://x:1"], "broker"),
        (["--num-partitions", "2", "--partition-index", "5"], "partition_index"),
        (["--id", "a/b"], "id"),
        (["--peer", "n1"], "peer"),
        (["--trust", "nobody"], "trust"),
        (["--trust", "ca"], "ca_key"),
        (["--trust", "ca", "--ca-key", "no-such.pub"], "ca_key"),
        (["--trust", "ca", "--ca-key", "p2pfl-ed25519 AAAA"], "ca_key"),
        (["--max-peers", "0"], "max_peers"),
        (["--advertise", "mqtt://h:1"], "advertise"),
        (["--interface", "eth0"], "interfaces"),
        (["--telemetry-detail", "some"], "telemetry_detail"),
    ],
)
def test_bad_flag_prints_one_line_naming_the_key_and_exits_2(args: list[str], key: str) -> None:
    out = p2pfl("run", *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("config error: ")
    assert key in lines[0]
    assert "Traceback" not in out.stderr


def test_bad_config_file_value_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('schedule = "ring"\nlocal_epochs = 0\n')
    out = p2pfl("run", "--config", str(cfg))
    assert out.returncode == 2
    assert "local_epochs" in out.stderr
    assert out.stderr.count("\n") == 1


def test_unknown_config_key_and_broken_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("shedule = 'ring'\n")
    out = p2pfl("run", "--config", str(cfg))
    assert out.returncode == 2 and "shedule: unknown key" in out.stderr
    cfg.write_text("schedule = \n")
    out = p2pfl("run", "--config", str(cfg))
    assert out.returncode == 2 and "not valid TOML" in out.stderr


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    from p2pfl.config import load_config

    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'schedule = "partial-mesh"\nlr = 0.1\n'
        '[[peers]]\nid = "b"\nbroker = "mqtt://127.0.0.1:1884"\n'
    )
    config = load_config(cfg, {"lr": 0.2, "schedule": None})
    assert config.schedule == "partial-mesh"
    assert config.lr == 0.2
    assert config.peers[0].id == "b"


def test_topology_shows_a_symmetric_mesh_and_writes_a_reusable_file(tmp_path: Path) -> None:
    import json

    out = tmp_path / "mesh.toml"
    result = p2pfl("topology", "--nodes", "6", "--degree", "2", "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert len(plan["nodes"]) == 6
    for node, row in plan["nodes"].items():
        assert len(row["send_to"]) == 2
        for peer in row["send_to"]:
            assert node in plan["nodes"][peer]["expect_from"]
    again = p2pfl("topology", "--ids", ",".join(plan["nodes"]), "--topology-file", str(out),
                  "--json")  # fmt: skip
    assert json.loads(again.stdout)["nodes"] == plan["nodes"]


def test_topology_ring_table() -> None:
    result = p2pfl("topology", "--schedule", "ring", "--nodes", "3")
    assert result.returncode == 0
    assert "n01" in result.stdout and "n03" in result.stdout
