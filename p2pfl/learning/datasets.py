"""Datasets: `mnist1d` (generated offline, cached), `digits` (scikit-learn), `npz:PATH`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from numpy.lib.npyio import NpzFile

__all__ = ["DATASETS", "Dataset", "DatasetError", "default_cache_dir", "load_dataset"]

log = logging.getLogger(__name__)

DATASETS = ("mnist1d", "digits", "npz:PATH")
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# The mnist1d generator seeds and draws from the process-wide `random` and `np.random`
# state; we restore that state afterwards, and this lock keeps two threads from interleaving.
_MNIST1D_LOCK = threading.Lock()
# Bump when the cached arrays change meaning, so stale caches are never read.
_MNIST1D_CACHE_VERSION = 2


class DatasetError(ValueError):
    """A dataset spec or file that cannot be used: a config error, said before any training."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test split: float32 features, int64 labels in [0, n_classes).

    The arrays are read-only, so one `Dataset` can be shared by every node of a simulation.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        for arr in (self.x_train, self.y_train, self.x_test, self.y_test):
            arr.flags.writeable = False

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(self.x_train.shape[1:])


def load_dataset(spec: str, *, seed: int = 0, cache_dir: Path | None = None) -> Dataset:
    """Load a dataset by spec: `mnist1d`, `digits` or `npz:PATH`.

    `seed` picks the generated mnist1d dataset and the digits train/test split. The mnist1d
    cache lives in `cache_dir`, else `$P2PFL_CACHE_DIR`, else the user's cache directory.
    """
    if spec == "mnist1d":
        return _load_mnist1d(seed, cache_dir if cache_dir is not None else default_cache_dir())
    if spec == "digits":
        return _load_digits(seed)
    if spec.startswith("npz:") and len(spec) > 4:
        return _load_npz(Path(spec[4:]).expanduser())
    raise DatasetError(f"{spec!r} is unknown: choose one of {', '.join(DATASETS)}")


def default_cache_dir() -> Path:
    """`$P2PFL_CACHE_DIR`, else `$XDG_CACHE_HOME/p2pfl`, else `~/.cache/p2pfl`."""
    if env := os.environ.get("P2PFL_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "p2pfl"


def _mnist1d_args(seed: int) -> dict[str, object]:
    from mnist1d.data import get_dataset_args

    args: dict[str, object] = get_dataset_args(as_dict=True)
    args.pop("url", None)  # we never download
    args["seed"] = seed
    return args


def _load_mnist1d(seed: int, cache_dir: Path) -> Dataset:
    # The file name carries a digest of the generator's version, so a package upgrade (which
    # may change its defaults) produces a new file instead of silently reusing old data. The
    # version, not the arguments: reading them imports mnist1d, which imports matplotlib and
    # scipy (+74 MB in every daemon) only to find the cached file.
    version = importlib.metadata.version("mnist1d")
    digest = hashlib.sha256(
        json.dumps([_MNIST1D_CACHE_VERSION, version, seed]).encode()
    ).hexdigest()[:12]
    path = cache_dir / f"mnist1d-seed{seed}-{digest}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d(_mnist1d_args(seed))
        _write_atomic(path, arrays)
    return _validated("mnist1d", arrays, n_classes=10)


def _generate_mnist1d(args: dict[str, object]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    with _MNIST1D_LOCK:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(ObjectView(dict(args)))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return {
        "x_train": data["x"].astype(np.float32),
        "y_train": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("dataset cache unreadable, regenerating path=%s error=%s", path, e)
        return None


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write next to the target, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # allow_pickle=False: object arrays must never reach a file others will read.
            np.savez(f, allow_pickle=False, **cast(dict[str, Any], arrays))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DatasetError("'digits' needs scikit-learn: pip install 'p2pfl[digits]'") from e
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=seed, stratify=y
    )
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _validated("digits", arrays, n_classes=10)


def _load_npz(path: Path) -> Dataset:
    name = f"npz:{path}"
    try:
        loaded = np.load(path, allow_pickle=False)
    except OSError as e:
        raise DatasetError(f"{name}: cannot read: {e.strerror or e}") from e
    except (ValueError, EOFError) as e:
        # numpy takes bytes that are no array file for a pickle, which it refuses to load.
        raise DatasetError(f"{name}: cannot read: not an .npz archive") from e
    if not isinstance(loaded, NpzFile):
        raise DatasetError(f"{name}: one array, not an .npz archive of {', '.join(_ARRAYS)}")
    with loaded as npz:
        missing = [a for a in _ARRAYS if a not in npz.files]
        if missing:
            raise DatasetError(f"{name}: missing arrays {', '.join(missing)}")
        try:
            arrays = {a: npz[a] for a in _ARRAYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{name}: cannot read: {e}") from e
    return _validated(name, arrays, n_classes=None)


def _validated(name: str, arrays: dict[str, np.ndarray], n_classes: int | None) -> Dataset:
    """Check shapes, dtypes and label range; convert to float32 features, int64 labels."""
    xs, ys = {}, {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2:
            raise DatasetError(f"{name}: x_{split} must be [samples, ...], got shape {x.shape}")
        if y.ndim != 1:
            raise DatasetError(f"{name}: y_{split} must be 1-D, got shape {y.shape}")
        if len(x) != len(y):
            raise DatasetError(f"{name}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise DatasetError(f"{name}: the {split} split is empty")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise DatasetError(f"{name}: x_{split} must be numeric, got dtype {x.dtype}")
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all():
            raise DatasetError(f"{name}: x_{split} has non-finite values")
        xs[split], ys[split] = xf, _integer_labels(name, f"y_{split}", y)
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise DatasetError(
            f"{name}: train samples are {xs['train'].shape[1:]} but test samples are "
            f"{xs['test'].shape[1:]}"
        )
    top = int(max(ys["train"].max(), ys["test"].max()))
    if n_classes is None:
        n_classes = top + 1
    elif top >= n_classes:
        raise DatasetError(f"{name}: label {top} out of range for {n_classes} classes")
    return Dataset(name, xs["train"], ys["train"], xs["test"], ys["test"], n_classes)


def _integer_labels(name: str, field: str, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        labels = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        labels = y.astype(np.int64)  # whole numbers stored as floats are common in exports
    else:
        raise DatasetError(f"{name}: {field} must hold integer class labels, got dtype {y.dtype}")
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{name}: {field} has negative label {int(labels.min())}")
    return labels
