"""Differential privacy for local training: DP-SGD through Opacus, budgeted for the whole run.

DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy", CCS) clips each
sample's gradient to a norm C and adds Gaussian noise of standard deviation sigma * C to the
sum of a Poisson-sampled batch. Opacus does the per-sample gradients, clipping, noise and
sampling; its RDP accountant (Mironov 2017, "Renyi differential privacy", CSF) adds up what
each step spends.

A node's budget (epsilon, delta) covers its *whole planned run*: `calibrate` picks sigma with
Opacus's `get_noise_multiplier` for rounds x local_epochs epochs at the node's own sample rate
(batch size / local samples), so the run ends at most at epsilon whatever its peers do. Every
model a node sends is computed from those noisy steps (and from peers' models), so what peers,
brokers and monitors see is post-processing and costs nothing more. A fit that would take the
accountant past epsilon is refused (`PrivacyBudget.allows_fit`).

Opacus is imported only when a learner is made private: it costs half a second at import.
Epsilon is Opacus's RDP arithmetic (`compute_rdp`, `get_privacy_spent`, the accountant's
orders), with the per-step RDP of each (noise, sample rate) kept: RDP adds up linearly over
steps, so a round's check costs microseconds instead of the accountant's 0.1 s.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["DPSettings", "PrivacyBudget", "PrivacyError", "check_private_model", "make_private"]


class PrivacyError(ValueError):
    """Settings DP-SGD cannot work with; the message names the config key."""


@dataclass(frozen=True)
class DPSettings:
    """A node's privacy budget and clipping norm, and how many fits its run plans."""

    epsilon: float
    delta: float
    max_grad_norm: float
    planned_fits: int  # rounds: each fit is local_epochs epochs

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise PrivacyError(f"dp_epsilon: must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"dp_delta: must be in (0, 1), got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise PrivacyError(f"dp_max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.planned_fits < 1:
            raise PrivacyError(
                "rounds: a privacy budget needs a planned number of rounds (the noise is "
                "calibrated for rounds x local_epochs epochs); set rounds > 0"
            )


class PrivacyBudget:
    """What one node may spend on its own samples, and what its RDP accountant says it spent.

    Used from the learner's worker thread (fit, restore) and read for reports; the history is
    a short list of (noise multiplier, sample rate, steps), replaced whole, never mutated in
    place by readers.
    """

    def __init__(
        self,
        epsilon: float,
        delta: float,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps_per_fit: int,
    ) -> None:
        from opacus.accountants import RDPAccountant

        self.epsilon = epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.steps_per_fit = steps_per_fit
        self.accountant = RDPAccountant()

    @classmethod
    def calibrate(
        cls, settings: DPSettings, *, sample_rate: float, steps_per_fit: int
    ) -> PrivacyBudget:
        """The smallest noise (within Opacus's tolerance) that keeps the planned run's
        epsilon at or below the budget."""
        from opacus.accountants.utils import get_noise_multiplier

        steps = settings.planned_fits * steps_per_fit
        _quiet_opacus()
        try:
            sigma = get_noise_multiplier(
                target_epsilon=settings.epsilon,
                target_delta=settings.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        except ValueError as exc:  # Opacus: "The privacy budget is too low."
            raise PrivacyError(
                f"dp_epsilon: {settings.epsilon} is too small for {steps} DP-SGD steps at "
                f"sample rate {sample_rate:.3g} ({exc})"
            ) from None
        return cls(
            settings.epsilon,
            settings.delta,
            noise_multiplier=float(sigma),
            sample_rate=sample_rate,
            steps_per_fit=steps_per_fit,
        )

    @property
    def spent(self) -> float:
        """Epsilon spent so far (at this budget's delta); 0 before the first step."""
        return self._epsilon(self.accountant.history)

    def spent_after(self, fits: int) -> float:
        """Epsilon spent once `fits` more fits have run."""
        return self._epsilon(self._history_after(fits))

    def allows_fit(self) -> bool:
        """Whether one more fit keeps the total within the budget."""
        return self.spent_after(1) <= self.epsilon

    def record(self, *, fits_ahead: int = 0) -> dict[str, Any]:
        """The accountant's history as JSON-able data, counting `fits_ahead` fits not run yet."""
        history = self._history_after(fits_ahead)
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "spent": self._epsilon(history),
            "history": [[float(s), float(q), int(n)] for s, q, n in history],
        }

    def restore(self, record: Mapping[str, Any]) -> None:
        """Continue from a `record` (a restarted node): what it spent before still counts.

        ValueError when the record is not a history of (noise, sample rate, steps) triples.
        """
        raw = record.get("history")
        if not isinstance(raw, list):
            raise ValueError("privacy record has no history list")
        history: list[tuple[float, float, int]] = []
        for item in raw:
            if not isinstance(item, Sequence) or len(item) != 3:
                raise ValueError(f"bad privacy history entry {item!r}")
            sigma, q, n = float(item[0]), float(item[1]), int(item[2])
            if not (sigma > 0 and 0 < q <= 1 and n >= 0):
                raise ValueError(f"bad privacy history entry {item!r}")
            history.append((sigma, q, n))
        self.accountant.history = history

    def _history_after(self, fits: int) -> list[tuple[float, float, int]]:
        history = list(self.accountant.history)
        steps = fits * self.steps_per_fit
        if steps <= 0:
            return history
        entry = (self.noise_multiplier, self.sample_rate)
        if history and history[-1][:2] == entry:  # as the accountant merges equal steps
            history[-1] = (*entry, history[-1][2] + steps)
        else:
            history.append((*entry, steps))
        return history

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        """What `RDPAccountant.get_epsilon` says for `history`, from cached per-step RDP."""
        if not history:
            return 0.0
        from opacus.accountants.analysis.rdp import get_privacy_spent

        orders = _orders()
        rdp = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in history)
        _quiet_opacus()
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=self.delta)
        return float(eps)


