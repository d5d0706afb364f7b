"""The batched engine: stacked training equals per-node training, its merges equal the rules',
its faults, its records, and `p2pfl sim --engine batched` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from p2pfl.learning.datasets import Dataset
from p2pfl.learning.merge import average, parse_merge
from p2pfl.learning.models import build_model
from p2pfl.learning.torch_learner import TorchLearner, build_learner, make_loaders
from p2pfl.simulation.attacks import poison
from p2pfl.simulation.batched import BatchedSimulation, _BatchedRun, refusal
from p2pfl.simulation.engine import _record
from p2pfl.simulation.scenario import load_scenario
from p2pfl.simulation.stacked import StackedModels

pytestmark = pytest.mark.timeout(300)

TINY = """
name = "tiny"
nodes = 5
engine = "batched"
compare = ["ring", "random-walk", "partial-mesh"]

[node]
mode = "sync"
rounds = 3
model = "mlp"
local_epochs = 1
degree = 2
merge = "average"
seed = 0
"""


def scenario(tmp_path: Path, text: str = TINY, **overrides: object):  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return load_scenario(path, overrides)


def toy_data(sizes: list[int], features: int = 6, classes: int = 3) -> tuple[Dataset, list]:
    rng = np.random.default_rng(0)
    total = sum(sizes)
    data = Dataset(
        "toy",
        rng.normal(size=(total, features)).astype(np.float32),
        rng.integers(0, classes, total).astype(np.int64),
        rng.normal(size=(20, features)).astype(np.float32),
        rng.integers(0, classes, 20).astype(np.int64),
        classes,
    )
    bounds = np.cumsum([0, *sizes])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    return data, shards


def stacked(model: torch.nn.Module, data: Dataset, shards: list) -> StackedModels:
    models = StackedModels(model, len(shards))
    models.set_data(data.x_train, data.y_train, shards, seeds=[100 + i for i in range(len(shards))])
    return models


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_one_full_batch_per_epoch_equals_torch_learner(name: str, max_grad_norm: float) -> None:
    """Batch size >= every shard: each epoch is one batch, whatever the order, so the stacked
    step must match the daemon's own learner (SGD, momentum, weight decay, FedProx, the
    gradient clip: 0.05 clips every step here) exactly."""
    data, shards = toy_data([5, 9, 12], features=16)
    models = stacked(build_model(name, (16,), 3, seed=1), data, shards)
    opts = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "mu": 0.5}
    opts["max_grad_norm"] = max_grad_norm
    models.fit(torch.arange(3), epochs=3, batch_size=16, **opts)
    for i, shard in enumerate(shards):
        train, test = make_loaders(data, shard, batch_size=16)
        learner = TorchLearner(
            build_model(name, (16,), 3, seed=1), train, test, n_classes=3, local_epochs=3,
            **opts,  # type: ignore[arg-type]
        )  # fmt: skip
        learner.fit()
        got = models.weights(models.flat[i].numpy())
        for key, want in learner.get_weights().items():
            np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-5, err_msg=key)
        accuracy, loss = models.evaluate(
            torch.tensor([i]), torch.tensor(data.x_test), torch.tensor(data.y_test)
        )
        result = learner.evaluate()
        assert float(accuracy[0]) == pytest.approx(result.accuracy)
        assert float(loss[0]) == pytest.approx(result.loss, rel=1e-4)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn1d one by one"])
def test_evaluating_many_nodes_at_once_equals_each_node_alone(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes of a model without convolutions are evaluated in vmapped chunks (of two here);
    cnn1d's through its written-out forward, three nodes x 16 samples a call (the last call of
    a run shorter, the samples in three parts), or one by one where that does not apply; in
    runs of 16 nodes on two threads. Each node's accuracy and loss must be its own model's on
    the test set, in the order asked."""
    monkeypatch.setattr("p2pfl.simulation.stacked._EVAL_ROWS", 2 * 40)
    monkeypatch.setattr("p2pfl.simulation.stacked._EVAL_NODES", 3)
    monkeypatch.setattr("p2pfl.simulation.stacked._EVAL_SAMPLES", 16)
    monkeypatch.setattr("p2pfl.simulation.stacked._WORKERS", 2)
    torch.manual_seed(0)
    model = build_model(name.split()[0], (16,), 3, seed=1)
    models = StackedModels(model, 20, written_out=name != "cnn1d one by one")
    assert (models._fast is not None) == (name == "cnn1d")
    models.flat += torch.randn_like(models.flat)
    x, y = torch.randn(40, 16), torch.randint(0, 3, (40,))
    nodes = torch.randperm(20)
    accuracy, loss = models.evaluate(nodes, x, y)
    for k, i in enumerate(nodes.tolist()):
        model.load_state_dict(models.weights_of(i), strict=False)
        with torch.no_grad():
            logits = model(x)
        want = (logits.argmax(dim=-1) == y).double().mean()
        assert float(accuracy[k]) == pytest.approx(float(want))
        assert float(loss[k]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_minibatches_of_uneven_shards_equal_the_daemons_learner() -> None:
    """Shards of 3, 7 and 10 samples in batches of 4, seeded as the node's loader: the same
    batches, so the same weights as `TorchLearner` (a node whose shard ran out waits)."""
    data, shards = toy_data([3, 7, 10])
    models = stacked(build_model("mlp", (6,), 3, seed=2), data, shards)
    for _ in range(2):  # two fits: the optimizer state and the batch order carry over
        models.fit(torch.arange(3), epochs=2, batch_size=4, lr=0.05, momentum=0.9)
    for i, shard in enumerate(shards):
        # the daemon's and the node engine's path (`learner_from_config` calls it so)
        learner = build_learner(
            "mlp", data, shard, batch_size=4, seed=100 + i, init_seed=2, local_epochs=2,
            lr=0.05, momentum=0.9,
        )  # fmt: skip
        learner.fit()
        learner.fit()
        got = models.weights(models.flat[i].numpy())
        for key, want in learner.get_weights().items():
            np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_training_in_chunks_of_nodes_equals_training_all_at_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes are trained in cache-sized chunks (`chunk_rows`), two chunks at a time on two
    threads: 40 nodes in chunks of 16 (the least) must end with the weights, momentum and
    losses of one call over all 40 (each thread runs its own copy of the model), and a chunk's
    shards set its own number of steps without changing what a node computes."""
    sizes = [3 + (7 * i) % 23 for i in range(40)]
    data, shards = toy_data(sizes, features=16)

    def trained() -> tuple[StackedModels, torch.Tensor]:
        models = stacked(build_model(name, (16,), 3, seed=3), data, shards)
        fits = [models.fit(torch.arange(40), epochs=2, batch_size=4, lr=0.05, momentum=0.9)]
        fits.append(models.fit(torch.arange(40), epochs=2, batch_size=4, lr=0.05, momentum=0.9))
        return models, torch.stack(fits)

    whole, whole_losses = trained()
    assert whole.chunk_rows(4) >= 40
    monkeypatch.setattr("p2pfl.simulation.stacked._TRAIN_BYTES", 1)
    monkeypatch.setattr("p2pfl.simulation.stacked._WORKERS", 2)
    threads = torch.get_num_threads()
    chunked, chunked_losses = trained()
    assert torch.get_num_threads() == threads  # the workers' one intra-op thread is undone
    assert chunked.chunk_rows(4) == 16
    torch.testing.assert_close(chunked.flat, whole.flat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.momentum, whole.momentum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_losses, whole_losses, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.flat[0], whole.flat[39])  # every node trained its own shard


def test_average_mixing_step_equals_the_merge_rule(tmp_path: Path) -> None:
    """The sparse mixing step gives each node `merge.average` of its own and received models."""
    sc = scenario(tmp_path, schedule="partial-mesh")
    from p2pfl.learning.datasets import load_dataset

    run = _BatchedRun(sc, "partial-mesh", load_dataset("mnist1d", seed=0), None)
    run.models.flat += torch.randn_like(run.models.flat)  # every node a different model
    live = list(range(5))
    sent = run._sent(live)
    inbound = run._deliver(live, 1)
    assert any(inbound.values())
    expected = {
        i: average([run.models.weights(sent[j].numpy()) for j in (i, *inbound[i])]) for i in live
    }
    merged = run._merge(live, sent, inbound)
    for i in live:
        assert merged[i] == len(inbound[i]) == 2  # degree 2
        got = run.models.weights(run.models.flat[i].numpy())
        for key in got:
            np.testing.assert_allclose(got[key], expected[i][key], rtol=1e-5, atol=1e-6)


def test_records_have_the_node_engines_fields_and_crashed_nodes_skip_rounds(
    tmp_path: Path,
) -> None:
    text = (
        TINY.replace('merge = "average"', 'merge = "clipped"')
        + """
[[faults.crashes]]
node = "n02"
at_round = 1
restart_after_rounds = 1

[[faults.crashes]]
node = "n03"
at_round = 2
"""
    )
    sc = scenario(tmp_path, text, schedule="ring", rounds=4)
    (run,) = BatchedSimulation(sc).run()
    seen = {(r["node"], r["round"]): r for r in run.records}
    assert ("n02", 2) not in seen and ("n02", 3) in seen  # down for one round, then back
    assert seen[("n02", 3)]["restarts"] == 1 and seen[("n02", 1)]["restarts"] == 0
    assert ("n03", 2) in seen and ("n03", 3) not in seen and ("n03", 4) not in seen
    assert len(run.records) == 5 * 4 - 1 - 2
    # ring: one model out and one in per live node per round
    assert seen[("n01", 1)]["models_sent"] == 1 and seen[("n01", 1)]["merged"] == 1


def records_of(folder: Path) -> dict[tuple[str, str, int], dict[str, object]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {(r["schedule"], r["node"], r["round"]): r for r in map(json.loads, lines)}


# Not `models_received`: a node engine's counter can count a model of the next round that
# came before the record was written.
SAME = ("accuracy", "test_loss", "train_loss", "merged", "models_sent", "restarts", "honest")


@pytest.mark.parametrize(
    "extra",
    [
        "",  # average
        '\n[faults.byzantine]\ncount = 1\nbehaviour = "label-flip"\n',
    ],
    ids=["average", "label-flip, clipped"],
)
def test_per_node_kernels_give_the_node_engines_records_bit_for_bit(
    tmp_path: Path, extra: str
) -> None:
    """`--kernels per-node`: each node trains and is evaluated by the node engine's own
    learner, so the batched engine's schedules, merges and faults must give the node engine's
    records exactly, on every schedule: the same accuracies, losses (to the last bit) and
    merges. (The stacked arithmetic only agrees to float rounding, which chaos then grows.)"""
    text = TINY.replace('engine = "batched"\n', "") + extra
    if extra:
        text = text.replace('merge = "average"', 'merge = "clipped"')
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    for engine, more in (("node", []), ("batched", ["--kernels", "per-node"])):
        result = subprocess.run(
            [sys.executable, "-m", "p2pfl", "sim", str(path), "--engine", engine, *more,
             "--no-plots", "--json", "--out", str(tmp_path / engine)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    node, batched = records_of(tmp_path / "node"), records_of(tmp_path / "batched")
    assert node.keys() == batched.keys() and len(node) == 3 * 5 * 3
    for key, want in node.items():
        assert {f: batched[key][f] for f in SAME} == {f: want[f] for f in SAME}, key
    if extra:
        assert sum(not r["honest"] for r in node.values()) == 3 * 3  # one flipper, 3 rounds


def test_per_node_kernels_compute_in_float32_only(tmp_path: Path) -> None:
    for flag in ("--train-precision", "--eval-precision"):
        result = subprocess.run(
            [sys.executable, "-m", "p2pfl", "sim", "--engine", "batched", "--kernels",
             "per-node", flag, "bfloat16", "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2
        (line,) = result.stderr.strip().splitlines()
        assert flag[2:].replace("-", "_") in line and "per-node" in line and "float32" in line
    assert not (tmp_path / "out").exists()


def test_record_fields_match_the_node_engine(tmp_path: Path) -> None:
    from p2pfl.node import RoundReport
    from p2pfl.simulation.engine import _Member
    from p2pfl.store import StateDir

    counters = dict.fromkeys(
        ("models_sent", "models_received", "bytes_sent", "rejected", "membership_received"), 0
    )
    report = RoundReport(
        node_id="n01", round=1, train_loss=0.0, test_loss=0.0, accuracy=0.0, peers=1, merged=0,
        seconds=0.0, counters=counters, fit_seconds=0.0, eval_seconds=0.0, epsilon=None,
    )  # fmt: skip
    node_record = _record("ring", report, 0.0, _Member(0, "n01", True, StateDir(tmp_path)))
    (run,) = BatchedSimulation(scenario(tmp_path, schedule="ring", rounds=1)).run()
    assert set(run.records[0]) == set(node_record)


def test_network_loss_drops_edges_and_counts_them(tmp_path: Path) -> None:
    sc = scenario(tmp_path, TINY + "\n[network]\nloss = 1.0\n", schedule="partial-mesh")
    (run,) = BatchedSimulation(sc).run()
    assert all(r["merged"] == 0 and r["models_received"] == 0 for r in run.records)
    assert all(r["models_sent"] > 0 for r in run.records)  # sent, and lost on the way
    assert run.dropped["loss"] == 5 * 2 * 3 and run.dropped["delivered"] == 0


def test_byzantine_nodes_send_the_attack_functions_models(tmp_path: Path) -> None:
    text = TINY + '\n[faults.byzantine]\ncount = 1\nbehaviour = "sign-flip"\n'
    sc = scenario(tmp_path, text, schedule="ring")
    from p2pfl.learning.datasets import load_dataset

    run = _BatchedRun(sc, "ring", load_dataset("mnist1d", seed=0), None)
    (bad,) = run.byzantine
    sent = run._sent(list(range(5)))
    own = run.models.weights(run.models.flat[bad].numpy())
    want = poison(own, "sign-flip", rng=np.random.default_rng(0))
    for key, value in run.models.weights(sent[bad].numpy()).items():
        np.testing.assert_array_equal(value, want[key])
    honest = [i for i in range(5) if i != bad]
    assert torch.equal(sent[honest], run.models.flat[honest])
    (result,) = BatchedSimulation(sc).run()
    assert {r["node"] for r in result.records if not r["honest"]} == {run.ids[bad]}


def test_clipped_rule_is_called_per_node_with_its_own_state(tmp_path: Path) -> None:
    sc = scenario(tmp_path, TINY.replace('"average"', '"clipped"'), schedule="partial-mesh")
    from p2pfl.learning.datasets import load_dataset

    run = _BatchedRun(sc, "partial-mesh", load_dataset("mnist1d", seed=0), None)
    assert len({id(rule) for rule in run.rules}) == 5
    assert run.rules[0].name == parse_merge("clipped").name
    run.run()
    assert all(rule.tau is not None for rule in run.rules)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "field"),
    [(["--rounds", "0"], "node.rounds"), (["--dp-epsilon", "4"], "node.dp_epsilon")],
)
def test_refusal_is_one_line_with_exit_2(tmp_path: Path, extra: list[str], field: str) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('mode = "sync"', 'mode = "sync"\nduration = 60.0'))
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--engine", "batched", *extra,
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "batched" in lines[0] and field in lines[0]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_async_mode_and_batchnorm_models_are_refused(tmp_path: Path) -> None:
    sc = scenario(tmp_path, TINY.replace('mode = "sync"', 'mode = "async"'))
    why = str(refusal(sc))
    assert "node.mode" in why and 'mode = "sync"' in why  # names the fix
    module = tmp_path / "bn_model.py"
    module.write_text(
        "from torch import nn\n"
        "def make(in_shape, n_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], 8), nn.BatchNorm1d(8),\n"
        "                         nn.Linear(8, n_classes))\n"
    )
    path = tmp_path / "bn.toml"
    path.write_text(TINY.replace('model = "mlp"', 'model = "bn_model:make"'))
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "BatchNorm" in line and "--engine node" in line


def test_sim_cli_engine_batched_prints_the_summary(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.replace('engine = "batched"\n', ""))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--engine", "batched",
         "--out", str(out), "--no-plots"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("ring", "random-walk", "partial-mesh", "mean", "best:"):
        assert name in result.stdout  # the node engine's table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["schedules"]) == {"ring", "random-walk", "partial-mesh"}
    for name, row in summary["schedules"].items():
        assert row["nodes"] == 5 and row["rounds"] == 3, name
        assert 0.2 < row["final_mean_accuracy"] <= 1.0, name  # learned: chance is 0.1
        assert row["messages_sent"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 * 3


def test_label_flippers_train_on_flipped_labels_of_their_own_shard(tmp_path: Path) -> None:
    text = TINY + '\n[faults.byzantine]\ncount = 2\nbehaviour = "label-flip"\n'
    sc = scenario(tmp_path, text, schedule="ring")
    from p2pfl.learning.datasets import load_dataset
    from p2pfl.learning.partition import partition

    data = load_dataset("mnist1d", seed=0)
    run = _BatchedRun(sc, "ring", data, None)
    parts = partition(data.y_train, 5, sc.node.partition, seed=0)
    labels = run.models.labels.numpy()
    for i, part in enumerate(parts):
        want = 9 - data.y_train[part] if i in run.byzantine else data.y_train[part]
        np.testing.assert_array_equal(labels[part], want)
    assert len(run.byzantine) == 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fidelity_default_scenario_batched_against_node_engine(
    tmp_path: Path, default_sim: tuple[str, Path]
) -> None:
    """The default scenario (16 nodes, each schedule, seed 0) on both engines: the same
    batches and merges, so the first rounds agree to float rounding (the first three within
    half a point); from there the two arithmetics (stacked vs per-model kernels) drift apart
    chaotically, node by node (from round 2 or 3; with `--merge average` too), and only the
    outcome is comparable: the mean accuracy of the last five rounds within 4 points.
    How fast they drift depends on the CPU's kernels. On an AMD EPYC (2 cores, 67a0ca1, the
    batched engine evaluating in bfloat16 there: `eval_precision` "auto"): three rounds
    within 0.1 point, last five within 1.3, single rounds up to 3.8 apart (2 of 75 beyond 2
    points; the same in float32 at c6c8c5d). Float rounding alone does as much: the node
    engine against itself with oneDNN's convolutions off differs by up to 2.5 points a round
    (4 of 75 beyond 2), so issue 15's "within 2 points per round" is not a bound any
    non-bit-identical engine meets here. Before 80e1cda the node engine's sync random walk
    skipped rounds by arrival timing and its last five rounds were 3 points off.
    With `--kernels per-node` (each node trained and evaluated by the node engine's own
    learner) the batched engine's records are the node engine's bit for bit, every round of
    every schedule: what differs above is the stacked arithmetic's rounding alone.
    The node engine's run is `p2pfl sim` with no arguments, shared with the acceptance test.
    """
    for kernels in ("stacked", "per-node"):
        result = subprocess.run(
            [sys.executable, "-m", "p2pfl", "sim", "--engine", "batched", "--kernels", kernels,
             "--out", str(tmp_path / kernels), "--no-plots", "--json"],
            capture_output=True, text=True, timeout=1500,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    node_records, exact = records_of(default_sim[1]), records_of(tmp_path / "per-node")
    assert exact.keys() == node_records.keys()
    for key, want in node_records.items():
        assert {f: exact[key][f] for f in SAME} == {f: want[f] for f in SAME}, key
    out = tmp_path / "stacked"
    curves: dict[str, dict[tuple[str, int], float]] = {}
    merges: dict[str, dict[tuple[str, str, int], int]] = {}
    for engine, folder in (("node", default_sim[1]), ("batched", out)):
        by_round: dict[tuple[str, int], list[float]] = {}
        merges[engine] = {}
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            by_round.setdefault((r["schedule"], r["round"]), []).append(r["accuracy"])
            merges[engine][(r["schedule"], r["node"], r["round"])] = r["merged"]
        curves[engine] = {k: sum(v) / len(v) for k, v in by_round.items()}
    # The same merges: every node plays every round and merges as many models in both (a sync
    # node that skipped a round by arrival timing, as before 80e1cda, fails here).
    assert merges["node"] == merges["batched"]
    node, batched = curves["node"], curves["batched"]
    assert node.keys() == batched.keys()
    for schedule in ("ring", "random-walk", "partial-mesh"):
        for r in range(1, 4):
            assert batched[(schedule, r)] == pytest.approx(node[(schedule, r)], abs=0.005)
        last = range(21, 26)
        outcome = [sum(curve[(schedule, r)] for r in last) / len(last) for curve in (node, batched)]
        assert outcome[1] == pytest.approx(outcome[0], abs=0.04), schedule


@pytest.mark.parametrize("schedule", ["ring", "random-walk", "partial-mesh"])
def test_targets_are_the_schedules_plans_over_the_live_view(tmp_path: Path, schedule: str) -> None:
    from p2pfl.learning.datasets import load_dataset

    sc = scenario(tmp_path, TINY.replace("nodes = 5", "nodes = 9"), schedule=schedule)
    run = _BatchedRun(sc, schedule, load_dataset("mnist1d", seed=0), None)
    for view in (run.ids, [n for n in run.ids if n != "n04"]):
        for r in (1, 2, 3):
            want = {n: tuple(run.schedule.plan(n, view, r).send_to) for n in view}
            got = {n: tuple(t) for n, t in run._targets(list(view), r).items()}
            assert got == want


def test_default_engine_is_node_under_128_nodes_and_batched_from_128_when_it_can() -> None:
    from p2pfl.simulation.cli import prepare

    assert prepare(None, {})[0].engine == "node"  # the default scenario: 16 nodes
    assert prepare(None, {"nodes": 128})[0].engine == "batched"
    assert prepare(None, {"nodes": 128, "engine": "node"})[0].engine == "node"
    assert prepare(None, {"nodes": 128, "dp_epsilon": 8.0})[0].engine == "node"  # can't: DP
    assert prepare(None, {"nodes": 16, "engine": "batched"})[0].engine == "batched"


def test_an_unknown_engine_is_one_line_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", "--engine", "fast", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config error: engine:") and "batched" in line


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_bfloat16_evaluation_is_within_a_point_of_float32(name: str) -> None:
    """`eval_precision = "bfloat16"` evaluates with bfloat16 weights and activations: on
    MNIST-1D models trained a little, each node's accuracy within a point of float32's and its
    loss within 2%, while the logits really are bfloat16."""
    from p2pfl.learning.datasets import load_dataset

    data = load_dataset("mnist1d", seed=0)
    shards = [np.arange(k * 1000, (k + 1) * 1000) for k in range(4)]
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = StackedModels(
            build_model(name, data.in_shape, 10, seed=0), 4, eval_dtype=dtype
        )
        models[dtype].set_data(data.x_train, data.y_train, shards, seeds=[0, 1, 2, 3])
        models[dtype].fit(torch.arange(4), epochs=8, batch_size=32, lr=0.05, momentum=0.9)
    assert torch.equal(models[torch.float32].flat, models[torch.bfloat16].flat)  # training: float32
    x, y = torch.tensor(data.x_test), torch.tensor(data.y_test)
    accuracy, loss = models[torch.float32].evaluate(torch.arange(4), x, y)
    accuracy16, loss16 = models[torch.bfloat16].evaluate(torch.arange(4), x, y)
    assert accuracy.min() > 0.3  # learnt something: not a test of chance-level ties
    np.testing.assert_allclose(accuracy16, accuracy, atol=0.01)
    np.testing.assert_allclose(loss16, loss, rtol=0.02)
    assert not torch.equal(loss16, loss)  # bfloat16's rounding shows in the losses
    assert models[torch.bfloat16]._test_logits([0, 1], x[:8].bfloat16()).dtype == torch.bfloat16


def test_eval_precision_key(tmp_path: Path) -> None:
    """`eval_precision`: "auto" is bfloat16 exactly where the CPU has bfloat16 instructions;
    another value is one config-error line naming the key, exit status 2."""
    from p2pfl.simulation.batched import eval_dtype
    from p2pfl.simulation.stacked import bfloat16_is_fast

    auto = torch.bfloat16 if bfloat16_is_fast() else torch.float32
    assert eval_dtype(scenario(tmp_path)) == auto
    for key, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        text = TINY.replace('engine = "batched"', f'engine = "batched"\neval_precision = "{key}"')
        assert eval_dtype(scenario(tmp_path, text)) == dtype
    path = tmp_path / "bad.toml"
    path.write_text(
        TINY.replace('engine = "batched"', 'engine = "batched"\neval_precision = "fp8"')
    )
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config error: eval_precision:") and "bfloat16" in line


def test_bfloat16_training_is_mixed_precision_near_float32() -> None:
    """`train_precision = "bfloat16"`: each step's forward and backward in bfloat16, the
    parameters, momentum and update in float32. A step's gradients are within 10% of
    float32's (not equal), and cnn1d nodes trained for a few epochs learn as well, near
    float32's accuracy."""
    from p2pfl.learning.datasets import load_dataset

    data = load_dataset("mnist1d", seed=0)
    shards = [np.arange(k * 1000, (k + 1) * 1000) for k in range(3)]
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("cnn1d", data.in_shape, 10, seed=0)
        models[dtype] = StackedModels(model, 3, train_dtype=dtype)
        models[dtype].set_data(data.x_train, data.y_train, shards, seeds=[0, 1, 2])
    x = torch.tensor(data.x_train[:96]).view(3, 32, -1)
    y = torch.tensor(data.y_train[:96]).view(3, 32)
    g32, _ = models[torch.float32]._grads(models[torch.float32].flat, x, y, torch.ones(3, 32))
    g16, _ = models[torch.bfloat16]._grads(models[torch.bfloat16].flat, x, y, torch.ones(3, 32))
    assert g16.dtype == torch.float32 and not torch.equal(g16, g32)
    assert float((g16 - g32).norm() / g32.norm()) < 0.1
    tested = {}
    for dtype, stacked_models in models.items():
        stacked_models.fit(torch.arange(3), epochs=6, batch_size=32, lr=0.05, momentum=0.9)
        assert stacked_models.flat.dtype == stacked_models.momentum.dtype == torch.float32
        tested[dtype], _ = stacked_models.evaluate(
            torch.arange(3), torch.tensor(data.x_test), torch.tensor(data.y_test)
        )
    # Single nodes early in training scatter (here 0.58-0.73 against 0.69-0.76; 1,024 nodes'
    # mean of sim/batched.toml stays within a few tenths of a point of float32's per round).
    assert tested[torch.float32].min() > 0.5 and tested[torch.bfloat16].min() > 0.5
    assert float(tested[torch.bfloat16].mean()) == pytest.approx(
        float(tested[torch.float32].mean()), abs=0.08
    )


def test_train_precision_flag(tmp_path: Path) -> None:
    """`--train-precision bfloat16` trains the batched engine's tiny run (records for every
    node and round); on the node engine it is one config-error line, exit status 2."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--train-precision", "bfloat16",
         "--schedule", "ring", "--out", str(out), "--no-plots"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5 * 3
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(path), "--engine", "node",
         "--train-precision", "bfloat16", "--out", str(tmp_path / "node")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config error: train_precision") and "--engine batched" in line
