"""The README's Python API example runs as written, and the package exports what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import p2pfl

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Use it from Python"
LINE = re.compile(r"^(n\d) round=(\d+) accuracy=([0-9.]+)$")


def readme_example() -> str:
    """The first ```python block under the README's Python API heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(HEADING) :]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match is not None, "no python block under " + HEADING
    return match.group(1)


def python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.timeout(150)
def test_the_readme_example_trains_three_nodes_of_your_own_model(tmp_path: Path) -> None:
    done = python(readme_example(), tmp_path)
    assert done.returncode == 0, done.stderr
    rounds: dict[str, list[int]] = {}
    last: dict[str, float] = {}
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        assert match is not None, line
        node, rnd, acc = match.group(1), int(match.group(2)), float(match.group(3))
        rounds.setdefault(node, []).append(rnd)
        last[node] = acc
    assert rounds == {f"n{i}": [1, 2, 3, 4, 5] for i in range(3)}
    # Chance is 0.5 on the example's balanced labels; the merged MLP learns the rule.
    assert min(last.values()) > 0.8, last


def test_the_public_names_are_the_classes_they_stand_for() -> None:
    from p2pfl.config import NodeConfig
    from p2pfl.learning.learner import Learner
    from p2pfl.learning.torch_learner import TorchLearner
    from p2pfl.node import Node
    from p2pfl.simulation.engine import Simulation

    wanted = {
        "Node": Node,
        "NodeConfig": NodeConfig,
        "Simulation": Simulation,
        "Learner": Learner,
        "TorchLearner": TorchLearner,
    }
    for name, cls in wanted.items():
        assert getattr(p2pfl, name) is cls, name
        assert name in p2pfl.__all__
    with pytest.raises(AttributeError, match="Nodes"):
        _ = p2pfl.Nodes  # type: ignore[attr-defined]


def test_importing_the_package_does_not_import_torch(tmp_path: Path) -> None:
    """The exports are lazy: `p2pfl --help` and the protocol code do not pay for torch."""
    code = "import sys, p2pfl; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
