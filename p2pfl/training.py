"""A node's local step: fit (spending its DP budget), rest (``max_cpu``), encode the model to
share, and mask it for secure aggregation.

A model whose training diverged (NaN/inf) is not shared, since peers would refuse it: the node
falls back to its last good model, so neighbours waiting for it in sync mode are not left to
time out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

import numpy as np

from p2pfl import resume
from p2pfl.inbox import NodeCounters
from p2pfl.learning.learner import FitResult, Learner, privacy_of
from p2pfl.pausing import Pausing
from p2pfl.secure_round import SecureAggregation
from p2pfl.store import StateDir
from p2pfl.transport.base import Payload

log = logging.getLogger(__name__)


class Trained(NamedTuple):
    """A round's training: the fit, the model to share, and its payload (None: none to send)."""

    fit: FitResult
    weights: dict[str, np.ndarray]
    payload: Payload | None


class LocalTraining:
    """Trains a node's learner once per round and makes the payload it shares."""

    def __init__(
        self,
        learner: Learner,
        *,
        state: StateDir | None,
        counters: NodeCounters,
        pausing: Pausing,
        encode: Callable[[Mapping[str, np.ndarray], int, float], Payload],
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
    ) -> None:
        self.learner, self.state, self.counters, self.pausing = learner, state, counters, pausing
        self.encode, self.sleep, self.stopping = encode, sleep, stopping
        self.secure: SecureAggregation | None = None
        # DP: the learner's budget; `epsilon` is what it spent, as of the last fit.
        self.privacy = privacy_of(learner)
        self.epsilon: float | None = None
        self.last_loss: float | None = None
        self.last_good: dict[str, np.ndarray] | None = None

    async def begin(self, weights: dict[str, np.ndarray]) -> None:
        """Start from `weights` (fresh or resumed), with what earlier runs spent of the budget."""
        if self.privacy is not None:
            self.epsilon = await asyncio.to_thread(resume.restore_privacy, self.state, self.privacy)
        self.last_good = weights

    async def train(self, r: int) -> Trained | None:
        """Train for round `r`; None when the node stopped meanwhile."""
        fit = await asyncio.to_thread(resume.fit, self.learner, self.privacy, self.state)
        if self.privacy is not None:
            self.epsilon = self.privacy.spent
        await self.sleep(self.pausing.rest(fit.seconds))  # max-cpu
        if self.stopping():
            return None
        weights = await asyncio.to_thread(self.learner.get_weights)
        payload: Payload | None = None
        try:
            payload = await asyncio.to_thread(self.encode, weights, r, fit.samples)
            self.last_good = weights
        except ValueError as exc:
            self.counters.diverged += 1
            log.error("local model diverged round=%d reason=%s", r, exc)
            if self.last_good is not None:
                weights = self.last_good
                await asyncio.to_thread(self.learner.set_weights, weights)
                payload = await asyncio.to_thread(self.encode, weights, r, fit.samples)
        if self.secure is not None and payload is not None:
            try:
                await self.secure.start_round(r, weights, float(fit.samples))
            except ValueError as exc:  # values too large for fixed point: nothing to send
                log.error("cannot mask the model round=%d reason=%s", r, exc)
                payload = None
        self.last_loss = fit.loss
        return Trained(fit, weights, payload)
