"""Runs: the run a node chooses, its record (run.json, the config hash), the state dir's
layout per run, the presence field that announces it, and `p2pfl runs list|show|compare`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.config import ConfigError, NodeConfig, load_config
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.inbox import reason_label
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import PROTOCOL_VERSION, Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import is_run_id
from p2pfl.run_identity import RunIdentity
from p2pfl.runs import (
    config_hash,
    default_run_name,
    learning_config,
    preferred,
    read_record,
    run_dirs,
)
from p2pfl.store import StateDir
from p2pfl.transport.base import Message
from p2pfl.transport.memory import MemoryBus, MemoryTransport

NET = "runs"
BROKER = "mqtt://10.77.0.2:1883"


def identity(state: StateDir | None, heard: list[str] | None = None, **cfg: object) -> RunIdentity:
    """A node's run; ``heard``: the runs its peers announce (as the test changes them)."""
    config = NodeConfig(network=NET, model="logreg", **cfg)  # type: ignore[arg-type]
    peers: list[str] = [] if heard is None else heard
    return RunIdentity(
        config, state, lambda: peers, node_id="me",
        default_name=lambda net: f"{net}-20261202T051200Z",
    )  # fmt: skip


# ---- the configuration and its hash -----------------------------------------------------------


def test_the_config_hash_is_sha256_of_the_canonical_json_and_tells_configs_apart() -> None:
    a = learning_config(NodeConfig(network=NET, lr=0.05, id="n1", num_partitions=2))
    b = learning_config(
        NodeConfig(network=NET, lr=0.05, id="n2", num_partitions=2, partition_index=1)
    )
    assert a == b, "per-node values (id, partition index) are not the run's configuration"
    canonical = json.dumps(a, sort_keys=True, separators=(",", ":"))
    assert config_hash(a) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash(dict(reversed(list(a.items())))) == config_hash(a)
    other = learning_config(NodeConfig(network=NET, lr=0.01, num_partitions=2))
    assert config_hash(other) != config_hash(a)
    for key in (
        "model",
        "dataset",
        "partition",
        "merge",
        "lr",
        "local_epochs",
        "batch_size",
        "schedule",
        "mode",
        "rounds",
        "seed",
        "dp_epsilon",
        "secure_aggregation",
    ):
        assert key in a, key  # fmt: skip


def test_a_run_name_that_cannot_name_a_directory_is_a_config_error(tmp_path: Path) -> None:
    for bad in ("../up", "a/b", "trial 1", ".hidden", "x" * 65):
        with pytest.raises(ConfigError, match="run_name"):
            load_config(None, {"run_name": bad})
    assert load_config(None, {"run_name": "trial-1.b+2"}).run_name == "trial-1.b+2"


# ---- which run a node takes ----------------------------------------------------------------------


def test_the_default_name_is_the_network_and_a_utc_timestamp() -> None:
    now = datetime(2026, 12, 2, 5, 12, 0, tzinfo=UTC)
    assert default_run_name("e2e", now) == "e2e-20261202T051200Z"
    assert default_run_name("lab/α net", now) == "lab---net-20261202T051200Z"


runs = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
autos = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2090, 1, 1)).map(
    lambda d: default_run_name("net", d.replace(tzinfo=UTC))
)


