"""Take a learned model out of a node's state dir: `p2pfl export`.

A node's checkpoint (``runs/<run>/checkpoints/ckpt-NNNNNN.npz``, see `p2pfl.store`: the run
given, else the one started last, or an older version's flat ``checkpoints/``) holds its
weights and what builds the model (`p2pfl.resume.checkpoint_meta`). Export writes those weights as
safetensors (default), a torch ``state_dict`` (``pt``) or an ONNX graph (``onnx``), with
string metadata: ``run``, ``round``, ``node``, ``model``, ``dataset``, ``seed``, ``layout``
(tensor name -> [dtype, shape], the model's `ExpectedSpec`) and ``config_hash`` when the
checkpoint records one; the run's record (``run.json``, `p2pfl.runs`) gives the run id and
config hash when there is one. The consensus of several nodes is the plain average of their
checkpoints (`p2pfl.learning.merge.average`), which needs one model spec.

Every expected failure is an `ExportError` whose message names the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from p2pfl.learning.merge import average
from p2pfl.protocol.model import layout
from p2pfl.runs import RunRecord, read_record, run_dirs
from p2pfl.store import Checkpoint, CheckpointError, StateDir, atomic_write, read_checkpoint

Format = Literal["safetensors", "pt", "onnx"]
FORMATS: tuple[Format, ...] = ("safetensors", "pt", "onnx")
_SPEC_KEYS = ("model", "dataset", "seed", "layout")


class ExportError(ValueError):
    """A state dir, checkpoint or output file that cannot be used; one line naming it."""


@dataclass(frozen=True)
class Exported:
    """Weights to write and their metadata (all strings, as safetensors stores them)."""

    weights: dict[str, np.ndarray]
    metadata: dict[str, str]
    source: str  # the checkpoint file(s) read
    skipped: tuple[str, ...] = ()  # newer checkpoints refused: "path: reason"


def export_node(state_dir: Path, round: int | None = None, run: str | None = None) -> Exported:
    """The checkpoint of `round` (default: the newest good one) of `run` (default: the one
    started last) of the node in `state_dir`."""
    state = _state(state_dir, run)
    try:
        kept = state.checkpoints()
    except OSError as exc:
        raise ExportError(f"cannot read {state.checkpoint_dir}: {exc.strerror or exc}") from None
    if not kept:
        raise ExportError(f"no checkpoint in {state.checkpoint_dir}")
    skipped: list[str] = []
    path: Path
    if round is not None:
        if round not in kept:
            rounds = ", ".join(str(r) for r in kept)
            raise ExportError(
                f"no checkpoint of round {round} in {state.checkpoint_dir}; rounds kept: {rounds}"
            )
        path = kept[round]
        ckpt = _read(path)
    else:
        for path in reversed(kept.values()):
            try:
                ckpt = read_checkpoint(path)
                break
            except CheckpointError as exc:
                skipped.append(f"{path}: {exc}")
        else:
            raise ExportError(f"no usable checkpoint in {state.checkpoint_dir}: {skipped[0]}")
    record = read_record(state.run_path) if state.run is not None else None
    return Exported(ckpt.weights, _metadata(state, ckpt, record), str(path), tuple(skipped))


def export_consensus(
    state_dirs: Sequence[Path], round: int | None = None, run: str | None = None
) -> Exported:
    """The average of the nodes' checkpoints (each as `export_node` picks it); one model spec."""
    if not state_dirs:
        raise ExportError("--consensus needs at least one state dir")
    nodes = [export_node(d, round, run) for d in state_dirs]
    first = nodes[0].metadata
    for d, node in zip(state_dirs[1:], nodes[1:], strict=True):
        for key in _SPEC_KEYS:
            if node.metadata.get(key) != first.get(key):
                what = (
                    "tensor names, dtypes or shapes"
                    if key == "layout"
                    else f"{node.metadata.get(key)!r} != {first.get(key)!r}"
                )
                raise ExportError(f"{d}: model spec differs from {state_dirs[0]} in {key}: {what}")
    weights = average([n.weights for n in nodes])
    rounds = [int(n.metadata["round"]) for n in nodes]
    runs = sorted({n.metadata["run"] for n in nodes})
    metadata = {
        **{k: first[k] for k in _SPEC_KEYS if k in first},
        "run": runs[0] if len(runs) == 1 else "",
        "round": str(min(rounds)),  # every averaged model reached at least this round
        "node": "",
        "consensus": json.dumps({n.metadata["node"] or str(d): r
                                 for d, n, r in zip(state_dirs, nodes, rounds, strict=True)}),
    }  # fmt: skip
    hashes = {n.metadata.get("config_hash") for n in nodes}
    if len(hashes) == 1 and None not in hashes:
        metadata["config_hash"] = first["config_hash"]
    source = ", ".join(n.source for n in nodes)
    return Exported(weights, metadata, source, tuple(s for n in nodes for s in n.skipped))


