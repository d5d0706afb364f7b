"""Datasets: `mnist1d` and `mnist1d:N` (generated offline, cached), `digits` (scikit-learn),
`npz:PATH`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import re
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from numpy.lib.npyio import NpzFile

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "default_cache_dir",
    "load_dataset",
    "parse_dataset_spec",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist1d", "mnist1d:N", "digits", "npz:PATH")
# mnist1d:N bounds. At least 10 samples a digit, so the test split (a fifth) has 20 or more;
# at most 10 million: 1.6 GB of float32 arrays, and about 2 hours of generation on one core
# (the generator makes about 1,400 samples a second: 100,000 take 70 s of CPU, once).
MNIST1D_MIN_SAMPLES = 100
MNIST1D_MAX_SAMPLES = 10_000_000
# Samples per call of the mnist1d generator. It builds a Python list of per-sample arrays
# (about 0.5 KB each) and several full copies, so large N is generated in chunks of this size,
# each written into the preallocated result: memory stays the arrays plus one chunk.
_MNIST1D_CHUNK = 100_000
# The test set of mnist1d:N: the package's fifth, at most this (plain mnist1d's test set).
_MNIST1D_MAX_TEST = 1_000
# From this many samples generation takes about half a minute: say so where users see it.
_MNIST1D_LOUD = 50_000
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# The mnist1d generator seeds and draws from the process-wide `random` and `np.random`
# state; we restore that state afterwards, and this lock keeps two threads from interleaving.
_MNIST1D_LOCK = threading.Lock()
# Bump when the cached arrays change meaning, so stale caches are never read.
_MNIST1D_CACHE_VERSION = 2


class DatasetError(ValueError):
    """A dataset spec or file that cannot be used: a config error, said before any training."""


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: `kind` with its `samples` (mnist1d:N) or `path` (npz:PATH)."""

    kind: Literal["mnist1d", "digits", "npz"]
    samples: int | None = None
    path: Path | None = None


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse and validate a dataset spec without loading anything; DatasetError says why."""
    if spec == "mnist1d":
        return DatasetSpec("mnist1d")
    if spec == "digits":
        return DatasetSpec("digits")
    if spec.startswith("npz:") and len(spec) > 4:
        return DatasetSpec("npz", path=Path(spec[4:]).expanduser())
    kind, sep, arg = spec.partition(":")
    if kind == "mnist1d" and sep:
        if not re.fullmatch(r"-?[0-9]+", arg):
            raise DatasetError(f"mnist1d:N needs an integer N, got {arg!r}")
        n = int(arg)
        if not MNIST1D_MIN_SAMPLES <= n <= MNIST1D_MAX_SAMPLES:
            raise DatasetError(
                f"mnist1d:N needs N from {MNIST1D_MIN_SAMPLES:,} to {MNIST1D_MAX_SAMPLES:,}, "
                f"got {n:,}"
            )
        if n % 10:
            raise DatasetError(
                f"mnist1d:N needs N a multiple of 10 (as many of each digit), got {n}"
            )
        return DatasetSpec("mnist1d", samples=n)
    raise DatasetError(f"unknown dataset {spec!r}: choose one of {', '.join(DATASETS)}")


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
    """Load a dataset by spec: `mnist1d`, `mnist1d:N`, `digits` or `npz:PATH`.

    `seed` picks the generated mnist1d dataset and the digits train/test split. The mnist1d
    cache lives in `cache_dir`, else `$P2PFL_CACHE_DIR`, else the user's cache directory.
    """
    parsed = parse_dataset_spec(spec)
    if parsed.kind == "mnist1d":
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        return _load_mnist1d(seed, cache, parsed.samples)
    if parsed.kind == "digits":
        return _load_digits(seed)
    assert parsed.path is not None
    return _load_npz(parsed.path)


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


def _load_mnist1d(seed: int, cache_dir: Path, samples: int | None = None) -> Dataset:
    """`mnist1d` (the package's 5,000 samples), or `mnist1d:N` when `samples` is given."""
    # The file name carries a digest of the generator's version, so a package upgrade (which
    # may change its defaults) produces a new file instead of silently reusing old data. The
    # version, not the arguments: reading them imports mnist1d, which imports matplotlib and
    # scipy (+74 MB in every daemon) only to find the cached file.
    version = importlib.metadata.version("mnist1d")
    key: list[object] = [_MNIST1D_CACHE_VERSION, version, seed]
    if samples is not None:  # plain mnist1d keeps its file name and arrays
        key += [samples, _MNIST1D_CHUNK, _MNIST1D_MAX_TEST]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    size = "" if samples is None else f"{samples}-"
    path = cache_dir / f"mnist1d-{size}seed{seed}-{digest}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        if samples is None:
            arrays = _generate_mnist1d(_mnist1d_args(seed))
        else:
            arrays = _generate_mnist1d_samples(seed, samples, path)
        _write_atomic(path, arrays)
    name = "mnist1d" if samples is None else f"mnist1d:{samples}"
    return _validated(name, arrays, n_classes=10)


def _generate_mnist1d_samples(seed: int, samples: int, path: Path) -> dict[str, np.ndarray]:
    """`samples` MNIST-1D samples by the package's own recipe (`get_dataset_args()` with
    `num_samples`), split as the package splits (its `train_split`, 0.8: a fifth to test), with
    the test set capped at `_MNIST1D_MAX_TEST` samples, the size of plain mnist1d's: every node
    evaluates on the whole test set every round, so a fifth of 100,000 would cost 20 times
    plain mnist1d's evaluation for no better estimate. Test samples past the cap go to train.

    Up to `_MNIST1D_CHUNK` samples this is one call of the generator with `seed`, so
    `mnist1d:5000` equals `mnist1d`. Above it, the samples are cut into near-equal chunks
    (multiples of 10), chunk 0 generated with `seed` and chunk i with a seed derived from
    (seed, i) by numpy's SeedSequence; each chunk is shuffled, standardized and split by the
    generator itself. The test set is the chunks' test parts in chunk order up to the cap; the
    train set is each chunk's train part followed by its test samples past the cap.
    """
    chunks = -(-samples // _MNIST1D_CHUNK)
    tens, extra = divmod(samples // 10, chunks)
    sizes = [10 * (tens + (i < extra)) for i in range(chunks)]
    train_split = float(cast(float, _mnist1d_args(seed)["train_split"]))
    n_test = sum(size - int(size * train_split) for size in sizes)  # the generator's expression
    totals = {
        "train": samples - min(n_test, _MNIST1D_MAX_TEST),
        "test": min(n_test, _MNIST1D_MAX_TEST),
    }
    level = logging.WARNING if samples >= _MNIST1D_LOUD else logging.INFO
    log.log(level, "generating %d MNIST-1D samples (cached for next time) path=%s", samples, path)
    out: dict[str, np.ndarray] = {}
    filled = {"train": 0, "test": 0}

    def put(split: str, x: np.ndarray, y: np.ndarray) -> None:
        if f"x_{split}" not in out:
            out[f"x_{split}"] = np.empty((totals[split], *x.shape[1:]), np.float32)
            out[f"y_{split}"] = np.empty(totals[split], np.int64)
        at = filled[split]
        out[f"x_{split}"][at : at + len(y)] = x
        out[f"y_{split}"][at : at + len(y)] = y
        filled[split] += len(y)

    for i, size in enumerate(sizes):
        args = _mnist1d_args(seed if i == 0 else _chunk_seed(seed, i))
        args["num_samples"] = size
        chunk = _generate_mnist1d(args)
        put("train", chunk["x_train"], chunk["y_train"])
        room = totals["test"] - filled["test"]
        put("test", chunk["x_test"][:room], chunk["y_test"][:room])
        put("train", chunk["x_test"][room:], chunk["y_test"][room:])
        if chunks > 1:
            log.log(
                level, "generated MNIST-1D samples done=%d of=%d", sum(filled.values()), samples
            )
    assert filled == totals, f"mnist1d split {filled}, expected {totals}"
    return out


def _chunk_seed(seed: int, index: int) -> int:
    """A seed for chunk `index` of `mnist1d:N`, fixed by (seed, index), within numpy's range."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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
