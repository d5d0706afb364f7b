"""TorchLearner: weights in and out, FedProx, evaluation, training, determinism."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from p2pfl.learning.datasets import Dataset, load_dataset
from p2pfl.learning.learner import Learner
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import TorchLearner, build_learner, make_loaders


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset("mnist1d", seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_is_a_learner(blobs: Dataset) -> None:
    learner = build_learner("mlp", blobs, None)
    assert isinstance(learner, Learner)
    assert learner.num_samples == 120


def test_weights_round_trip_between_learners(blobs: Dataset) -> None:
    a = build_learner("mlp", blobs, None, seed=1)
    b = build_learner("mlp", blobs, None, seed=2)
    wa = a.get_weights()
    assert _distance(wa, b.get_weights()) > 0
    b.set_weights(wa)
    wb = b.get_weights()
    assert wb.keys() == wa.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in wb.values())
    assert a.evaluate().loss == pytest.approx(b.evaluate().loss)


def test_get_weights_returns_copies(blobs: Dataset) -> None:
    learner = build_learner("logreg", blobs, None)
    weights = learner.get_weights()
    for arr in weights.values():
        arr += 1.0
    assert _distance(weights, learner.get_weights()) > 0


def test_set_weights_accepts_read_only_arrays_silently(blobs: Dataset) -> None:
    learner = build_learner("logreg", blobs, None)
    frozen = {}
    for name, arr in learner.get_weights().items():
        ro = np.frombuffer((arr + 0.5).tobytes(), dtype=arr.dtype).reshape(arr.shape)
        assert not ro.flags.writeable
        frozen[name] = ro
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.set_weights(frozen)
    assert _distance(frozen, learner.get_weights()) == 0


def test_set_weights_wrong_shape_names_tensor_and_loads_nothing(blobs: Dataset) -> None:
    learner = build_learner("logreg", blobs, None)
    before = learner.get_weights()
    bad = {k: v + 1.0 for k, v in before.items()}
    bad["1.bias"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"'1\.bias'.*\(4,\).*\(3,\)"):
        learner.set_weights(bad)
    assert _distance(before, learner.get_weights()) == 0


def test_set_weights_wrong_names(blobs: Dataset) -> None:
    learner = build_learner("logreg", blobs, None)
    weights = learner.get_weights()
    weights["extra"] = weights.pop("1.weight")
    with pytest.raises(ValueError, match=r"missing \['1\.weight'\], unexpected \['extra'\]"):
        learner.set_weights(weights)


def test_fedprox_keeps_weights_near_the_anchor(blobs: Dataset) -> None:
    drift = {}
    for mu in (0.0, 1.0):
        learner = build_learner("mlp", blobs, None, seed=0, mu=mu, lr=0.1, local_epochs=3)
        anchor = learner.get_weights()
        learner.fit()
        drift[mu] = _distance(anchor, learner.get_weights())
    assert drift[1.0] < 0.8 * drift[0.0]


def test_evaluate_confusion_matrix_matches_accuracy(blobs: Dataset) -> None:
    learner = build_learner("mlp", blobs, None, local_epochs=2)
    learner.fit()
    result = learner.evaluate()
    assert result.confusion.shape == (3, 3) and result.confusion.dtype == np.int64
    assert result.confusion.sum() == result.samples == 45
    assert np.trace(result.confusion) / result.confusion.sum() == pytest.approx(result.accuracy)
    assert np.array_equal(result.confusion.sum(axis=1), np.bincount(blobs.y_test, minlength=3))
    assert result.accuracy > 0.8


def test_evaluate_on_a_test_slice(blobs: Dataset) -> None:
    learner = build_learner("logreg", blobs, None, test_indices=np.arange(10))
    assert learner.evaluate().confusion.sum() == 10


def test_short_fit_lowers_loss_on_mnist1d(mnist1d: Dataset) -> None:
    part = partition(mnist1d.y_train, 5, "iid", seed=0)[0]  # 800 samples
    learner = build_learner(
        "cnn1d", mnist1d, part, seed=0, local_epochs=3, test_indices=np.arange(300)
    )
    before = learner.evaluate()
    fit = learner.fit()
    after = learner.evaluate()
    assert fit.samples == 3 * len(part) == 3 * learner.num_samples
    assert fit.seconds > 0 and np.isfinite(fit.loss)
    assert after.loss < before.loss - 0.2
    assert after.accuracy > before.accuracy


def test_same_seed_same_training(blobs: Dataset) -> None:
    runs = []
    for seed in (5, 5, 6):
        learner = build_learner("mlp", blobs, None, seed=seed, init_seed=0, local_epochs=1)
        learner.fit()
        runs.append(learner.get_weights())
    assert _distance(runs[0], runs[1]) == 0
    assert _distance(runs[0], runs[2]) > 0  # same init, different batch order


def test_learner_seed_fixes_order_of_a_shuffling_loader(blobs: Dataset) -> None:
    results = []
    for _ in range(2):
        model = torch.nn.Linear(8, 3)
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        data = TensorDataset(torch.tensor(blobs.x_train), torch.tensor(blobs.y_train))
        train = DataLoader(data, batch_size=16, shuffle=True)
        test = DataLoader(data, batch_size=64)
        learner = TorchLearner(model, train, test, n_classes=3, seed=7, local_epochs=1)
        learner.fit()
        results.append(learner.get_weights())
    assert _distance(results[0], results[1]) == 0


def test_loaders_fetch_the_batches_a_plain_dataloader_would(blobs: Dataset) -> None:
    """make_loaders fetches a batch with one index per tensor (not one per sample): the
    batches, their order and dtypes are a plain seeded DataLoader's, epoch after epoch."""
    idx = np.arange(0, len(blobs.y_train), 3)
    train, test = make_loaders(blobs, idx, batch_size=16, seed=5)
    plain = DataLoader(
        TensorDataset(torch.tensor(blobs.x_train[idx]), torch.tensor(blobs.y_train[idx])),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
    )
    for _ in range(3):
        ours, theirs = list(train), list(plain)
        assert len(ours) == len(theirs) > 1
        for (x, y), (xp, yp) in zip(ours, theirs, strict=True):
            assert torch.equal(x, xp) and torch.equal(y, yp)
            assert (x.dtype, y.dtype) == (xp.dtype, yp.dtype)
    ((x, y),) = list(test)  # the whole test split in one batch, in order
    assert torch.equal(x, torch.tensor(blobs.x_test)) and torch.equal(y, torch.tensor(blobs.y_test))


