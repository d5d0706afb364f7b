"""End-to-end: the flags and config-file keys that came with deriving the flags from the config
models, as a user runs them (real processes, a real Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from p2pfl.protocol import topics
from p2pfl.transport.base import LocalBroker
from tests.nodeproc import run_dir
from tests.test_monitor_discovery import client, presence, telemetry

pytestmark = pytest.mark.timeout(120)


def p2pfl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args], capture_output=True, text=True, timeout=timeout
    )


def test_a_node_runs_with_the_new_flags_and_keeps_as_many_checkpoints_as_told(
    tmp_path: Path,
) -> None:
    state = tmp_path / "solo"
    out = p2pfl(
        "run", "--id", "solo", "--network", f"c{uuid.uuid4().hex[:6]}",
        "--listen", "127.0.0.1:0", "--interface", "127.0.0.1", "--discovery", "static,presence",
        "--mode", "sync", "--rounds", "2", "--dataset", "digits", "--model", "logreg",
        "--local-epochs", "1", "--telemetry-interval", "0", "--state-dir", str(state),
        "--momentum", "0.5", "--max-round-lag", "2", "--role", "trainer",
        "--checkpoints-keep", "1", "--log-format", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rounds = [json.loads(line) for line in out.stderr.splitlines() if '"round"' in line]
    assert any(r.get("round") == 2 for r in rounds), out.stderr[-2000:]
    # Two rounds were checkpointed; --checkpoints-keep 1 left the last one only.
    assert [p.name for p in (run_dir(state) / "checkpoints").iterdir()] == ["ckpt-000002.npz"]


@pytest.mark.parametrize(
    ("flag", "key"), [("--momentum", "momentum"), ("--checkpoints-keep", "checkpoints_keep")]
)
def test_a_new_flag_and_its_key_refuse_a_bad_value_alike(
    flag: str, key: str, tmp_path: Path
) -> None:
    by_flag = p2pfl("run", flag, "-1")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"{key} = -1\n")
    by_file = p2pfl("run", "--config", str(cfg))
    assert by_flag.returncode == by_file.returncode == 2
    assert by_flag.stderr == by_file.stderr
    assert by_flag.stderr.startswith(f"config error: {key}: ") and by_flag.stderr.count("\n") == 1


def test_monitor_reads_its_options_from_a_config_file_and_flags_win(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    net = f"m{uuid.uuid4().hex[:6]}"

    async def publish() -> None:
        async with client(mosquitto.uri) as pub:
            await pub.publish(
                topics.presence(net, "p"), presence(net, "p", mosquitto.uri), retain=True
            )
            await pub.publish(
                topics.telemetry(net, "p"), telemetry(net, "p", mosquitto.uri), retain=True
            )
            await pub.flush()

    asyncio.run(publish())
    cfg = tmp_path / "monitor.toml"
    cfg.write_text(
        f'network = "not-this-one"\nbrokers = ["{mosquitto.uri}"]\nmdns = false\nonce = true\n'
        f'json = true\nwait = 20\nstate-dir = "{tmp_path / "monitor"}"\n'
    )
    out = p2pfl("monitor", "--config", str(cfg), "--network", net)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["network"] == net
    assert snap["monitor"]["brokers"] == [mosquitto.uri]
    assert [n["id"] for n in snap["nodes"]] == ["p"]
    assert (tmp_path / "monitor").is_dir()

    cfg.write_text('network = "lab"\nwiat = 3\n')
    bad = p2pfl("monitor", "--config", str(cfg))
    assert bad.returncode == 2
    assert bad.stderr == "config error: wiat: unknown key (got 3)\n"