def write(exported: Exported, out: Path, fmt: Format) -> None:
    """Write `exported` to `out` whole or not at all. Blocking (files, torch)."""
    import torch

    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in exported.weights.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        _write_file(out, lambda fh: fh.write(save(tensors, metadata=exported.metadata)))
    elif fmt == "pt":
        _write_file(out, lambda fh: torch.save(tensors, fh))
    else:
        _write_onnx(exported, tensors, out)


def _write_onnx(exported: Exported, tensors: Mapping[str, Any], out: Path) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as exc:
        raise ExportError(
            f"--format onnx needs the onnx packages ({exc.name} is missing): "
            "pip install 'p2pfl[onnx]'"
        ) from None
    import torch

    from p2pfl.learning.datasets import DatasetError, load_dataset
    from p2pfl.learning.models import ModelError, build_model

    meta = exported.metadata
    if not meta.get("model") or not meta.get("dataset"):
        raise ExportError(
            f"{exported.source} records no model spec (written before p2pfl export existed): "
            "cannot build its ONNX graph"
        )
    try:
        data = load_dataset(meta["dataset"], seed=int(meta["seed"] or 0))
        model = build_model(meta["model"], data.in_shape, data.n_classes)
        model.load_state_dict(tensors)
    except (DatasetError, ModelError, RuntimeError) as exc:
        raise ExportError(f"cannot build model {meta['model']!r} for ONNX: {exc}") from None
    model.eval()
    # Batch 2, not 1: torch.export specializes a dimension of size 1 and the batch would be fixed.
    dummy = torch.zeros((2, *data.in_shape), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes are not the user's
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
        graph = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model, (dummy,), str(graph), input_names=["x"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )  # fmt: skip
        proto = onnx.load(str(graph))
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        _write_file(out, lambda fh: fh.write(proto.SerializeToString()))


def _write_file(out: Path, write: Callable[[IO[bytes]], object]) -> None:
    if out.is_dir():
        raise ExportError(f"cannot write {out}: it is a directory")
    try:
        atomic_write(out, write)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    os.chmod(out, 0o644)  # a model to share, not a secret like the state dir


def _state(state_dir: Path, run: str | None) -> StateDir:
    """The state dir, reading the checkpoints of ``run`` (default: the run started last)."""
    state = StateDir(state_dir)
    if not state_dir.is_dir():
        raise ExportError(f"no state dir at {state_dir}")
    runs = run_dirs(state_dir)
    if run is not None and run not in runs:
        known = ", ".join(runs) or "none"
        raise ExportError(f"no run {run!r} in {state_dir}; runs: {known}")
    chosen = run or next(reversed(runs), None)
    if chosen is not None and runs[chosen] != state_dir:  # else the flat layout of old
        state.run = chosen
    if not state.checkpoint_dir.is_dir():
        raise ExportError(f"no checkpoints in {state_dir} (not a node's --state-dir, or empty)")
    return state


def _read(path: Path) -> Checkpoint:
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:  # unreadable (gone meanwhile, too), or NaN/Inf
        raise ExportError(f"{path}: {exc}") from None


def _metadata(state: StateDir, ckpt: Checkpoint, record: RunRecord | None) -> dict[str, str]:
    spec = ckpt.meta.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    shapes = {k: [str(dt), list(shape)] for k, (dt, shape) in layout(ckpt.weights).items()}
    metadata = {
        "run": str(ckpt.meta.get("run") or ckpt.meta.get("run_name") or ""),
        "round": str(ckpt.round),
        "node": _node_id(state),
        "model": str(spec.get("model", "")),
        "dataset": str(spec.get("dataset", "")),
        "seed": str(spec.get("seed", "")),
        "layout": json.dumps(shapes, separators=(",", ":")),
    }
    if ckpt.meta.get("config_hash"):
        metadata["config_hash"] = str(ckpt.meta["config_hash"])
    if record is not None:  # the run's record has the last word
        metadata["run"] = record.run
        if record.config_hash:
            metadata["config_hash"] = record.config_hash
    return metadata


def _node_id(state: StateDir) -> str:
    try:
        stored = json.loads((state.path / "identity.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(stored.get("id", "")) if isinstance(stored, dict) else ""
