"""Whether a node trains now: a pause by hand (`p2pfl pause`), and eligibility (`--when`).

`Pausing` keeps both and says why the node does not train (`reason`). `Node` asks at each round
boundary (`hold`): a paused node stops training and sending, says so in its presence (peers
then plan no rounds with it and sync peers do not wait for it), drops the models that come
(`Inbox.paused`), re-checks every few seconds, and when it may train again adopts the round its
peers reached.

A `resume()` by hand also overrides eligibility: the node trains although `--when` says no,
until the conditions next turn eligible (from then on they rule again) or the next `pause()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from p2pfl.config import NodeConfig
from p2pfl.eligibility import CHECK_INTERVAL, MAX_REASON, Eligibility, parse_when, rest_after_fit

log = logging.getLogger(__name__)


class Pausing:
    """Why the node does not train now, from a hold by hand and `--when`'s conditions."""

    def __init__(
        self,
        eligible: Callable[[], str | None] | None,
        *,
        max_cpu: float | None = None,
        interval: float = CHECK_INTERVAL,
        blocking: bool = True,
    ) -> None:
        """``eligible`` says why the node may not train now (None: it may); ``blocking``: it
        may block, so it is called off the loop. None: no conditions, only pauses by hand."""
        self.eligible = eligible
        self.blocking = blocking
        self.max_cpu = max_cpu
        self.interval = interval
        self.held: str | None = None
        self.active: str | None = None  # the reason while the node holds at a round boundary
        self.ineligible: str | None = None  # the last check's reason
        self.overridden = False  # resume() by hand while ineligible
        self.changed = asyncio.Event()  # a pause or resume by hand: check again at once

    @classmethod
    def of(cls, config: NodeConfig, eligible: Callable[[], str | None] | None = None) -> Pausing:
        """A node's pausing: ``eligible``, or else the conditions of ``config.when``."""
        conditions = parse_when(config.when)
        if eligible is not None:  # the simulator's script: cheap, read on the loop
            return cls(eligible, max_cpu=conditions.max_cpu, blocking=False)
        if conditions.any:
            eligible = Eligibility(conditions, config.metered_interfaces).check
        return cls(eligible, max_cpu=conditions.max_cpu)

    @property
    def reason(self) -> str | None:
        """Why the node does not train now (``manual``, ``window``, ...), or None."""
        if self.held is not None:
            return self.held
        return None if self.overridden else self.ineligible

    def pause(self, reason: str) -> None:
        clean = "".join(c for c in reason if c.isascii() and c.isprintable())[:MAX_REASON]
        self.held = clean or "manual"
        self.overridden = False
        self.changed.set()

    def resume(self) -> None:
        self.held = None
        self.overridden = self.ineligible is not None
        self.changed.set()

    async def check(self) -> str | None:
        """Read the conditions again (off the loop: nmcli may be slow); the reason now."""
        if self.eligible is not None:
            blocking = self.blocking
            self.ineligible = (
                await asyncio.to_thread(self.eligible) if blocking else self.eligible()
            )
            if self.ineligible is None:
                self.overridden = False  # eligible again: the conditions rule from now on
        return self.reason

    async def hold(
        self, announce: Callable[[], Awaitable[None]], stopping: Callable[[], bool]
    ) -> bool:
        """At a round boundary: while paused, wait (re-checking), announcing each change of
        reason; True when the node was paused: it then catches up with its peers and
        announces itself (not paused, at its new round)."""
        reason = await self.check()
        if reason is None:
            return False
        said: str | None = None
        while reason is not None and not stopping():
            if reason != said:
                log.info("paused: %s (next check in %g s)", reason, self.interval)
                said = self.active = reason
                await announce()
            self.changed.clear()
            try:
                async with asyncio.timeout(self.interval):
                    await self.changed.wait()
            except TimeoutError:
                pass
            reason = await self.check()
        self.active = None
        if not stopping():
            log.info("resumed")
        return True

    def rest(self, fit_seconds: float) -> float:
        """Seconds to rest after a fit (``max-cpu``), so training takes that share of time."""
        return rest_after_fit(fit_seconds, self.max_cpu)
