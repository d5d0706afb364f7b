"""Differential privacy end to end: the --dp-* flags of `p2pfl run` and `p2pfl sim`, the
epsilon in round lines and simulator records, the budget kept across a crash, bad settings."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from p2pfl.simulation.engine import Simulation
from p2pfl.simulation.scenario import load_scenario
from tests.nodeproc import stop_all
from tests.test_e2e_run import FAST, finish, start_cluster

pytestmark = pytest.mark.timeout(240)

TINY = """
name = "tiny-dp"
nodes = 4
compare = ["partial-mesh"]

[node]
mode = "sync"
rounds = 3
model = "logreg"
local_epochs = 1
degree = 2
seed = 0
"""


def p2pfl(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args],
        capture_output=True, text=True, timeout=200, cwd=cwd, env=env,
    )  # fmt: skip


def test_sim_with_dp_flags_reports_epsilon_within_the_budget(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "out"
    with ThreadPoolExecutor(2) as pool:  # the same scenario with and without DP, side by side
        private = pool.submit(
            p2pfl, "sim", str(tmp_path / "tiny.toml"), "--dp-epsilon", "3", "--dp-delta", "1e-5",
            "--dp-max-grad-norm", "1", "--json", "--no-plots", "--out", str(out),
        )  # fmt: skip
        public = pool.submit(
            p2pfl, "sim", str(tmp_path / "tiny.toml"), "--json", "--no-plots",
            "--out", str(tmp_path / "plain"),
        )  # fmt: skip
        result, plain = private.result(), public.result()
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["schedules"]["partial-mesh"]
    assert 0 < summary["max_epsilon"] <= 3.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 3
    for node in {r["node"] for r in records}:
        spent = [r["epsilon"] for r in sorted(records, key=lambda r: r["round"])
                 if r["node"] == node]  # fmt: skip
        assert spent == sorted(spent) and 0 < spent[0] < spent[-1] <= 3.0, node
    # Without the flag, no epsilon anywhere.
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["schedules"]["partial-mesh"]["max_epsilon"] is None


def test_compare_dp_prints_one_table_and_a_plot(tmp_path: Path) -> None:
    text = TINY.replace('compare = ["partial-mesh"]', 'compare = ["partial-mesh"]\n'
                        'compare_dp = [2, "none"]').replace("rounds = 3", "rounds = 2")  # fmt: skip
    (tmp_path / "dp.toml").write_text(text)
    out = tmp_path / "out"
    result = p2pfl("sim", str(tmp_path / "dp.toml"), "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = {r["dp_epsilon"]: r for r in json.loads(result.stdout)["rows"]}
    assert set(rows) == {"2", "none"}
    assert 0 < rows["2"]["max_epsilon"] <= 2.0 and rows["none"]["max_epsilon"] is None
    assert all(0 < r["honest_accuracy"] <= 1 for r in rows.values())
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dp epsilon |" in (out / "matrix.md").read_text()


def test_a_crashed_node_keeps_what_it_spent(tmp_path: Path) -> None:
    text = TINY.replace('compare = ["partial-mesh"]', 'compare = ["ring"]')
    # A neighbour of the crashed node waits out a round timeout for its model: 8 s, not 30.
    text = text.replace("rounds = 3", "rounds = 6")
    text = text.replace("seed = 0", "seed = 0\ndp_epsilon = 2\nround_timeout = 8")
    text += '\n[[faults.crashes]]\nnode = "n02"\nat_round = 2\nrestart_after_rounds = 1\n'
    (tmp_path / "crash.toml").write_text(text)
    (run,) = asyncio.run(Simulation(load_scenario(tmp_path / "crash.toml", {})).run())
    mine = [(r["restarts"], r["round"], r["epsilon"]) for r in run.records if r["node"] == "n02"]
    before = [e for restarts, _, e in mine if restarts == 0]
    after = [e for restarts, _, e in mine if restarts == 1]
    assert before and after
    # The restarted node went on from what it had spent, never from zero, and stayed in budget.
    assert after[0] > before[-1]
    assert [e for _, _, e in mine] == sorted(e for _, _, e in mine)
    assert after[-1] <= 2.0


def test_two_daemons_print_epsilon_in_their_round_lines(tmp_path: Path) -> None:
    nodes = start_cluster(
        tmp_path,
        2,
        [*FAST, "--schedule", "ring", "--mode", "sync", "--rounds", "2",
         "--dp-epsilon", "4", "--dp-delta", "1e-5", "--dp-max-grad-norm", "1.0"],
    )  # fmt: skip
    try:
        finish(nodes, timeout=180)
    finally:
        stop_all(nodes)
    for node in nodes:
        rounds = node.rounds()
        assert [r["round"] for r in rounds] == [1, 2], node.tail()
        spent = [r["epsilon"] for r in rounds]
        assert 0 < spent[0] < spent[1] <= 4.0
        record = json.loads((tmp_path / node.name / "privacy.json").read_text())
        assert record["spent"] == pytest.approx(spent[1], abs=1e-6)  # the accountant, saved
        assert record["epsilon"] == 4.0 and record["delta"] == 1e-5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dp-epsilon", "8"], "dp_epsilon: a privacy budget needs a planned run"),
        (["--dp-epsilon", "0", "--rounds", "3"], "dp_epsilon"),
        (["--dp-epsilon", "8", "--rounds", "3", "--dp-delta", "1.5"], "dp_delta"),
        (["--dp-epsilon", "8", "--rounds", "3", "--mu", "0.1"], "FedProx"),
    ],
)
def test_bad_dp_settings_exit_2_with_one_line(args: list[str], needle: str) -> None:
    result = p2pfl("run", *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


BATCHNORM_MODEL = """
from torch import nn

