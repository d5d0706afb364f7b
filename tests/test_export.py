"""`p2pfl export` on state dirs written by `StateDir`, as a user runs the command."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.config import NodeConfig
from p2pfl.learning import build_model, load_dataset
from p2pfl.resume import checkpoint_meta
from p2pfl.store import StateDir

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Take the model out: `p2pfl export`"


def readme_snippet() -> str:
    """The first ```python block of the README's export section (the load-back snippet)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(HEADING) :]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match is not None, "no python block under " + HEADING
    return match.group(1)


def model_weights(name: str, seed: int) -> dict[str, np.ndarray]:
    data = load_dataset("mnist1d")
    model = build_model(name, data.in_shape, data.n_classes, seed=seed)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def node_dir(
    path: Path, rounds: list[int], *, model: str = "logreg", node: str = "n1", seed: int = 0
) -> dict[int, dict[str, np.ndarray]]:
    """A node's state dir with a checkpoint of each round (different weights each); them."""
    cfg = NodeConfig(model=model, dataset="mnist1d", run_name="trial-7")
    saved = {}
    with StateDir(path) as state:
        state.node_id(node)
        for r in rounds:
            saved[r] = model_weights(model, seed + r)
            state.save_checkpoint(r, saved[r], checkpoint_meta(cfg))
    return saved


def export(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["export", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def fails(*args: str | Path, match: str) -> None:
    code, _out, err = export(*args)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_newest_checkpoint_exports_with_its_metadata_and_loads_back(tmp_path: Path) -> None:
    saved = node_dir(tmp_path / "n1", [3, 4, 5])
    out = tmp_path / "model.safetensors"
    code, printed, err = export("--state-dir", tmp_path / "n1", "--out", out)
    assert code == 0, err
    assert "round 5" in printed and "node n1" in printed
    loaded = load_file(out)
    assert set(loaded) == set(saved[5])
    for name, arr in saved[5].items():
        np.testing.assert_array_equal(loaded[name].numpy(), arr)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["run"] == "trial-7" and meta["round"] == "5" and meta["node"] == "n1"
    assert (meta["model"], meta["dataset"], meta["seed"]) == ("logreg", "mnist1d", "0")
    layout = json.loads(meta["layout"])
    assert layout["1.weight"] == ["float32", [10, 40]]
    assert "config_hash" not in meta  # nothing records a configuration yet


def test_readme_snippet_loads_the_export_into_the_model_p2pfl_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = node_dir(tmp_path / "n1", [2], model="mlp")
    assert export("--state-dir", tmp_path / "n1", "--out", tmp_path / "model.safetensors")[0] == 0
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(readme_snippet(), scope)
    model = scope["model"]
    assert isinstance(model, torch.nn.Module) and not model.training
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), saved[2][name])


def test_round_picks_that_checkpoint_and_a_missing_one_lists_the_kept(tmp_path: Path) -> None:
    saved = node_dir(tmp_path / "n1", [3, 4, 5])
    out = tmp_path / "r4.safetensors"
    assert export("--state-dir", tmp_path / "n1", "--round", "4", "--out", out)[0] == 0
    np.testing.assert_array_equal(load_file(out)["1.bias"].numpy(), saved[4]["1.bias"])
    fails("--state-dir", tmp_path / "n1", "--round", "2", "--out", out,
          match="no checkpoint of round 2 in")  # fmt: skip
    fails("--state-dir", tmp_path / "n1", "--round", "9", "--out", out,
          match="rounds kept: 3, 4, 5")  # fmt: skip


def test_format_pt_writes_a_state_dict_that_loads_without_pickle(tmp_path: Path) -> None:
    saved = node_dir(tmp_path / "n1", [1], model="mlp")
    out = tmp_path / "model.pt"
    code, _printed, err = export("--state-dir", tmp_path / "n1", "--format", "pt", "--out", out)
    assert code == 0, err
    state = torch.load(out, weights_only=True)
    data = load_dataset("mnist1d")
    model = build_model("mlp", data.in_shape, data.n_classes)
    model.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), saved[1][name])


def test_consensus_is_the_average_and_needs_one_model_spec(tmp_path: Path) -> None:
    a = node_dir(tmp_path / "a", [4], node="a", seed=1)
    b = node_dir(tmp_path / "b", [3], node="b", seed=2)
    out = tmp_path / "avg.safetensors"
    code, _printed, err = export("--consensus", tmp_path / "a", tmp_path / "b", "--out", out)
    assert code == 0, err
    avg = load_file(out)
    for name in a[4]:
        np.testing.assert_allclose(avg[name].numpy(), (a[4][name] + b[3][name]) / 2, rtol=1e-6)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["round"] == "3" and json.loads(meta["consensus"]) == {"a": 4, "b": 3}
    assert meta["model"] == "logreg" and meta["run"] == "trial-7"

    node_dir(tmp_path / "c", [4], node="c", model="mlp")
    fails("--consensus", tmp_path / "a", tmp_path / "c", "--out", out,
          match=f"{tmp_path / 'c'}: model spec differs")  # fmt: skip


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path) -> None:
    saved = node_dir(tmp_path / "n1", [1, 2])
    newest = tmp_path / "n1" / "checkpoints" / "ckpt-000002.npz"
    newest.write_bytes(newest.read_bytes()[:100])
    out = tmp_path / "m.safetensors"
    code, _printed, err = export("--state-dir", tmp_path / "n1", "--out", out)
    assert code == 0, err
    assert f"warning: skipped checkpoint {newest}: unreadable" in err
    np.testing.assert_array_equal(load_file(out)["1.weight"].numpy(), saved[1]["1.weight"])
    fails("--state-dir", tmp_path / "n1", "--round", "2", "--out", out,
          match=f"{newest}: unreadable")  # fmt: skip


def test_errors_are_one_line_naming_the_file_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    fails("--state-dir", tmp_path / "nowhere", "--out", out, match=f"no state dir at {tmp_path}")
    (tmp_path / "empty").mkdir()
    fails("--state-dir", tmp_path / "empty", "--out", out, match="no checkpoints in")
    with StateDir(tmp_path / "fresh"):
        pass  # a node that never finished a round
    fails("--state-dir", tmp_path / "fresh", "--out", out, match="no checkpoint in")
    node_dir(tmp_path / "bad", [1])
    only = tmp_path / "bad" / "checkpoints" / "ckpt-000001.npz"
    only.write_bytes(b"not a checkpoint")
    fails("--state-dir", tmp_path / "bad", "--out", out, match="no usable checkpoint in")
    node_dir(tmp_path / "n1", [1])
    (tmp_path / "file").write_text("")
    fails("--state-dir", tmp_path / "n1", "--out", tmp_path / "file" / "m.safetensors",
          match=f"cannot write {tmp_path / 'file' / 'm.safetensors'}")  # fmt: skip
    fails("--state-dir", tmp_path / "n1", "--out", tmp_path, match=f"cannot write {tmp_path}")
    fails("--state-dir", tmp_path / "n1", "--format", "h5", "--out", out, match="--format")
    fails("--out", out, match="--state-dir")
    assert not out.exists()


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxscript")),
    reason="the onnx extra is not installed (pip install 'p2pfl[onnx]')",
)
def test_format_onnx_writes_a_graph_with_a_free_batch_and_the_metadata(tmp_path: Path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    saved = node_dir(tmp_path / "n1", [2], model="cnn1d")
    out = tmp_path / "model.onnx"
    code, _printed, err = export("--state-dir", tmp_path / "n1", "--format", "onnx", "--out", out)
    assert code == 0, err
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model"] == "cnn1d" and meta["round"] == "2" and meta["node"] == "n1"
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # any batch size, not the dummy's
    # The graph computes what the model p2pfl builds computes, at a batch size of its own.
    data = load_dataset("mnist1d")
    model = build_model("cnn1d", data.in_shape, data.n_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in saved[2].items()})
    x = np.array(data.x_test[:5], dtype=np.float32)
    (logits,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_format_onnx_without_the_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_dir(tmp_path / "n1", [1])
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    out = tmp_path / "model.onnx"
    fails("--state-dir", tmp_path / "n1", "--format", "onnx", "--out", out,
          match="pip install 'p2pfl[onnx]'")  # fmt: skip
    assert not out.exists()


def test_nan_checkpoints_are_refused_and_one_without_a_spec_exports_weights_only(
    tmp_path: Path,
) -> None:
    out = tmp_path / "m.safetensors"
    weights = model_weights("logreg", 0)
    with StateDir(tmp_path / "old") as state:
        state.save_checkpoint(1, weights)  # as written before checkpoints recorded their spec
        broken = {**weights, "1.bias": np.full_like(weights["1.bias"], np.nan)}
        state.save_checkpoint(2, broken)
    fails("--state-dir", tmp_path / "old", "--round", "2", "--out", out,
          match="ckpt-000002.npz: non-finite values (NaN/Inf) in 1.bias")  # fmt: skip
    code, _printed, err = export("--state-dir", tmp_path / "old", "--out", out)
    assert code == 0 and "skipped checkpoint" in err, err
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["round"] == "1" and meta["model"] == "" and meta["run"] == ""
    fails("--state-dir", tmp_path / "old", "--round", "1", "--format", "onnx",
          "--out", tmp_path / "m.onnx", match="ckpt-000001.npz records no model spec")  # fmt: skip