def _quiet_opacus() -> None:
    """Silence Opacus's expected warnings, process-wide (`warnings.catch_warnings` is not
    thread-safe, and fits run in worker threads): its secure RNG is off (the noise is seeded
    from the OS instead, see `make_private`), the best RDP order of a tiny epsilon is the
    largest one tried, and torch's full backward hooks fire on outputs."""
    for message in (
        "Secure RNG turned off",
        "Optimal order is the largest alpha",
        "Full backward hook is firing",
    ):
        warnings.filterwarnings("ignore", message, UserWarning)


@functools.cache
def _orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, sample_rate: float) -> Any:
    """RDP of one sampled Gaussian step at every order (an array; steps multiply it)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=list(_orders()))


def check_private_model(model: nn.Module) -> None:
    """PrivacyError naming what Opacus cannot train privately (e.g. BatchNorm)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]
        hint = " (use GroupNorm or LayerNorm instead)" if "BatchNorm" in first else ""
        raise PrivacyError(f"dp_epsilon: this model cannot be trained with DP-SGD: {first}{hint}")


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    settings: DPSettings,
    *,
    local_epochs: int,
    noise_seed: int | None = None,
) -> tuple[torch.optim.Optimizer, DataLoader[tuple[torch.Tensor, ...]], PrivacyBudget, Any]:
    """Make `model`'s training DP-SGD: returns (DP optimizer, Poisson loader, budget, hooks).

    The model is not wrapped (Opacus's hooks mode, `wrap_model=False`): its state dict keeps
    its own names, so weights travel and merge exactly as on a node without DP, and loading
    weights into it is loading them into what trains. `noise_seed` None draws the noise seed
    from the OS (`p2pfl run`: a seed peers could guess would let them subtract the noise);
    the simulator passes one, for reproducible runs. The hooks object is kept only to hold
    the per-sample gradient hooks alive.
    """
    from opacus import PrivacyEngine

    _quiet_opacus()
    check_private_model(model)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise PrivacyError("dp_epsilon: this node has no training samples to train privately")
    sample_rate = 1 / steps_per_epoch  # what Opacus's Poisson loader samples at
    budget = PrivacyBudget.calibrate(
        settings, sample_rate=sample_rate, steps_per_fit=local_epochs * steps_per_epoch
    )
    seed = secrets.randbits(63) if noise_seed is None else noise_seed
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = budget.accountant  # one accountant: the optimizer's hook feeds it
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=budget.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(seed),
        wrap_model=False,
    )
    return dp_optimizer, dp_loader, budget, hooks
