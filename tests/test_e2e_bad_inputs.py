"""A data file, dataset spec or model spec that cannot be used ends `p2pfl run` and `p2pfl sim`
with one line naming it and exit status 2, before anything trains (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


def good_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.normal(size=(20, 4)).astype(np.float32),
        y_train=rng.integers(0, 2, 20),
        x_test=rng.normal(size=(8, 4)).astype(np.float32),
        y_test=rng.integers(0, 2, 8),
    )
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(300))
    return path


def missing_arrays(path: Path) -> Path:
    np.savez(path, x_train=np.zeros((4, 2), np.float32), y_train=np.zeros(4, np.int64))
    return path


# (what is wrong, how to make the inputs in tmp_path -> (dataset, model), what stderr must say)
CASES = {
    "missing npz": (
        lambda tmp: (f"npz:{tmp / 'absent.npz'}", "logreg"),
        "absent.npz: cannot read: No such file or directory",
    ),
    "random bytes": (
        lambda tmp: (f"npz:{random_bytes(tmp / 'noise.npz')}", "logreg"),
        "noise.npz: cannot read: not an .npz archive",
    ),
    "missing arrays": (
        lambda tmp: (f"npz:{missing_arrays(tmp / 'half.npz')}", "logreg"),
        "half.npz: missing arrays x_test, y_test",
    ),
    # A bad mnist1d:N is refused with the config, before any sample is generated.
    "mnist1d:N not a number": (
        lambda tmp: ("mnist1d:abc", "logreg"),
        "dataset: mnist1d:N needs an integer N, got 'abc'",
    ),
    "mnist1d:N zero": (
        lambda tmp: ("mnist1d:0", "logreg"),
        "dataset: mnist1d:N needs N from 100 to 10,000,000, got 0",
    ),
    "mnist1d:N negative": (
        lambda tmp: ("mnist1d:-5", "logreg"),
        "dataset: mnist1d:N needs N from 100 to 10,000,000, got -5",
    ),
    "model does not import": (
        lambda tmp: (f"npz:{good_npz(tmp / 'good.npz')}", "no_such_pkg.models:build"),
        "model 'no_such_pkg.models:build': cannot import 'no_such_pkg.models'",
    ),
}


def p2pfl(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args],
        capture_output=True, text=True, timeout=100, env=env,
    )  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("config error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_run_says_which_file_or_spec_and_exits_2(tmp_path: Path, case: str) -> None:
    make, needle = CASES[case]
    dataset, model = make(tmp_path)
    result = p2pfl(
        "run", "--dataset", dataset, "--model", model, "--rounds", "1",
        "--state-dir", str(tmp_path / "state"), "--discovery", "static",
        "--listen", "127.0.0.1:0", "--log-level", "error",
    )  # fmt: skip
    assert_one_line(result, needle)
    assert not (tmp_path / "state").exists(), "nothing is written for a node that cannot start"


@pytest.mark.parametrize("case", list(CASES))
def test_sim_says_which_file_or_spec_and_exits_2(tmp_path: Path, case: str) -> None:
    make, needle = CASES[case]
    dataset, model = make(tmp_path)
    scenario = tmp_path / "bad.toml"
    scenario.write_text(
        f'nodes = 2\ncompare = ["ring"]\n[node]\nrounds = 1\n'
        f"dataset = {dataset!r}\nmodel = {model!r}\n"
    )
    out = tmp_path / "out"
    result = p2pfl("sim", str(scenario), "--out", str(out))
    assert_one_line(result, needle)
    assert not out.exists(), "nothing is written for a run that cannot start"
