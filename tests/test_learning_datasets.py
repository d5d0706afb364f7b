"""Datasets: mnist1d and mnist1d:N generation and cache, digits, npz files and their errors."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.learning import datasets
from p2pfl.learning.datasets import (
    MNIST1D_MAX_SAMPLES,
    MNIST1D_MIN_SAMPLES,
    Dataset,
    DatasetError,
    DatasetSpec,
    default_cache_dir,
    load_dataset,
    parse_dataset_spec,
)


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("p2pfl-cache")


@pytest.fixture(scope="module")
def mnist1d(mnist1d_cache: Path) -> Dataset:
    return load_dataset("mnist1d", seed=0, cache_dir=mnist1d_cache)


def test_mnist1d_shapes_and_dtypes(mnist1d: Dataset) -> None:
    assert mnist1d.name == "mnist1d"
    assert mnist1d.x_train.shape == (4000, 40) and mnist1d.x_train.dtype == np.float32
    assert mnist1d.y_train.shape == (4000,) and mnist1d.y_train.dtype == np.int64
    assert mnist1d.x_test.shape == (1000, 40) and mnist1d.x_test.dtype == np.float32
    assert mnist1d.y_test.shape == (1000,) and mnist1d.y_test.dtype == np.int64
    assert mnist1d.n_classes == 10 and mnist1d.in_shape == (40,)
    assert set(np.unique(mnist1d.y_train)) == set(range(10))
    assert not mnist1d.x_train.flags.writeable


def test_mnist1d_is_cached_and_reused(
    mnist1d: Dataset, mnist1d_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = list(mnist1d_cache.glob("mnist1d-seed0-*.npz"))
    assert len(files) == 1
    assert not list(mnist1d_cache.glob(".*.tmp"))  # no temp file left behind
    mtime = files[0].stat().st_mtime_ns

    def generate(args: object) -> None:
        raise AssertionError("regenerated although the cache is valid")

    monkeypatch.setattr(datasets, "_generate_mnist1d", generate)
    again = load_dataset("mnist1d", seed=0, cache_dir=mnist1d_cache)
    assert files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(again.x_train, mnist1d.x_train)
    assert np.array_equal(again.y_test, mnist1d.y_test)


def test_mnist1d_regenerates_a_corrupt_cache_identically_and_keeps_global_rng(
    mnist1d: Dataset, mnist1d_cache: Path, tmp_path: Path
) -> None:
    name = next(mnist1d_cache.glob("mnist1d-seed0-*.npz")).name
    (tmp_path / name).write_bytes(b"not a zip file")
    np.random.seed(123)
    regenerated = load_dataset("mnist1d", seed=0, cache_dir=tmp_path)
    assert np.random.random() == np.random.RandomState(123).random()  # global RNG untouched
    assert np.array_equal(regenerated.x_train, mnist1d.x_train)
    assert np.array_equal(regenerated.y_train, mnist1d.y_train)
    assert np.array_equal(regenerated.x_test, mnist1d.x_test)
    with np.load(tmp_path / name) as repaired:
        assert np.array_equal(repaired["y_test"], mnist1d.y_test)


def test_mnist1d_seed_changes_data(mnist1d: Dataset, mnist1d_cache: Path) -> None:
    other = load_dataset("mnist1d", seed=1, cache_dir=mnist1d_cache)
    assert other.x_train.shape == mnist1d.x_train.shape
    assert not np.array_equal(other.x_train, mnist1d.x_train)


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PFL_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("P2PFL_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "p2pfl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "p2pfl"


def test_digits_split_is_deterministic_and_scaled() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.n_classes == 10
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    assert np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return f"npz:{path}"


def _good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(20, 3)),
        "y_train": np.array([0, 1, 2, 4] * 5, dtype=np.int32),
        "x_test": rng.normal(size=(6, 3)),
        "y_test": np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8),
    }


def test_npz_loads_and_converts(tmp_path: Path) -> None:
    arrays = _good_arrays()
    arrays["y_test"] = arrays["y_test"].astype(np.float64)  # whole-number floats are accepted
    ds = load_dataset(_write_npz(tmp_path / "d.npz", **arrays))
    assert ds.n_classes == 5  # max label + 1
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert np.allclose(ds.x_train, arrays["x_train"], atol=1e-6)
    assert ds.in_shape == (3,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_test": None}, "missing arrays y_test"),
        ({"y_train": np.zeros(19, dtype=np.int64)}, "x_train has 20 samples but y_train has 19"),
        ({"y_train": np.full(20, 0.5)}, "integer class labels"),
        ({"y_train": np.full(20, -1)}, "negative label"),
        ({"x_test": np.zeros((6, 4))}, "train samples are"),
        ({"x_train": np.full((20, 3), np.nan)}, "non-finite"),
        ({"x_train": np.zeros(20)}, "must be \\[samples"),
    ],
)
def test_npz_errors_name_the_problem(
    tmp_path: Path, change: dict[str, np.ndarray | None], message: str
) -> None:
    arrays = _good_arrays()
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    with pytest.raises(ValueError, match=message):
        load_dataset(_write_npz(tmp_path / "bad.npz", **arrays))


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


def test_a_file_that_is_no_npz_archive_is_a_dataset_error(tmp_path: Path) -> None:
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(300))  # numpy would take it for a pickle
    with pytest.raises(DatasetError, match=r"noise\.npz: cannot read: not an \.npz archive"):
        load_dataset(f"npz:{noise}")
    one = tmp_path / "one.npz"
    with one.open("wb") as f:
        np.save(f, np.zeros(3))  # one .npy array under an .npz name
    with pytest.raises(DatasetError, match=r"one array, not an \.npz archive of x_train"):
        load_dataset(f"npz:{one}")


def test_an_object_array_in_the_archive_is_refused_not_unpickled(tmp_path: Path) -> None:
    arrays = _good_arrays()
    arrays["y_test"] = np.array([{"a": 1}] * len(arrays["y_test"]), dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=r"objects\.npz: cannot read"):
        load_dataset(f"npz:{path}")


def test_digits_without_scikit_learn_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if absent
    with pytest.raises(DatasetError, match=r"pip install 'p2pfl\[digits\]'"):
        load_dataset("digits")


@pytest.mark.parametrize("spec", ["mnist", "npz:", "cifar10"])
def test_unknown_dataset_lists_choices(spec: str) -> None:
    with pytest.raises(ValueError, match="mnist1d, mnist1d:N, digits, npz:PATH"):
        load_dataset(spec)


# ---- mnist1d:N ------------------------------------------------------------------------------


def package_mnist1d(**overrides: object) -> dict[str, np.ndarray]:
    """What the mnist1d package itself generates from its default recipe with `overrides`."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in overrides.items():
        setattr(args, key, value)
    state = np.random.get_state()
    try:
        return make_dataset(args)  # type: ignore[no-any-return]
    finally:
        np.random.set_state(state)


