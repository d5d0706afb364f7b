"""`p2pfl sim --broker URI --shard I/P`: one simulation over several machines (here: several
commands on one machine) sharing a real Mosquitto; shard 0 gathers one summary."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.simulation.engine import ScheduleRun, Simulation
from p2pfl.simulation.report import summarize
from p2pfl.simulation.scenario import load_scenario
from p2pfl.simulation.shard import parse_shard, run_id
from p2pfl.simulation.shard_board import ResultBoard, Shard, ShardError
from p2pfl.transport.base import LocalBroker
from p2pfl.transport.mqtt import MqttTransport
from tests.helpers import small_scenario

pytestmark = pytest.mark.timeout(240)

TINY = small_scenario("tiny", 4)


def _sim(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pfl", "sim", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@given(st.integers(1, 64), st.data())
def test_the_shards_cover_every_node_once(nodes: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(1, nodes))
    shards = [parse_shard(f"{i}/{count}", nodes) for i in range(count)]
    covered = sorted(i for shard in shards for i in shard.indices(nodes))
    assert covered == list(range(nodes))
    assert all(shard.indices(nodes) for shard in shards)  # P <= nodes: nobody idle


@pytest.mark.parametrize("text", ["2/2", "0/0", "1", "a/2", "-1/2", "0/5", "1/2/3"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text, 4)


def test_the_run_id_follows_scenario_flags_and_shard_count(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    base = load_scenario(path, {})
    assert run_id(base, 2) == run_id(load_scenario(path, {}), 2)
    assert run_id(base, 2) != run_id(base, 3)
    assert run_id(base, 2) != run_id(load_scenario(path, {"seed": 1}), 2)
    assert run_id(base, 2) != run_id(load_scenario(path, {"rounds": 3}), 2)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--shard", "0/2"], "config error: --shard needs --broker"),
        (["--shard", "2/2", "--broker", "mqtt://127.0.0.1:1"], "config error: --shard 2/2"),
        (["--shard", "0/5", "--broker", "mqtt://127.0.0.1:1"], "config error: --shard 0/5"),
        (["--shard", "x", "--broker", "mqtt://127.0.0.1:1"], "config error: --shard x"),
    ],
)
def test_bad_shard_flags_are_one_line_and_status_2(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    result = CliRunner().invoke(app, ["sim", str(tmp_path / "tiny.toml"), *flags])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(said) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p2pfl-sim").exists()  # refused before anything ran


IDS = [f"n{i:05d}" for i in range(80_000)]


async def _board(broker: LocalBroker, run: str, shard: Shard, name: str) -> ResultBoard:
    board = ResultBoard(MqttTransport(broker.uri, name), "default", run, shard, IDS)
    await board.open()
    return board


def test_results_travel_in_parts_and_hostile_ones_are_dropped(mosquitto: LocalBroker) -> None:
    async def scenario() -> None:
        lead = await _board(mosquitto, "run1", Shard(0, 2), "lead")
        other = await _board(mosquitto, "run1", Shard(1, 2), "other")
        async with asyncio.TaskGroup() as tg:
            readers = [tg.create_task(lead.read()), tg.create_task(other.read())]
            await lead.greeted()
            await other.greeted()
            base = "p2pfl/v1/default/sim/run1/ring"
            # hostile or foreign: not msgpack, a wrong run, a part that lies about its topic
            await other.transport.publish(f"{base}/1/0", b"\xc1garbage", retain=True)
            fake = {"run": "run0", "schedule": "ring", "shard": 1, "part": 0, "parts": 1,
                    "sha256": "00", "data": b""}  # fmt: skip
            await other.transport.publish(f"{base}/1/0", msgpack.packb(fake))
            fake["run"] = "run1"
            await other.transport.publish(f"{base}/1/7", msgpack.packb(fake))
            # large enough, and random enough, to need several parts after zlib
            records = [{"schedule": "ring", "node": IDS[i], "round": 1, "honest": True,
                        "accuracy": (i * 7919 % 10007) / 10007}
                       for i in range(1, len(IDS), 2)]  # fmt: skip
            await other.publish(ScheduleRun("ring", records, 1.5, {"loss": 2}))
            # a shard's results hold its own nodes only, and nothing but scalars
            theirs_not = {"schedule": "partial-mesh", "node": IDS[0], "round": 1}
            await other.publish(ScheduleRun("partial-mesh", [theirs_not], 1.0, {}))
            nested = {"schedule": "random-walk", "node": IDS[1], "round": 1, "x": [1]}
            await other.publish(ScheduleRun("random-walk", [nested], 1.0, {}))
            await lead.publish(ScheduleRun("ring", [], 1.0, {}))
            ours, theirs = await lead.gather("ring", 30)
            assert (ours.records, theirs.records) == ([], records)
            assert (theirs.wall_seconds, theirs.dropped) == (1.5, {"loss": 2})
            assert lead.dropped == {"malformed results": 4, "results of another run": 1}
            assert set(lead.results) == {("ring", 0), ("ring", 1)}
            assert len([t for t in lead._seen if t.startswith(f"{base}/1/")]) > 1  # parts
            await other.close(clear=False)
            await lead.close(clear=True)
            for reader in readers:
                reader.cancel()
        # cleared: a later board of the same run finds nothing retained
        late = await _board(mosquitto, "run1", Shard(0, 2), "late")
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(late.read())
            await late.greeted()
            assert late.results == {} and late._seen == set()
            await late.close(clear=True)
            reader.cancel()

    asyncio.run(scenario())


def test_a_shard_of_another_run_is_refused(mosquitto: LocalBroker) -> None:
    async def scenario() -> None:
        first = await _board(mosquitto, "run1", Shard(0, 2), "first")
        second = await _board(mosquitto, "run2", Shard(1, 2), "second")
        async with asyncio.TaskGroup() as tg:
            readers = [tg.create_task(first.read()), tg.create_task(second.read())]
            await first.greeted()
            with pytest.raises(ShardError, match="another run"):
                await second.greeted()
            with pytest.raises(ShardError, match=r"shard\(s\) 0/2, 1/2 .*another run.*: 1 "):
                await first.gather("ring", 0.5)
            await second.close(clear=False)
            await first.close(clear=True)
            for reader in readers:
                reader.cancel()

    asyncio.run(scenario())


def test_two_shards_make_one_summary_like_an_unsharded_run(
    tmp_path: Path, mosquitto: LocalBroker
) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    common = [str(path), "--no-plots", "--broker", mosquitto.uri]
    lead = _sim(*common, "--json", "--out", str(tmp_path / "s0"), "--shard", "0/2")
    other = _sim(*common, "--out", str(tmp_path / "s1"), "--shard", "1/2")
    lead_out, lead_err = lead.communicate(timeout=180)
    other_out, other_err = other.communicate(timeout=60)
    assert lead.returncode == 0, lead_err
    assert other.returncode == 0, other_err
    assert "shard 1/2: 2 nodes done; shard 0 writes the summary" in other_out
    assert not (tmp_path / "s1" / "summary.json").exists()

    sharded = json.loads(lead_out)
    assert json.loads((tmp_path / "s0" / "summary.json").read_text()) == sharded
    runs = asyncio.run(Simulation(load_scenario(path, {})).run())  # in memory, in one piece
    whole = summarize(
        [r for run in runs for r in run.records],
        wall_seconds={run.schedule: run.wall_seconds for run in runs},
    )
    assert sharded["schedules"].keys() == whole["schedules"].keys() == {"ring", "partial-mesh"}
    for name, row in sharded["schedules"].items():
        assert row["nodes"] == whole["schedules"][name]["nodes"] == 4
        assert row["rounds"] == whole["schedules"][name]["rounds"] == 2
        # sync mode, same seed: the same accuracies, however the nodes are spread
        assert row["final_mean_accuracy"] == whole["schedules"][name]["final_mean_accuracy"]
    records = [json.loads(x) for x in (tmp_path / "s0" / "metrics.jsonl").read_text().split()]
    assert len(records) == 2 * 4 * 2  # every node's every round, shard 1's included


def test_sim_help_shows_shard_and_a_two_machine_example() -> None:
    result = CliRunner().invoke(app, ["sim", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--shard" in result.output and "--processes 2 --shard 0/2" in result.output
