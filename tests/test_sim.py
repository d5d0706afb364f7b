"""The simulator end to end: `p2pfl sim` on small scenarios, determinism, faults."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.faults import BEHAVIOURS
from p2pfl.simulation.scenario import load_scenario

pytestmark = pytest.mark.timeout(300)

TINY = """
name = "tiny"
compare = ["ring", "random-walk", "partial-mesh"]
nodes = 4

[node]
rounds = 3
mode = "sync"
model = "logreg"
local_epochs = 1
degree = 2
seed = 0

[network]
latency_ms = 2.0
jitter_ms = 1.0
"""


def write(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sim_cli_prints_summary_json_and_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, TINY)), "--json",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["schedules"]) == {"ring", "random-walk", "partial-mesh"}
    for name, row in summary["schedules"].items():
        assert row["nodes"] == 4 and row["rounds"] == 3, name
        assert 0.0 < row["final_mean_accuracy"] <= 1.0
        assert row["messages_sent"] >= 4 * 3 - 4  # every node sent nearly every round
        assert row["wall_seconds"] > 0 and row["compute_seconds"] > 0
    assert (
        json.loads((out / "summary.json").read_text())["schedules"].keys()
        == summary["schedules"].keys()
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 4 * 3
    for png in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "spread.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sim_table_is_shown_without_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, TINY)), "--schedule", "ring",
         "--out", str(tmp_path / "o"), "--no-plots"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "p2pfl sim" in result.stdout and "ring" in result.stdout
    assert "random-walk" not in result.stdout


def test_many_nodes_with_full_views_on_the_node_engine_get_a_note(tmp_path: Path) -> None:
    """From 128 nodes the node engine with full views says what presence costs and how to
    bound it; the run itself goes on (stdout keeps only the summary)."""
    text = TINY.replace("nodes = 4", 'nodes = 128\nengine = "node"').replace(
        "rounds = 3", "rounds = 1"
    )
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, text)), "--schedule", "ring",
         "--json", "--no-plots", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    note = " ".join(result.stderr.split())  # rich wraps it
    assert "128 nodes on the node engine with full views" in note
    assert "16,256 records a heartbeat" in note and "view_size = 32 under [node]" in note
    assert json.loads(result.stdout)["schedules"]["ring"]["nodes"] == 128


@pytest.mark.parametrize(
    "overrides",
    [{"nodes": 127, "engine": "node"}, {"nodes": 128, "engine": "batched"}, {"nodes": 16}],
)
def test_no_full_view_note_below_128_nodes_or_on_the_batched_engine(
    overrides: dict[str, Any],
) -> None:
    from p2pfl.simulation.cli import full_view_note, prepare

    assert full_view_note(prepare(None, overrides)[0]) is None


def test_no_full_view_note_with_a_sampled_view(tmp_path: Path) -> None:
    from p2pfl.simulation.cli import full_view_note, prepare

    text = TINY.replace("nodes = 4", "nodes = 200").replace('"random-walk", ', "")
    full = prepare(write(tmp_path, text), {"engine": "node"})[0]
    assert full_view_note(full) is not None
    sampled = write(tmp_path, text.replace("degree = 2", "degree = 2\nview_size = 32"), "v.toml")
    assert full_view_note(prepare(sampled, {"engine": "node"})[0]) is None


def test_bad_scenario_value_is_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = write(tmp_path, TINY.replace("degree = 2", "degree = 0"), "bad.toml")
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "degree" in result.stderr and result.stderr.count("\n") == 1


def test_model_dataset_and_partition_flags_reach_every_node(tmp_path: Path) -> None:
    """`p2pfl sim --model/--dataset/--partition` replace the scenario's [node] keys."""
    scenario = write(tmp_path, TINY)

    def bytes_per_model(*flags: str) -> float:
        result = subprocess.run(
            [sys.executable, "-m", "p2pfl", "sim", str(scenario), "--schedule", "ring",
             "--rounds", "1", "--json", "--no-plots", "--out", str(tmp_path / "o"), *flags],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        row = json.loads(result.stdout)["schedules"]["ring"]
        return row["bytes_sent"] / row["messages_sent"]

    logreg = bytes_per_model()
    mlp = bytes_per_model("--model", "mlp", "--dataset", "mnist1d:600", "--partition", "iid")
    assert mlp > 10 * logreg  # the mlp's weights, not the scenario's logistic regression
    bad = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(scenario), "--model", "nosuch"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "model 'nosuch'" in bad.stderr and "Traceback" not in bad.stderr


def _accuracies(tmp_path: Path, text: str) -> dict[tuple[str, str, int], float]:
    scenario = load_scenario(write(tmp_path, text), {})
    runs = asyncio.run(Simulation(scenario).run())
    return {
        (r["schedule"], r["node"], r["round"]): r["accuracy"] for run in runs for r in run.records
    }


def test_sync_runs_with_the_same_seed_are_identical(tmp_path: Path) -> None:
    first = _accuracies(tmp_path, TINY)
    second = _accuracies(tmp_path, TINY)
    assert first == second
    assert len(first) == 3 * 4 * 3
    other_seed = _accuracies(tmp_path, TINY.replace("seed = 0", "seed = 1"))
    assert other_seed != first


def test_a_crashed_node_restarts_from_its_checkpoint(tmp_path: Path) -> None:
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    # A neighbour of the crashed node waits out a round timeout for its model: 8 s, not 30.
    text = text.replace("rounds = 3", "rounds = 8")
    text = text.replace("seed = 0", "seed = 0\nround_timeout = 8")
    text += '\n[[faults.crashes]]\nnode = "n02"\nat_round = 3\nrestart_after_rounds = 2\n'
    scenario = load_scenario(write(tmp_path, text), {})
    (run,) = asyncio.run(Simulation(scenario).run())
    mine = [(r["restarts"], r["round"]) for r in run.records if r["node"] == "n02"]
    before = [rnd for restarts, rnd in mine if restarts == 0]
    after = [rnd for restarts, rnd in mine if restarts == 1]
    # It ran up to its crash, came back from its checkpoint (not round 1), and finished. How far
    # it jumps ahead on coming back depends on how far the others got meanwhile: timing.
    assert before == [1, 2, 3]
    assert after and after[0] >= 4 and after == sorted(set(after))
    assert after[-1] == 8 and len(mine) == len(before) + len(after)
    # Traffic counters stay cumulative across the restart, so the summary's totals stay true.
    sent = [r["models_sent"] for r in run.records if r["node"] == "n02"]
    assert sent == sorted(sent) and sent[-1] > sent[len(before) - 1]
    others = {r["node"] for r in run.records if r["round"] == 8}
    assert others == {"n01", "n02", "n03", "n04"}


@pytest.mark.parametrize("trust", ["allowlist", "tofu"])
def test_under_an_allowlist_simulated_nodes_trust_each_other(tmp_path: Path, trust: str) -> None:
    """`trust = "allowlist"` in a scenario: the run's own nodes are its allowlist (they are the
    user's), so they merge each other's models as under tofu, and nobody else's key is taken."""
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    text = text.replace("seed = 0", f'seed = 0\ntrust = "{trust}"\nround_timeout = 8')
    scenario = load_scenario(write(tmp_path, text), {})
    (run,) = asyncio.run(Simulation(scenario).run())
    assert len(run.records) == 4 * 3
    assert all(r["merged"] == 1 for r in run.records), [r["merged"] for r in run.records]
    assert all(r["rejected"] == 0 for r in run.records)


def test_byzantine_nodes_are_marked_and_excluded(tmp_path: Path) -> None:
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    text += '\n[faults.byzantine]\ncount = 1\nbehaviour = "sign-flip"\n'
    scenario = load_scenario(write(tmp_path, text), {})
    (run,) = asyncio.run(Simulation(scenario).run())
    dishonest = {r["node"] for r in run.records if not r["honest"]}
    assert len(dishonest) == 1


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_every_byzantine_behaviour_runs_and_repeats_exactly(tmp_path: Path, behaviour: str) -> None:
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    text = text.replace("rounds = 3", "rounds = 2")
    text += f'\n[faults.byzantine]\ncount = 1\nbehaviour = "{behaviour}"\n'
    first = _accuracies(tmp_path, text)
    assert len(first) == 4 * 2
    # sync mode, same seed: even attackers reading the honest models give the same run
    assert _accuracies(tmp_path, text) == first


def test_label_flip_nodes_train_on_flipped_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.simulation import engine

    seen: dict[int, np.ndarray] = {}
    build = engine.learner_from_config

    def spy(config, dataset, indices, **kw):  # type: ignore[no-untyped-def]
        seen[config.partition_index] = dataset.y_train
        return build(config, dataset, indices, **kw)

    monkeypatch.setattr(engine, "learner_from_config", spy)
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    text = text.replace("rounds = 3", "rounds = 1")
    text += '\n[faults.byzantine]\ncount = 1\nbehaviour = "label-flip"\n'
    scenario = load_scenario(write(tmp_path, text), {})
    (run,) = asyncio.run(Simulation(scenario).run())
    (bad,) = {r["node"] for r in run.records if not r["honest"]}
    index = scenario.node_ids.index(bad)
    truth = seen[(index + 1) % 4]
    np.testing.assert_array_equal(seen[index], 9 - truth)
    assert all(np.array_equal(y, truth) for i, y in seen.items() if i != index)


MATRIX = """
name = "tiny-bench"
nodes = 4
compare = ["ring"]
attacks = ["sign-flip", "alie"]
compare_merges = ["average", "median"]

[node]
mode = "sync"
rounds = 2
model = "logreg"
local_epochs = 1
seed = 0

[faults.byzantine]
count = 1
"""


def test_matrix_prints_every_cell_next_to_the_clean_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, MATRIX)), "--matrix",
         "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["scenario"] == "tiny-bench"
    cells = {(r["attack"], r["merge"], r["schedule"]): r for r in data["rows"]}
    expected = {(a, m, "ring") for a in ("clean", "sign-flip", "alie")
                for m in ("average", "median")}  # fmt: skip
    assert set(cells) == expected and len(data["rows"]) == 6
    for (attack, merge, _), row in cells.items():
        assert 0.0 < row["honest_accuracy"] <= 1.0
        clean = cells[("clean", merge, "ring")]["honest_accuracy"]
        assert row["vs_clean"] == pytest.approx(row["honest_accuracy"] - clean, abs=1e-6)
        if attack == "clean":
            assert row["vs_clean"] == 0.0
    assert json.loads((out / "matrix.json").read_text()) == data
    assert (out / "matrix.csv").read_text().count("\n") == 7
    assert "| ring | average |" in (out / "matrix.md").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 4 * 2  # every cell, node and round
    for attack, merge, _ in expected:
        mine = [r for r in records if (r["attack"], r["merge"]) == (attack, merge)]
        assert sum(not r["honest"] for r in mine) == (0 if attack == "clean" else 2)