@given(st.lists(st.one_of(runs, autos), min_size=1, max_size=8), st.randoms())
def test_every_node_hearing_the_same_runs_prefers_the_same_one(names: list[str], rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(names)
    rnd.shuffle(shuffled)
    chosen = preferred(names)
    assert preferred(shuffled) == chosen and chosen in names
    named = [n for n in names if n not in {a for a in names if a.startswith("net-2")}]
    if named:  # a run named with --run-name wins over default-named ones
        assert chosen == min(named)
    else:  # the earliest started default-named run
        assert chosen == min(names)


def test_without_a_run_name_a_node_adopts_its_peers_run_until_it_writes(tmp_path: Path) -> None:
    heard: list[str] = []
    with StateDir(tmp_path) as state:
        run = identity(state, heard)
        run.begin()
        assert run.id == f"{NET}-20261202T051200Z" and state.run is None  # nothing written
        heard += ["runs-20261202T050000Z", "runs-20261202T060000Z"]  # the first started earlier
        heard.append("../../etc")  # not a run id: ignored
        assert run.id == "runs-20261202T050000Z"
        meta = run.checkpoint_meta()  # the first write settles the run
        assert meta["run"] == "runs-20261202T050000Z" == state.run
        heard.append("runs-20261202T000000Z")
        assert run.id == "runs-20261202T050000Z", "a node that wrote keeps its run"
        record = read_record(state.run_path)
    assert record is not None and record.status == "running" and record.node == "me"
    assert record.config_hash == meta["config_hash"] == config_hash(record.config)
    assert record.pid == os.getpid() and record.started.endswith("Z")


def test_runs_keep_their_metrics_and_checkpoints_apart(tmp_path: Path) -> None:
    weights = {"w": np.ones(3, np.float32)}
    for name, lr in (("first", 0.1), ("second", 0.01)):
        with StateDir(tmp_path) as state:
            run = identity(state, run_name=name, lr=lr)
            run.begin()
            state.save_checkpoint(1, weights, run.checkpoint_meta())
            state.append_metrics({"round": 1, "accuracy": 0.5})
            run.finish("finished")
    for name in ("first", "second"):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["run"] for line in lines] == [name]
        assert [p.name for p in (tmp_path / "runs" / name / "checkpoints").iterdir()] == [
            "ckpt-000001.npz"
        ]
        record = read_record(tmp_path / "runs" / name)
        assert record is not None and record.status == "finished" and record.ended
    assert not (tmp_path / "metrics.jsonl").exists()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_restart_without_a_run_name_resumes_the_unfinished_run(tmp_path: Path) -> None:
    with StateDir(tmp_path) as state:
        done = identity(state, run_name="done")
        done.begin()
        done.finish("finished")
    with StateDir(tmp_path) as state:
        killed = identity(state, run_name="killed")
        killed.begin()  # and never finished: killed, or stopped before its rounds were done
    with StateDir(tmp_path) as state:
        again = identity(state)
        again.begin()
        assert again.id == "killed" == state.run


def test_an_old_flat_state_dir_is_moved_into_a_run_once_and_resumed(tmp_path: Path) -> None:
    weights = {"w": np.arange(3, dtype=np.float32)}
    with StateDir(tmp_path) as state:  # as an older version wrote it
        state.save_checkpoint(4, weights, {"run_name": "trial-7"})
        state.append_metrics({"round": 4, "accuracy": 0.25})
    assert list(run_dirs(tmp_path)) == ["trial-7"]  # read as a run before it is moved
    with StateDir(tmp_path) as state:
        run = identity(state)
        run.begin()
        assert run.id == "trial-7" == state.run
        ckpt = state.latest_checkpoint()
        assert ckpt is not None and ckpt.round == 4
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "trial-7" / "metrics.jsonl").is_file()


# ---- the presence field ------------------------------------------------------------------------


def envelope(body: dict[str, object]) -> Envelope:
    return Envelope(v=PROTOCOL_VERSION, kind="presence", net=NET, src="p1", seq=1,
                    ts=time.time(), body=body)  # fmt: skip


def test_presence_carries_the_run_and_an_absent_field_is_an_unknown_run() -> None:
    raw = encode_presence(NET, "p1", 1, online=True, role="trainer", broker=BROKER, run="r-1")
    assert parse_presence(unpack_envelope(raw)).run == "r-1"
    old = encode_presence(NET, "p1", 1, online=True, role="trainer", broker=BROKER)
    assert parse_presence(unpack_envelope(old)).run is None


@given(st.one_of(st.text(max_size=80), st.integers(), st.binary(max_size=8), st.none()))
def test_presence_takes_a_run_id_or_refuses_the_record(run: object) -> None:
    env = envelope({"state": "online", "role": "trainer", "broker": BROKER, "run": run})
    try:
        parsed = parse_presence(env).run
    except ProtocolError as exc:
        assert reason_label(exc.reason) == "presence"
        assert not is_run_id(run)
    else:
        assert parsed == run and (run is None or is_run_id(run))
        if run is not None:  # what a directory name may hold
            assert "/" not in parsed and not parsed.startswith(".") and len(parsed) <= 64


