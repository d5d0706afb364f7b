"""End-to-end: a finished 4-node `p2pfl run` network, then `p2pfl export` of its state dirs, as a
user would run them; the exported models score what the nodes reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from p2pfl.learning import Dataset, build_model, load_dataset
from tests.test_e2e_run import FAST, finish, logs, start_cluster

# About 50 s on 2 busy cores (four nodes, then five export processes): over the ~20 s of the
# default run.
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def export(*args: str | Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "export", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def accuracy(path: Path, data: Dataset) -> float:
    """The README's load-back: the exported weights in the model p2pfl builds, on the test split."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    model = build_model(meta["model"], data.in_shape, data.n_classes)
    model.load_state_dict(load_file(path))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(np.array(data.x_test, dtype=np.float32))).argmax(1).numpy()
    return float((pred == data.y_test).mean())


def reported(state_dir: Path, round: int) -> float:
    """The accuracy the node wrote in its metrics log for `round` (its last line of it)."""
    metrics = state_dir / "runs" / "export-e2e" / "metrics.jsonl"  # the run's (p2pfl.runs)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return float([r for r in lines if r["round"] == round][-1]["accuracy"])


def test_exports_of_a_finished_network_score_what_the_nodes_reported(tmp_path: Path) -> None:
    rounds = 3
    nodes = start_cluster(
        tmp_path, 4,
        [*FAST, "--schedule", "ring", "--mode", "sync", "--rounds", str(rounds),
         "--round-timeout", "20", "--run-name", "export-e2e"],
    )  # fmt: skip
    finish(nodes, 180)
    assert all(n.proc is not None and n.proc.returncode == 0 for n in nodes), logs(nodes)
    data = load_dataset("mnist1d", seed=0)
    dirs = [tmp_path / n.name for n in nodes]
    scores = []
    for node, state_dir in zip(nodes, dirs, strict=True):
        out = tmp_path / f"{node.name}.safetensors"
        assert f"node {node.name}, round {rounds}" in export("--state-dir", state_dir, "--out", out)
        with safe_open(str(out), "pt") as fh:
            meta = fh.metadata()
        assert (meta["run"], meta["node"], meta["model"]) == ("export-e2e", node.name, "mlp")
        score = accuracy(out, data)
        assert abs(score - reported(state_dir, rounds)) <= 1e-6, (node.name, score)
        scores.append(score)
    out = tmp_path / "consensus.safetensors"
    export("--consensus", *dirs, "--out", out)
    consensus = accuracy(out, data)
    assert consensus >= float(np.mean(scores)), (consensus, scores)