def _unshuffled_learner(blobs: Dataset) -> TorchLearner:
    model = torch.nn.Linear(8, 3)
    data = TensorDataset(torch.tensor(blobs.x_train), torch.tensor(blobs.y_train))
    loader = DataLoader(data, batch_size=16)
    return TorchLearner(model, loader, loader, n_classes=3, local_epochs=1)


def test_momentum_survives_set_weights_until_reset(blobs: Dataset) -> None:
    fresh = _unshuffled_learner(blobs)
    start = fresh.get_weights()
    fresh.fit()
    expected = fresh.get_weights()

    kept = _unshuffled_learner(blobs)
    kept.fit()
    kept.set_weights(start)
    kept.fit()  # momentum from the first fit still pushes
    assert _distance(kept.get_weights(), expected) > 1e-3

    reset = _unshuffled_learner(blobs)
    reset.fit()
    reset.set_weights(start)
    reset.reset_optimizer()
    reset.fit()
    assert _distance(reset.get_weights(), expected) < 1e-5


_IDLE_LEARNER = """
import sys
import numpy as np
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.torch_learner import build_learner
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 3, 64)
learner = build_learner("mlp", Dataset("blobs", x, y, x, y, 3), None)
learner.evaluate()
learner.set_weights(learner.get_weights())
learner.reset_optimizer()
print("idle", "torch._dynamo" in sys.modules)
learner.prepare()
print("prepared", "torch._dynamo" in sys.modules)
learner.fit()
"""


def test_a_learner_makes_its_optimizer_when_told_training_starts() -> None:
    # Any torch optimizer imports torch._dynamo (about 70 MB of an idle daemon's ~340): a node
    # that has not trained yet (waiting for its first peer) holds neither; the node calls
    # prepare() once its peers are there. In a fresh interpreter, since this one has long
    # imported it.
    out = subprocess.run(
        [sys.executable, "-c", _IDLE_LEARNER], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["idle", "False", "prepared", "True"]


def test_adam_option_trains(blobs: Dataset) -> None:
    learner = build_learner("mlp", blobs, None, optimizer="adam", lr=1e-2, local_epochs=2)
    before = learner.evaluate().loss
    learner.fit()
    assert learner.evaluate().loss < before


def test_max_grad_norm_bounds_every_step_from_a_steep_start(blobs: Dataset) -> None:
    # A merge that lands the model where the loss is steep (here: every weight times 30, so
    # the logits are huge): plain SGD (no momentum) moves it by lr x the gradient's norm a
    # step, so with the clip no step is longer than lr x max_grad_norm; without, they are.
    lr, clip = 0.1, 1.0
    moved = {}
    for max_grad_norm in (0.0, clip):
        learner = build_learner(
            "mlp", blobs, None, seed=0, lr=lr, momentum=0.0, local_epochs=1,
            max_grad_norm=max_grad_norm,
        )  # fmt: skip
        learner.set_weights({k: 30 * w for k, w in learner.get_weights().items()})
        start = learner.get_weights()
        steps = len(learner.train_loader)
        learner.fit()
        moved[max_grad_norm] = _distance(start, learner.get_weights()) / steps
    assert moved[clip] <= lr * clip + 1e-5
    assert moved[0.0] > 3 * lr * clip


@pytest.mark.parametrize(
    "opts",
    [
        {"optimizer": "rmsprop"},
        {"lr": 0.0},
        {"local_epochs": 0},
        {"mu": -1.0},
        {"max_grad_norm": -1.0},
        {"max_grad_norm": float("nan")},
    ],
)
def test_bad_options_are_rejected(blobs: Dataset, opts: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_learner("logreg", blobs, None, **opts)  # type: ignore[arg-type]


@pytest.mark.slow
def test_cnn1d_reaches_090_on_mnist1d(tmp_path: Path) -> None:
    dataset = load_dataset("mnist1d", seed=0, cache_dir=tmp_path)
    learner = build_learner("cnn1d", dataset, None, batch_size=32, seed=0, local_epochs=20)
    start = time.perf_counter()
    learner.fit()
    result = learner.evaluate()
    elapsed = time.perf_counter() - start
    print(f"cnn1d on MNIST-1D: accuracy={result.accuracy:.3f} in {elapsed:.1f}s")
    assert result.accuracy >= 0.90
