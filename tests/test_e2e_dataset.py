"""`--dataset mnist1d:N` from the command line: `p2pfl run` (flag) and `p2pfl sim` (scenario key)
generate N samples once, cache them under $P2PFL_CACHE_DIR, and train on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(150)


def p2pfl(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, P2PFL_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def cached_split(cache: Path, samples: int) -> tuple[int, int]:
    """(train, test) sizes of the one cached mnist1d:`samples` file."""
    files = list(cache.glob(f"mnist1d-{samples}-seed0-*.npz"))
    assert len(files) == 1, sorted(p.name for p in cache.iterdir())
    with np.load(files[0]) as npz:
        return len(npz["y_train"]), len(npz["y_test"])


def test_run_trains_on_mnist1d_n_and_caches_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = p2pfl(
        "run", "--id", "solo", "--network", f"d{uuid.uuid4().hex[:6]}",
        "--listen", "127.0.0.1:0", "--interface", "127.0.0.1", "--discovery", "static",
        "--mode", "sync", "--rounds", "1", "--dataset", "mnist1d:200", "--model", "logreg",
        "--local-epochs", "1", "--telemetry-interval", "0", "--state-dir", str(tmp_path / "s"),
        "--log-format", "json",
        cache=cache,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rounds = [json.loads(line) for line in out.stderr.splitlines() if '"round"' in line]
    assert any(r.get("round") == 1 for r in rounds), out.stderr[-2000:]
    assert cached_split(cache, 200) == (160, 40)


def test_sim_takes_mnist1d_n_from_the_scenario(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    scenario = tmp_path / "data.toml"
    scenario.write_text(
        'nodes = 2\ncompare = ["ring"]\n[node]\nmode = "sync"\nrounds = 1\n'
        'dataset = "mnist1d:300"\nmodel = "logreg"\nlocal_epochs = 1\n'
    )
    out = p2pfl("sim", str(scenario), "--json", "--no-plots", "--out", str(tmp_path / "o"),
                cache=cache)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["schedules"]["ring"]["nodes"] == 2
    assert cached_split(cache, 300) == (240, 60)