HOSTILE = ["", "../../etc", "a/b", "x" * 65, "ré", 7, b"run", ["r"], {"r": 1}, None]


@pytest.mark.parametrize("run", HOSTILE[:-1])
def test_a_hostile_run_in_presence_is_refused(run: object) -> None:
    env = envelope({"state": "online", "role": "trainer", "broker": BROKER, "run": run})
    with pytest.raises(ProtocolError, match="presence run"):
        parse_presence(env)


async def test_a_hostile_run_is_counted_and_dropped_and_the_node_goes_on() -> None:
    config = NodeConfig(network=NET, id="me")
    view = PeerView("me", ttl=15.0)
    rejected: Counter[str] = Counter()
    membership = Membership(
        config, MemoryTransport(MemoryBus(), "me"), view, node_id="me", home_broker=BROKER,
        next_seq=lambda: 1, current_round=lambda: 0, clock=lambda: 0.0,
        reject=lambda src, reason: rejected.update([reason_label(reason)]),
        advertised=[BROKER], own_broker=None,
    )  # fmt: skip
    peer = "mqtt://10.77.0.3:1883"
    for i, run in enumerate(HOSTILE[1:5]):
        body = {"state": "online", "role": "trainer", "broker": peer, "run": run}
        payload = bytes(pack_envelope(dataclasses.replace(envelope(body), seq=i + 1)))
        await membership.on_message(Message(topics.presence(NET, "p1"), payload, True))
    assert rejected == Counter({"presence": 4}) and "p1" not in view
    good = encode_presence(NET, "p2", 9, online=True, role="trainer", broker=peer, run="r-2")
    await membership.on_message(Message(topics.presence(NET, "p2"), good, True))
    assert "p2" in view and membership.heard_runs() == ["r-2"]


# ---- p2pfl runs ----------------------------------------------------------------------------------


def node_run(state_dir: Path, node: str, run: str, accs: list[float], status: str,
             **cfg: object) -> None:  # fmt: skip
    """A node's state dir holding `run`, its metrics and checkpoints as a node writes them."""
    with StateDir(state_dir) as state:
        state.node_id(node)
        config = NodeConfig(network=NET, run_name=run, **cfg)  # type: ignore[arg-type]
        rid = RunIdentity(config, state, list, node_id=node)
        rid.begin()
        for r, acc in enumerate(accs, 1):
            state.save_checkpoint(r, {"w": np.full(2, acc, np.float32)}, rid.checkpoint_meta())
            state.append_metrics({"round": r, "accuracy": acc})
        if status != "killed":
            rid.finish(status)  # type: ignore[arg-type]


def runs_cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["runs", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / "n1", tmp_path / "n2"]
    for i, d in enumerate(dirs):
        node_run(d, f"n{i + 1}", "alpha", [0.5, 0.6 + 0.1 * i], "finished", lr=0.1, tags=("k=v",))
        node_run(d, f"n{i + 1}", "beta", [0.4], "finished" if i else "killed", lr=0.01)
    return dirs


def state_args(dirs: list[Path]) -> list[str | Path]:
    return [a for d in dirs for a in ("--state-dir", d)]


def test_list_shows_each_run_once_with_its_status_nodes_and_final_accuracy(
    two_runs: list[Path],
) -> None:
    code, out, err = runs_cli("list", *state_args(two_runs), "--json")
    assert code == 0, err
    rows = {r["run"]: r for r in json.loads(out)}
    assert set(rows) == {"alpha", "beta"}
    alpha, beta = rows["alpha"], rows["beta"]
    assert alpha["status"] == "finished" and alpha["nodes"] == ["n1", "n2"]
    assert alpha["rounds"] == 2 and alpha["final_accuracy"] == pytest.approx((0.6 + 0.7) / 2)
    assert alpha["tags"] == ["k=v"] and alpha["ended"]
    # n1 was killed in beta: no process holds its state dir, so the run was interrupted
    assert beta["status"] == "interrupted" and beta["ended"] is None
    code, table, _ = runs_cli("list", *state_args(two_runs))
    assert code == 0 and "alpha" in table and "finished" in table and "0.6500" in table