def test_plain_mnist1d_keeps_its_cache_file_and_the_package_default_recipe(
    mnist1d: Dataset, mnist1d_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnist1d.data import get_dataset_args

    version = importlib.metadata.version("mnist1d")
    digest = hashlib.sha256(json.dumps([2, version, 0]).encode()).hexdigest()[:12]
    assert (mnist1d_cache / f"mnist1d-seed0-{digest}.npz").exists()
    calls: list[dict[str, object]] = []

    def generate(args: dict[str, object]) -> dict[str, np.ndarray]:
        calls.append(args)
        return {a: getattr(mnist1d, a) for a in ("x_train", "y_train", "x_test", "y_test")}

    monkeypatch.setattr(datasets, "_generate_mnist1d", generate)
    load_dataset("mnist1d", seed=7, cache_dir=tmp_path)
    recipe = get_dataset_args(as_dict=True)
    del recipe["url"]
    assert calls == [{**recipe, "seed": 7}]  # 5,000 samples, one call


@given(n=st.integers(MNIST1D_MIN_SAMPLES // 10, MNIST1D_MAX_SAMPLES // 10).map(lambda k: 10 * k))
def test_mnist1d_n_parses_every_multiple_of_ten_in_range(n: int) -> None:
    assert parse_dataset_spec(f"mnist1d:{n}") == DatasetSpec("mnist1d", samples=n)


@given(n=st.integers().filter(lambda n: not MNIST1D_MIN_SAMPLES <= n <= MNIST1D_MAX_SAMPLES))
def test_mnist1d_n_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(DatasetError, match="mnist1d:N needs N from 100 to 10,000,000"):
        parse_dataset_spec(f"mnist1d:{n}")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("mnist1d:abc", "needs an integer N, got 'abc'"),
        ("mnist1d:", "needs an integer N, got ''"),
        ("mnist1d:1e5", "needs an integer N, got '1e5'"),
        ("mnist1d: 400", "needs an integer N, got ' 400'"),
        ("mnist1d:0", "needs N from 100 to 10,000,000, got 0"),
        ("mnist1d:-5", "needs N from 100 to 10,000,000, got -5"),
        ("mnist1d:10000010", "needs N from 100 to 10,000,000, got 10,000,010"),
        ("mnist1d:405", "needs N a multiple of 10"),
    ],
)
def test_bad_mnist1d_n_says_what_is_wrong(spec: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"^mnist1d:N {says}"):
        parse_dataset_spec(spec)
    with pytest.raises(DatasetError, match=f"^mnist1d:N {says}"):
        load_dataset(spec, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before generating anything


def test_other_specs_parse() -> None:
    assert parse_dataset_spec("mnist1d") == DatasetSpec("mnist1d")
    assert parse_dataset_spec("digits") == DatasetSpec("digits")
    assert parse_dataset_spec("npz:/d/x.npz") == DatasetSpec("npz", path=Path("/d/x.npz"))


def test_mnist1d_n_is_n_samples_by_the_package_recipe_split_as_it_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="p2pfl.learning.datasets"):
        ds = load_dataset("mnist1d:400", seed=3, cache_dir=tmp_path)
    assert "generating 400 MNIST-1D samples (cached for next time)" in caplog.text
    assert ds.name == "mnist1d:400" and ds.n_classes == 10 and ds.in_shape == (40,)
    assert (len(ds.x_train), len(ds.x_test)) == (320, 80)  # the package's train_split, 0.8
    labels = np.concatenate([ds.y_train, ds.y_test])
    assert np.array_equal(np.bincount(labels), [40] * 10)
    made = package_mnist1d(num_samples=400, seed=3)
    assert np.array_equal(ds.x_train, made["x"].astype(np.float32))
    assert np.array_equal(ds.y_train, made["y"])
    assert np.array_equal(ds.x_test, made["x_test"].astype(np.float32))
    assert np.array_equal(ds.y_test, made["y_test"])


def test_mnist1d_n_is_cached_apart_from_plain_mnist1d_and_other_n(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset("mnist1d:400", seed=0, cache_dir=tmp_path)
    other_n = load_dataset("mnist1d:200", seed=0, cache_dir=tmp_path)
    assert len(other_n.y_train) + len(other_n.y_test) == 200
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.split("-seed0-")[0] for f in files] == ["mnist1d-200", "mnist1d-400"], files

    def generate(args: object) -> None:
        raise AssertionError("regenerated although the cache is valid")

    monkeypatch.setattr(datasets, "_generate_mnist1d", generate)
    again = load_dataset("mnist1d:400", seed=0, cache_dir=tmp_path)
    assert np.array_equal(again.x_train, first.x_train)
    assert np.array_equal(again.y_test, first.y_test)
    with pytest.raises(AssertionError, match="regenerated"):  # plain mnist1d has its own file
        load_dataset("mnist1d", seed=0, cache_dir=tmp_path)


def test_large_mnist1d_n_is_generated_in_chunks_of_bounded_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []
    generate = datasets._generate_mnist1d

    def counted(args: dict[str, object]) -> dict[str, np.ndarray]:
        calls.append(dict(args))
        return generate(args)

    monkeypatch.setattr(datasets, "_MNIST1D_CHUNK", 200)
    monkeypatch.setattr(datasets, "_generate_mnist1d", counted)
    ds = load_dataset("mnist1d:500", seed=0, cache_dir=tmp_path)
    assert [c["num_samples"] for c in calls] == [170, 170, 160]  # near-equal, tens of samples
    seeds = [c["seed"] for c in calls]
    assert seeds[0] == 0 and len(set(seeds)) == 3  # chunk 0 is the package's own seed-0 draw
    assert (len(ds.x_train), len(ds.x_test)) == (136 + 136 + 128, 34 + 34 + 32)
    labels = np.concatenate([ds.y_train, ds.y_test])
    assert np.array_equal(np.bincount(labels), [50] * 10)
    rows = np.concatenate([ds.x_train, ds.x_test])
    assert len(np.unique(rows, axis=0)) == 500  # chunks are distinct draws, not copies
    made = package_mnist1d(num_samples=170, seed=0)
    assert np.array_equal(ds.x_train[:136], made["x"].astype(np.float32))
    assert np.array_equal(ds.x_test[:34], made["x_test"].astype(np.float32))
    # The chunk size is part of the cache key: it changes which samples mnist1d:N holds.
    monkeypatch.setattr(datasets, "_MNIST1D_CHUNK", 100_000)
    assert len(load_dataset("mnist1d:500", seed=0, cache_dir=tmp_path).y_train) == 400
    assert len(list(tmp_path.glob("mnist1d-500-seed0-*.npz"))) == 2


def test_mnist1d_n_caps_the_test_set_and_trains_on_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "_MNIST1D_CHUNK", 200)
    monkeypatch.setattr(datasets, "_MNIST1D_MAX_TEST", 60)
    ds = load_dataset("mnist1d:500", seed=0, cache_dir=tmp_path)
    assert (len(ds.x_train), len(ds.x_test)) == (440, 60)
    labels = np.concatenate([ds.y_train, ds.y_test])
    assert np.array_equal(np.bincount(labels), [50] * 10)  # nothing lost, nothing repeated
    assert len(np.unique(np.concatenate([ds.x_train, ds.x_test]), axis=0)) == 500
    made = package_mnist1d(num_samples=170, seed=0)  # chunk 0: its 34 test samples come first
    assert np.array_equal(ds.x_test[:34], made["x_test"].astype(np.float32))
    assert np.array_equal(ds.x_train[:136], made["x"].astype(np.float32))
