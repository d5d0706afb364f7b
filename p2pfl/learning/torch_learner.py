"""`TorchLearner`: the `Learner` protocol for any `nn.Module` and a pair of DataLoaders."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from p2pfl.learning.datasets import Dataset
from p2pfl.learning.learner import EvalResult, FitResult
from p2pfl.learning.models import build_model
from p2pfl.learning.privacy import DPSettings, PrivacyBudget, make_private

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig

log = logging.getLogger(__name__)

__all__ = ["LearnerOptions", "TorchLearner", "build_learner", "make_loaders"]

OptimizerName = Literal["sgd", "adam"]


class TorchLearner:
    """Trains a torch model on local data; weights travel as named numpy arrays.

    The optimizer is created once and kept across fits, so SGD momentum (and Adam's moments)
    survive merges: a merge moves the weights a little and the running direction stays a
    useful estimate, whereas a reset would start every local step cold (with momentum 0.9,
    the first ~10 steps of each fit would be damped). `reset_optimizer()` drops that state,
    e.g. after adopting a very different model.

    With `mu > 0`, fit adds FedProx's proximal term mu/2 * ||w - w0||^2, where w0 are the
    weights at the start of that fit (Li et al. 2020, "Federated optimization in
    heterogeneous networks").

    With `dp` set, fit runs DP-SGD through Opacus (`p2pfl.learning.privacy`): per-sample
    clipping, calibrated noise, Poisson-sampled batches; `privacy` is then the node's budget
    and its accountant, and a fit that would spend past the budget is refused (logged, and
    nothing trains: the model stays as it is). The model itself is not wrapped, so weights
    keep their names and layout. FedProx's proximal term is not per-sample, so DP-SGD cannot
    take it: `mu` must then be 0.

    The learner never changes torch's global thread settings; the caller decides them.
    Methods are serialized by an internal lock; call them from a worker thread
    (`asyncio.to_thread`), never on an event loop while a fit may be running.

    Without DP the optimizer is made by `prepare()` or the first fit, not here: creating any
    torch optimizer imports `torch._dynamo` (about 70 MB and, with four daemons starting on
    two cores, seconds), which a node waiting for its first peer need not hold. A node calls
    `prepare()` once its peers are there, so that cost is not its first round's.
    """

    def __init__(
        self,
        model: nn.Module,
        train: DataLoader[tuple[torch.Tensor, ...]],
        test: DataLoader[tuple[torch.Tensor, ...]],
        *,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        local_epochs: int = 3,
        mu: float = 0.0,
        max_grad_norm: float = 0.0,
        n_classes: int,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        dp: DPSettings | None = None,
        dp_noise_seed: int | None = None,
    ) -> None:
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if (
            lr <= 0
            or local_epochs < 1
            or mu < 0
            or weight_decay < 0
            or not max_grad_norm >= 0
            or n_classes < 1
        ):
            raise ValueError(
                f"need lr > 0, local_epochs >= 1, mu >= 0, weight_decay >= 0, "
                f"max_grad_norm >= 0, n_classes >= 1; got lr={lr}, local_epochs={local_epochs}, "
                f"mu={mu}, weight_decay={weight_decay}, max_grad_norm={max_grad_norm}, "
                f"n_classes={n_classes}"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train
        self.test_loader = test
        self.optimizer_name: OptimizerName = optimizer
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_epochs = local_epochs
        self.mu = mu
        # DP-SGD clips each sample's gradient itself (Opacus); a second, global clip would
        # only shrink its noisy step.
        self.max_grad_norm = max_grad_norm if dp is None else 0.0
        self.n_classes = n_classes
        if seed is not None:
            _seed_sampler(train, seed)
        self._lock = threading.Lock()
        self._optimizer: torch.optim.Optimizer | None = None  # by prepare() or the first fit
        self.privacy: PrivacyBudget | None = None
        self._refused = False  # the budget is spent: said once, nothing trains any more
        if dp is not None:
            if mu > 0:
                raise ValueError("mu: FedProx's proximal term cannot be trained with DP-SGD")
            self._optimizer, self.train_loader, self.privacy, self._dp_hooks = make_private(
                self.model,
                self._new_optimizer(),
                train,
                dp,
                local_epochs=local_epochs,
                noise_seed=dp_noise_seed,
            )

    @property
    def num_samples(self) -> int:
        """Number of local training samples."""
        return len(self.train_loader.dataset)  # type: ignore[arg-type]

    def get_weights(self) -> dict[str, np.ndarray]:
        """Return contiguous numpy copies of the state dict (parameters and buffers)."""
        with self._lock:
            return {
                name: np.array(t.detach().cpu().contiguous().numpy(), copy=True, order="C")
                for name, t in self.model.state_dict().items()
            }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights; all-or-nothing: ValueError naming the tensor on a name/shape mismatch."""
        with self._lock:
            state = self.model.state_dict()
            missing = sorted(set(state) - set(weights))
            unexpected = sorted(set(weights) - set(state))
            if missing or unexpected:
                raise ValueError(
                    f"weights do not match the model: missing {missing}, unexpected {unexpected}"
                )
            for name, target in state.items():
                shape = tuple(np.shape(weights[name]))
                if shape != tuple(target.shape):
                    raise ValueError(
                        f"tensor {name!r} has shape {shape}, model expects {tuple(target.shape)}"
                    )
            with torch.no_grad():
                for name, target in state.items():
                    # torch.tensor copies, so read-only arrays (decoded from bytes) are fine.
                    target.copy_(torch.tensor(np.asarray(weights[name])))

    def prepare(self) -> None:
        """Make the optimizer now if it is not made yet (training is about to start)."""
        with self._lock:
            if self._optimizer is None:
                self._optimizer = self._new_optimizer()

    def reset_optimizer(self) -> None:
        """Drop optimizer state (momentum buffers, Adam moments and step counts)."""
        with self._lock:
            if self.privacy is not None and self._optimizer is not None:
                # The DP optimizer wraps this one (and feeds the accountant): keep it, drop
                # only its state, which is all a new optimizer would differ in.
                self._optimizer.state.clear()
                return
            self._optimizer = None  # the next fit starts a fresh one

    def fit(self) -> FitResult:
        """Train `local_epochs` epochs over the local training data.

        With DP, a fit that would spend past the budget is refused: the model stays as it is
        and the result counts no samples (the first refusal is logged as a warning).
        """
        with self._lock:
            start = time.perf_counter()
            if self.privacy is not None and not self.privacy.allows_fit():
                if not self._refused:
                    self._refused = True
                    log.warning(
                        "privacy budget spent: epsilon=%.3f of %g (delta=%g); one more fit "
                        "would take it to %.3f, so this node trains no more",
                        self.privacy.spent,
                        self.privacy.epsilon,
                        self.privacy.delta,
                        self.privacy.spent_after(1),
                    )
                return FitResult(float("nan"), 0, time.perf_counter() - start)
            if self._optimizer is None:
                self._optimizer = self._new_optimizer()
            optimizer = self._optimizer
            self.model.train()
            params = [p for p in self.model.parameters() if p.requires_grad]
            anchor = [p.detach().clone() for p in params] if self.mu > 0 else []
            samples = 0
            epoch_loss, epoch_samples = 0.0, 0
            for _ in range(self.local_epochs):
                epoch_loss, epoch_samples = 0.0, 0
                for xb, yb in self.train_loader:
                    x, y = xb.to(self.device), yb.to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    # Poisson sampling (DP) may draw an empty batch: its step is still taken
                    # (the noise and the accountant count it), its loss is not averaged in.
                    data_loss = F.cross_entropy(self.model(x), y)
                    loss = data_loss
                    if anchor:
                        prox = sum(
                            ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                        )
                        loss = loss + 0.5 * self.mu * prox
                    loss.backward()
                    if self.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                    optimizer.step()
                    if len(y):
                        epoch_loss += data_loss.item() * len(y)
                        epoch_samples += len(y)
                samples += epoch_samples
            mean = epoch_loss / epoch_samples if epoch_samples else float("nan")
            return FitResult(mean, samples, time.perf_counter() - start)

    def evaluate(self) -> EvalResult:
        """Loss, accuracy and confusion matrix (rows true, columns predicted) on the test data."""
        with self._lock:
            start_mode = self.model.training
            self.model.eval()
            k = self.n_classes
            confusion = np.zeros(k * k, dtype=np.int64)
            total_loss, total = 0.0, 0
            try:
                with torch.no_grad():
                    for xb, yb in self.test_loader:
                        x, y = xb.to(self.device), yb.to(self.device)
                        logits = self.model(x)
                        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                        truth = y.cpu().numpy()
                        if truth.size and (truth.min() < 0 or truth.max() >= k):
                            raise ValueError(f"test labels outside [0, {k})")
                        pred = logits.argmax(dim=1).cpu().numpy()
                        confusion += np.bincount(truth * k + pred, minlength=k * k)
                        total += len(truth)
            finally:
                self.model.train(start_mode)
            matrix = confusion.reshape(k, k)
            if total == 0:
                return EvalResult(float("nan"), float("nan"), 0, matrix)
            accuracy = float(np.trace(matrix)) / total
            return EvalResult(total_loss / total, accuracy, total, matrix)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def _seed_sampler(loader: DataLoader[tuple[torch.Tensor, ...]], seed: int) -> None:
    """Make a shuffling loader's batch order a function of `seed`."""
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if isinstance(sampler, RandomSampler):
        sampler.generator = torch.Generator().manual_seed(seed)


def make_loaders(
    dataset: Dataset,
    indices: np.ndarray | None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    test_indices: np.ndarray | None = None,
    test_batch_size: int = 1024,
) -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    """Loaders over the chosen training (and test) samples; None means all of them.

    The training order comes from a `torch.Generator` seeded with `seed`, not from torch's
    global generator, so runs are reproducible and peers in one process do not disturb
    each other.
    """

    def tensors(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> TensorDataset:
        if idx is not None:
            x, y = x[idx], y[idx]
        return _Rows(torch.tensor(x), torch.tensor(y))

    train = DataLoader(
        tensors(dataset.x_train, dataset.y_train, indices),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_as_fetched,
    )
    test = DataLoader(
        tensors(dataset.x_test, dataset.y_test, test_indices),
        batch_size=test_batch_size,
        collate_fn=_as_fetched,
    )
    return train, test


class _Rows(TensorDataset):
    """A `TensorDataset` that fetches a batch with one indexing op per tensor.

    The DataLoader's default fetches each sample on its own and stacks them again: for a small
    model that Python work costs more than the training step (and holds the GIL that the
    simulator's event loop needs). The batches are the same tensors, in the same order; an
    Opacus Poisson loader (DP) fetches through here too.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[rows] for t in self.tensors)


def _as_fetched(batch: Any) -> Any:
    """The collate step of a `_Rows` loader: `__getitems__` made the batch (a tuple of
    tensors) already."""
    return batch


class LearnerOptions(TypedDict, total=False):
    """Training options `build_learner` passes through to `TorchLearner`."""

    optimizer: OptimizerName
    lr: float
    momentum: float
    weight_decay: float
    local_epochs: int
    mu: float
    max_grad_norm: float
    device: str | torch.device
    dp: DPSettings | None
    dp_noise_seed: int | None


def build_learner(
    model_name: str,
    dataset: Dataset,
    indices: np.ndarray | None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    init_seed: int | None = None,
    test_indices: np.ndarray | None = None,
    **opts: Unpack[LearnerOptions],
) -> TorchLearner:
    """Build a model and loaders for a slice of `dataset` and wrap them in a `TorchLearner`.

    `seed` fixes the batch order; `init_seed` (default: `seed`) fixes the initial weights, so
    peers given the same `init_seed` start from the same model.
    """
    model = build_model(
        model_name,
        dataset.in_shape,
        dataset.n_classes,
        seed=seed if init_seed is None else init_seed,
    )
    train, test = make_loaders(
        dataset, indices, batch_size=batch_size, seed=seed, test_indices=test_indices
    )
    return TorchLearner(model, train, test, n_classes=dataset.n_classes, **opts)


def learner_from_config(
    config: NodeConfig,
    dataset: Dataset,
    indices: np.ndarray | None,
    *,
    dp_noise_seed: int | None = None,
) -> TorchLearner:
    """The learner a node config describes, on `indices` of `dataset` (daemon and simulator).

    With `dp_epsilon` set, DP-SGD budgeted for `rounds` fits; `dp_noise_seed` None draws the
    noise from the OS (the daemon), the simulator passes one to be reproducible.
    """
    dp = None
    if config.dp_epsilon is not None:
        dp = DPSettings(
            epsilon=config.dp_epsilon,
            delta=config.dp_delta,
            max_grad_norm=config.dp_max_grad_norm,
            planned_fits=config.rounds,
        )
    return build_learner(
        config.model,
        dataset,
        indices,
        batch_size=config.batch_size,
        # Same seed on every node: identical initial models, so early averaging is not harmful.
        init_seed=config.seed,
        seed=config.seed * 1000 + config.partition_index,
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        local_epochs=config.local_epochs,
        mu=config.mu,
        max_grad_norm=config.max_grad_norm,
        dp=dp,
        dp_noise_seed=dp_noise_seed,
    )