def test_show_gives_the_record_config_and_accuracy_per_round(two_runs: list[Path]) -> None:
    code, out, err = runs_cli("show", "alpha", *state_args(two_runs), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["config"]["lr"] == 0.1 and len(shown["config_hash"]) == 64
    assert shown["accuracy"] == {"1": 0.5, "2": pytest.approx(0.65)}
    code, text, _ = runs_cli("show", "alpha", *state_args(two_runs))
    assert code == 0 and "lr" in text and "0.6500" in text


def test_compare_shows_the_config_difference_and_both_curves(
    two_runs: list[Path], tmp_path: Path
) -> None:
    plot = tmp_path / "cmp.png"
    code, out, err = runs_cli(
        "compare", "alpha", "beta", *state_args(two_runs), "--json", "--plot", plot
    )
    assert code == 0, err
    compared = json.loads(out)
    assert compared["config"] == {"lr": {"alpha": 0.1, "beta": 0.01}}
    assert compared["accuracy"]["beta"] == {"1": 0.4}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, text, _ = runs_cli("compare", "alpha", "beta", *state_args(two_runs))
    assert code == 0 and "lr" in text and "0.01" in text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["show", "gamma"], "no run 'gamma'"),
        (["compare", "alpha", "gamma"], "no run 'gamma'"),
        (["list", "--state-dir", "{empty}"], "no runs in"),
        (["list", "--state-dir", "{missing}"], "no state dir at"),
        (["list"], "give --state-dir"),
    ],
)
def test_an_unknown_run_or_nothing_to_read_is_one_line_and_exit_2(
    two_runs: list[Path], tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "empty").mkdir()
    where = {"empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    args = [a.format(**where) for a in args]
    extra = [] if "--state-dir" in args or args == ["list"] else state_args(two_runs)
    code, _out, err = runs_cli(*args, *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert says in err, err


def test_runs_a_monitor_saw_are_read_from_its_export(tmp_path: Path) -> None:
    export = tmp_path / "monitor.jsonl"
    snaps = [
        {"time": 1796188000.0 + t, "nodes": [
            {"id": "a", "run": "gamma", "round": t, "accuracy": 0.1 * t, "offline": False},
            {"id": "b", "run": "gamma", "round": t, "accuracy": 0.1 * t + 0.1, "offline": t == 3},
        ]}
        for t in (1, 2, 3)
    ]  # fmt: skip
    export.write_text("".join(json.dumps(s) + "\n" for s in snaps) + "{torn")
    code, out, err = runs_cli("list", "--export", export, "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["run"] == "gamma" and row["nodes"] == ["a", "b"] and row["rounds"] == 3
    assert row["status"] == "running"  # node a was live in the last snapshot
    assert row["final_accuracy"] == pytest.approx(0.35)


def test_a_monitor_export_carries_each_runs_config_and_tags_from_telemetry(
    tmp_path: Path,
) -> None:
    from p2pfl.monitor.state import NetworkState
    from p2pfl.status import NodeStatus

    configs = {
        run: learning_config(NodeConfig.model_validate({"network": "lab", "lr": lr}))
        for run, lr in (("alpha", 0.05), ("beta", 0.01))
    }
    state = NetworkState("lab")
    for node, run in (("a", "alpha"), ("b", "alpha"), ("c", "beta")):
        status = NodeStatus(
            id=node, run=run, tags=("team=vision",), round=2, accuracy=0.5,
            config=configs[run], config_hash=config_hash(configs[run]),
        )  # fmt: skip
        assert state.on_telemetry(node, status.wire(), sent_at=time.time())
    snap = state.snapshot()
    assert len(snap["configs"]) == 2  # one per configuration, not one per node
    export = tmp_path / "monitor.jsonl"
    export.write_text(json.dumps(snap) + "\n")
    code, out, err = runs_cli("list", "--export", export, "--json")
    assert code == 0, err
    rows = {row["run"]: row for row in json.loads(out)}
    assert rows["alpha"]["nodes"] == ["a", "b"] and rows["alpha"]["tags"] == ["team=vision"]
    assert rows["alpha"]["config_hash"] == config_hash(configs["alpha"])
    assert rows["beta"]["config"]["lr"] == 0.01
    code, out, err = runs_cli("compare", "alpha", "beta", "--export", export)
    assert code == 0 and "lr" in out and "0.05" in out and "0.01" in out, out + err
