"""What a node keeps in its state dir to come back after a restart: its newest usable
checkpoint and what it spent of its DP budget.

The plain functions block (files, torch): `Node` calls them in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from p2pfl.config import NodeConfig
from p2pfl.learning.learner import FitResult, Learner, PrivacyAccount
from p2pfl.protocol.model import ExpectedSpec
from p2pfl.store import StateDir, StateDirError

log = logging.getLogger(__name__)


async def resume(state: StateDir, learner: Learner, layout: ExpectedSpec) -> int | None:
    """Load the newest checkpoint that fits the model into `learner`; its round, or None.

    A checkpoint of another layout, or one holding NaN/Inf, is refused by the state dir and an
    older one tried.
    """
    ckpt = await asyncio.to_thread(state.latest_checkpoint, layout)
    if ckpt is None:
        return None
    await asyncio.to_thread(learner.set_weights, ckpt.weights)
    log.info("resumed from checkpoint round=%d", ckpt.round)
    return ckpt.round


def restore_privacy(state: StateDir | None, privacy: PrivacyAccount) -> float:
    """Take over what an earlier run of this node spent (its state dir's record); the epsilon
    spent."""
    if state is None:
        return privacy.spent
    record = state.load_privacy()
    if record is not None:
        try:
            privacy.restore(record)
        except (ValueError, TypeError) as exc:
            raise StateDirError(f"cannot use {state.privacy_path}: {exc}") from None
        log.info("privacy budget resumed epsilon=%.3f of %g", privacy.spent, privacy.epsilon)
    return privacy.spent


def fit(learner: Learner, privacy: PrivacyAccount | None, state: StateDir | None) -> FitResult:
    """Train once. With DP, what the fit will spend is written down first: a node killed after
    sending this fit's model must not forget it on restart."""
    if privacy is not None and state is not None and privacy.allows_fit():
        state.save_privacy(privacy.record(fits_ahead=1))
    return learner.fit()


async def save_checkpoint(
    state: StateDir, learner: Learner, round: int, meta: Mapping[str, Any] | None = None
) -> None:
    """After a round: the model, as the checkpoint of `round` (with `meta`, e.g. its spec)."""
    # Copying the model is work too: do it in the worker thread, not on the loop.
    await asyncio.to_thread(lambda: state.save_checkpoint(round, learner.get_weights(), meta))


def checkpoint_meta(config: NodeConfig) -> dict[str, Any]:
    """What a checkpoint records besides its weights: what builds the model (`p2pfl export`
    writes it into the exported file) and the run (a node's: `RunIdentity.checkpoint_meta`)."""
    spec = {"model": config.model, "dataset": config.dataset, "seed": config.seed}
    return {"spec": spec, "run": config.run_name}
