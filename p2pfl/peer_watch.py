"""Whether a node has the peers it should: it waits for them at the start (until they train
without it), and warns once per stretch of rounds without any, with the likely cause
(`Membership.diagnose`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView

log = logging.getLogger(__name__)

LONELY_ROUNDS = 3
"""Rounds without any live peer after which a node warns that it trains alone."""


class PeerWatch:
    """Waits for a node's expected peers at the start; notices when it trains alone."""

    def __init__(
        self,
        config: NodeConfig,
        view: PeerView,
        membership: Membership,
        *,
        node_id: str,
        stop: asyncio.Event,
        clock: Callable[[], float],
        peers_train: Callable[[], bool],
    ) -> None:
        self.config, self.view, self.membership = config, view, membership
        self.node_id, self.stop, self.clock = node_id, stop, clock
        self.peers_train = peers_train
        self._alone_rounds = 0  # consecutive rounds without a live peer

    async def wait_for_peers(self) -> None:
        """Sync mode starts together: wait for the expected peers, at most one round timeout,
        and no longer than until peers train without us (`peers_train`): a peer still missing
        then may have finished its rounds and left before its presence reached us, and waiting
        for it would only keep the others waiting for our models."""
        wanted = self.config.min_peers
        if wanted is None:
            static = {p.id for p in self.config.peers} - {self.node_id}
            wanted = len(static) if self.config.mode == "sync" or self.config.walkers else 0
        if wanted <= 0:
            return
        deadline = self.clock() + self.config.round_timeout
        # The view is polled (it needs no loop): often at first, when peers start together,
        # then every half second, so a node left waiting costs next to no CPU.
        pause = 0.05
        while (
            len(self.view.live()) < wanted
            and self.clock() < deadline
            and not self.stopping
            and not self.peers_train()
        ):
            try:
                async with asyncio.timeout(pause):
                    await self.stop.wait()
            except TimeoutError:
                pass
            pause = min(pause * 1.5, 0.5)
        if self.membership.sampled:
            await self._settle(deadline)
        live = len(self.view.live())
        if live >= wanted or self.stopping:
            log.info("starting with peers=%d wanted=%d", live, wanted)
            return
        why = (
            ": peers train already"
            if self.peers_train()
            else f" after {self.config.round_timeout:g}s"
        )
        log.warning(
            "starting with peers=%d wanted=%d%s: %s",
            live,
            wanted,
            why,
            await self.membership.diagnose(),
        )
        if live == 0:
            self._alone_rounds = LONELY_ROUNDS  # said already: not again in this stretch

    async def _settle(self, deadline: float) -> None:
        """A sampled view: wait (until ``deadline``) for the ring neighbours to stop changing
        (`Sampler.settled`), so that sync neighbours agree on who sends to whom from round 1."""
        while not self.membership.settled() and self.clock() < deadline and not self.stopping:
            try:
                async with asyncio.timeout(0.5):
                    await self.stop.wait()
            except TimeoutError:
                pass

    async def after_round(self, peers: int) -> None:
        """Warn once per lonely stretch: a node with no live peer for some rounds shares
        nothing, and users should not learn that from an accuracy figure."""
        if peers:
            self._alone_rounds = 0
            return
        self._alone_rounds += 1
        if self._alone_rounds == LONELY_ROUNDS:
            log.warning(
                "no live peer for %d rounds, training alone: %s",
                LONELY_ROUNDS,
                await self.membership.diagnose(),
            )

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()