def build(in_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], 16), nn.BatchNorm1d(16),
                         nn.Linear(16, n_classes))
"""


def test_a_model_dp_sgd_cannot_train_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "bnmodel.py").write_text(BATCHNORM_MODEL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    (tmp_path / "bn.toml").write_text(
        TINY.replace('model = "logreg"', 'model = "bnmodel:build"\ndp_epsilon = 8')
    )
    with ThreadPoolExecutor(2) as pool:  # two independent start-ups (torch, Opacus): together
        running = pool.submit(
            p2pfl, "run", "--dp-epsilon", "8", "--rounds", "2", "--model", "bnmodel:build",
            "--state-dir", str(tmp_path / "st"), "--discovery", "static",
            "--listen", "127.0.0.1:0", "--log-level", "error", env=env,
        )  # fmt: skip
        simulated = pool.submit(
            p2pfl, "sim", str(tmp_path / "bn.toml"), "--out", str(tmp_path / "o"), env=env
        )
        run, sim = running.result(), simulated.result()
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("config error: dp_epsilon:") and "BatchNorm" in run.stderr
    assert run.stderr.count("\n") == 1
    assert sim.returncode == 2, sim.stderr
    assert sim.stderr.startswith("config error: node.dp_epsilon:") and "BatchNorm" in sim.stderr
    assert sim.stderr.count("\n") == 1


def test_the_text_round_line_ends_with_the_epsilon_spent(caplog: pytest.LogCaptureFixture) -> None:
    from p2pfl.daemon import report_round
    from p2pfl.inbox import NodeCounters
    from p2pfl.node import RoundReport

    def line(epsilon: float | None) -> str:
        report = RoundReport("n1", 3, 0.5, 0.6, 0.8, 2, 2, 1.0, NodeCounters().as_dict(),
                             epsilon=epsilon)  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO", logger="p2pfl.progress"):
            report_round(report)
        (record,) = caplog.records
        assert record.fields["epsilon"] == epsilon  # type: ignore[attr-defined]
        return record.getMessage()

    assert line(2.5).endswith(" epsilon=2.500")
    assert "epsilon" not in line(None)