def _bench_json(tmp_path: Path, text: str, *flags: str) -> dict[str, dict[str, Any]]:
    """`p2pfl sim --json` of a bench: its rows by "attack merge schedule", and "seeds"."""
    out = tmp_path / "-".join(flags)
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, text)), "--json",
         "--out", str(out), *flags],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {f"{r['attack']} {r['merge']} {r['schedule']}": r for r in data["rows"]}
    return {"seeds": {"seeds": data.get("seeds")}, **rows}


def test_a_bench_over_two_seeds_shows_the_mean_of_the_single_seed_runs(tmp_path: Path) -> None:
    text = MATRIX.replace('attacks = ["sign-flip", "alie"]', 'attacks = ["sign-flip"]')
    text = text.replace('["average", "median"]', '["average"]')
    both = _bench_json(tmp_path, text, "--seeds", "0,1")
    alone = [_bench_json(tmp_path, text, "--seed", str(s)) for s in (0, 1)]
    assert both.pop("seeds") == {"seeds": [0, 1]} and alone[0].pop("seeds") == {"seeds": None}
    cells = ["clean average ring", "sign-flip average ring"]
    assert set(both) == set(cells)
    # the seed changes the data split, the models and the Byzantine node: different runs
    assert any(alone[0][c]["honest_accuracy"] != alone[1][c]["honest_accuracy"] for c in cells)
    for cell in cells:
        each = [run[cell]["honest_accuracy"] for run in alone]
        assert both[cell]["per_seed"] == {"0": each[0], "1": each[1]}
        assert both[cell]["honest_accuracy"] == pytest.approx(sum(each) / 2, abs=1e-6)
    clean = both["clean average ring"]["honest_accuracy"]
    attacked = both["sign-flip average ring"]
    assert attacked["vs_clean"] == pytest.approx(attacked["honest_accuracy"] - clean, abs=1e-6)


def test_seed_and_seeds_together_are_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, MATRIX)), "--seed", "1",
         "--seeds", "0,1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--seed or --seeds" in result.stderr


def test_matrix_table_in_text_mode(tmp_path: Path) -> None:
    text = MATRIX.replace('attacks = ["sign-flip", "alie"]', 'attacks = ["ipm"]')
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, text)), "--merge", "average",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mean honest accuracy" in result.stdout
    assert "clean" in result.stdout and "ipm" in result.stdout and "median" not in result.stdout


def test_same_scenario_on_a_real_broker_over_two_processes(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    text = TINY.replace('compare = ["ring", "random-walk", "partial-mesh"]', 'compare = ["ring"]')
    path = write(tmp_path, text)
    memory = _accuracies(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--json", "--no-plots",
         "--out", str(tmp_path / "o"), "--broker", mosquitto.uri, "--processes", "2"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [
        json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    ]
    over_broker = {(r["schedule"], r["node"], r["round"]): r["accuracy"] for r in records}
    # sync mode, same seed: the real broker and two processes change nothing
    assert over_broker == memory


def test_processes_without_a_broker_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(write(tmp_path, TINY)), "--processes", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "--broker" in result.stderr
