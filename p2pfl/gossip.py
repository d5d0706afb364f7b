"""A round's exchange of models: who this node sends to and expects from, sending its model,
waiting for its peers' (sync mode), merging what came, and the rounds a model may claim.

`Node` owns one `Gossip` and drives it round by round; the round number stays the node's
(`current_round`), which it moves from what `merge_received` adopted. With secure aggregation
the models sent and merged are masked (`p2pfl.secure_round`), which `Node` sets as `secure`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.learning.learner import Learner
from p2pfl.learning.merge import Merge
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.envelope import Signer
from p2pfl.protocol.model import encode_model
from p2pfl.secure_round import SecureAggregation
from p2pfl.topology import Schedule
from p2pfl.transport.base import Payload, Transport, TransportError

log = logging.getLogger(__name__)

# Seconds a sync node still waits for a peer's round-r model once the peer's presence says it
# is past round r (see `Gossip._still_coming`).
SKIPPED_GRACE = 2.0


class Gossip:
    """Sends this node's model to its round's targets and merges the models it takes in."""

    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        *,
        node_id: str,
        view: PeerView,
        membership: Membership,
        inbox: Inbox,
        schedule: Schedule,
        learner: Learner,
        merge: Merge,
        counters: NodeCounters,
        signer: Signer | None,
        next_seq: Callable[[], int],
        current_round: Callable[[], int],
        stopping: Callable[[], bool],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.net = config.network
        self.transport = transport
        self.node_id = node_id
        self.view, self.membership, self.inbox = view, membership, inbox
        self.schedule, self.learner, self.merge = schedule, learner, merge
        self.counters, self.signer = counters, signer
        self.secure: SecureAggregation | None = None
        self._next_seq = next_seq
        self._current_round = current_round
        self._stopping = stopping
        self.clock = clock
        self._inbox_topic = topics.inbox(self.net, node_id)
        self._ceiling: tuple[tuple[int, int, int], int] | None = None

    # ---- the round's plan --------------------------------------------------------------------

    def round_view(self, r: int) -> list[str]:
        """The peers of round `r`'s plan: the live ones that are not paused, and in sync mode
        those that finished round `r` and left or paused after it."""
        live = self.view.training()
        if self.config.mode != "sync":
            return live
        # A peer that finished round r and left (or paused) already did its part in round r:
        # keep it in round r's plan so its departure does not reshuffle who merges what (a
        # re-planned peer would wait for a model of round r that nobody sends any more).
        done = {p for p, last in self.membership.finished.items() if last >= r}
        for p in self.view.live():
            info = self.view.get(p)
            if info is not None and info.paused is not None and (info.round or 0) >= r:
                done.add(p)
        extra = done.difference(live)
        return sorted([*live, *extra]) if extra else live

    def plan_targets(
        self, r: int, live: list[str] | None = None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Whom to send round `r`'s model to, and whose round-`r` models to expect (`live`:
        round `r`'s view when the caller has it already)."""
        live = self.round_view(r) if live is None else live
        plan = self.schedule.plan(self.node_id, live, r)
        expect = plan.expect_from
        if self.config.mode == "sync" and self.schedule.name == "random-walk":
            # Random walk expects nobody by itself; but every peer's pick is a pure function of
            # (its id, the view, the round), so a sync node knows who will send to it.
            members = [self.node_id, *live]
            expect = tuple(
                p for p in live if self.node_id in self.schedule.plan(p, members, r).send_to
            )
        return plan.send_to, expect

    # ---- sending ------------------------------------------------------------------------------

    def encode(self, weights: Mapping[str, np.ndarray], r: int, age: float) -> Payload:
        """This node's model of round `r`, as sent (signed unless the network is open)."""
        return encode_model(
            dict(weights),
            net=self.net,
            src=self.node_id,
            seq=self._next_seq(),
            round=r,
            age=age,
            codec=self.config.codec,
            signer=self.signer,
        )

    async def send_planned(self, r: int, payload: Payload, sent: set[str]) -> None:
        """Send round `r`'s model to the planned targets not in `sent`, adding them to it."""
        send_to, _ = self.plan_targets(r)
        for target in send_to:
            info = self.view.get(target)
            if info is None:  # gone, or finished (it has no use for our model any more)
                continue
            if self.secure is not None:
                # Masked per target; None: it has ours already, or not yet possible
                masked = await self.secure.payload_for(target, r, sent)
                if masked is None:
                    continue
                payload = masked
            elif target in sent:
                continue
            sent.add(target)
            await self.send(target, info.broker, payload)

    async def send(self, target: str, broker: str, payload: Payload) -> None:
        """A model to a peer's inbox on its home broker, in chunks when large."""
        topic = topics.inbox(self.net, target)
        seq = self._next_seq()
        parts = chunking.split(
            payload,
            max_chunk=self.config.max_chunk,
            transfer_id=f"{self.node_id}-{seq}",
            net=self.net,
            src=self.node_id,
            seq=seq,
            signer=self.signer,
        )
        for part in parts:
            if isinstance(part, memoryview):
                part = bytes(part)
            try:
                await self.transport.publish(
                    topic, part, qos=1, broker=self.membership.route(broker)
                )
            except (ValueError, TransportError) as exc:
                log.warning("cannot send to peer=%s broker=%s error=%s", target, broker, exc)
                return
            self.counters.bytes_sent += len(part)
        self.counters.models_sent += 1

    async def send_control(self, target: str, payload: bytes) -> bool:
        """A small message (not a model) to a peer's inbox; False when it was not sent."""
        info = self.view.get(target)
        if info is None:
            return False
        try:
            await self.transport.publish(
                topics.inbox(self.net, target), payload, qos=1,
                broker=self.membership.route(info.broker),
            )  # fmt: skip
        except (ValueError, TransportError) as exc:
            log.warning("cannot send to peer=%s error=%s", target, exc)
            return False
        self.counters.bytes_sent += len(payload)
        return True

    # ---- receiving ----------------------------------------------------------------------------

    async def receive_loop(self) -> None:
        """Models (and control messages) to the inbox; presence and the rest to membership."""
        async for message in self.transport.messages():
            self.counters.bytes_received += len(message.payload)
            if message.topic == self._inbox_topic:
                lowest = self._current_round() - self.config.max_round_lag
                await self.inbox.accept(
                    message.payload, lowest=lowest, highest=self.round_ceiling()
                )
            else:
                self.counters.membership_received += 1
                await self.membership.on_message(message)

    async def wait_for_round(self, r: int, payload: Payload, sent: set[str]) -> None:
        """Sync mode: wait for the expected senders' round-r models, re-planning on view changes."""
        deadline = self.clock() + self.config.round_timeout
        view_version = self.view.version
        members = self.round_view(r)
        _, first = self.plan_targets(r, members)
        past: dict[str, float] = {}  # expected senders whose presence says they left round r
        while not self._stopping():
            live = self.round_view(r)
            _, expect = self.plan_targets(r, live)
            if set(members) <= set(live):
                # Nobody left, but a peer may have joined or resumed: the senders the new plan
                # adds sent their round-r model as planned before (or come back past round r),
                # so only the ones expected from the start are waited for. A departure re-plans
                # in full: the departed sender's successor sends to us instead.
                expect = tuple(p for p in expect if p in first)
            if self.secure is None:
                missing = [p for p in expect if self.inbox.newest_round(p) < r]
                missing = self._still_coming(missing, r, past)
            else:  # masked for the senders we expect now: a sender that left, re-planned
                missing = self.secure.missing(expect, r, self.inbox.model)
            if not missing:
                return
            remaining = deadline - self.clock()
            if remaining <= 0:
                log.info("round timeout round=%d missing=%s", r, ",".join(missing))
                return
            self.inbox.arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self.inbox.arrived.wait()
            except TimeoutError:
                pass
            if self.view.version != view_version:
                # A neighbour joined or left: our new successor may not have our model yet.
                view_version = self.view.version
                await self.send_planned(r, payload, sent)

    def _still_coming(self, missing: list[str], r: int, past: dict[str, float]) -> list[str]:
        """The missing senders whose round-r model may still come: not one whose presence (or
        bye) has said for `SKIPPED_GRACE` s that it is past round r (it resumed from a pause at
        a later round and will not send round r; its model of a round it did train was sent
        before its presence moved on, so the grace only covers a late delivery)."""
        now = self.clock()
        coming = []
        for p in missing:
            info = self.view.get(p)
            said = info.round if info is not None else self.membership.finished.get(p)
            if said is not None and said >= r and now - past.setdefault(p, now) >= SKIPPED_GRACE:
                continue
            coming.append(p)
        return coming

    async def merge_received(
        self, own: dict[str, np.ndarray], r: int, own_age: float
    ) -> tuple[int, int]:
        """Merge round `r`'s models that came into ours: how many, and the round the node has
        caught up to (0: none)."""
        # Only peers of the view get a model merged: not one that left or was never admitted
        # (its presence still being dialled when the model came, then refused). A peer that
        # finished its rounds and said bye is the exception: sync rounds up to its last
        # counted on its model.
        live = set(self.view.live())
        finished = self.membership.finished
        # Sync: whose round-r model we waited for; one that never came means we fell behind.
        expected = self.plan_targets(r)[1] if self.config.mode == "sync" else ()
        taken = self.inbox.take(r, expected)
        fresh = [m for m in taken if m.src in live or m.src in finished]
        if self.secure is not None:
            merged_masked, count = await self.secure.merge(own, r, fresh)
            if merged_masked is None:
                return count, 0
            await asyncio.to_thread(self.learner.set_weights, merged_masked)
            return count, r - 1
        if not fresh:
            return 0, 0
        models = [own, *(m.weights for m in fresh)]
        ages = [own_age, *(m.age for m in fresh)]
        senders = [m.src for m in fresh]
        merged = await asyncio.to_thread(partial(self.merge, senders=senders), models, ages)
        await asyncio.to_thread(self.learner.set_weights, merged)
        # Rounds are adopted from the furthest peer, so a node that fell behind catches up (in
        # sync mode the inbox gives a later round's model only then); never beyond the ceiling
        # (the inbox took no model above it, but the view may have changed).
        top = min(max(m.round for m in fresh), self.round_ceiling())
        return len(fresh), top - 1

    async def catch_up(self) -> int:
        """Back from a pause: forget what came before, say we train again, and return the
        round to go on from (the network's)."""
        if self._stopping():  # it stopped while paused: it did not train, its round stays
            return self._current_round()
        self.inbox.drop_models()
        await self.membership.announce()
        return await self.rejoin() if self.config.mode == "sync" else self.peers_round()

    async def rejoin(self) -> int:
        """Sync mode, back from a pause: the round the network is in, from the first models
        peers send us (every round some peer's plan targets us), waiting at most a round's
        timeout; the furthest peer's round as heard in presence when none comes.

        Starting from a round the network left would have each side wait for the other's
        model of a round it will not send again, until the round timeout.
        """
        deadline = self.clock() + self.config.round_timeout
        rounds = self.config.rounds
        while not self._stopping() and not self.inbox and self.clock() < deadline:
            if rounds and self.peers_round() >= rounds:
                break  # the network finished its rounds: no model will come any more
            self.inbox.arrived.clear()
            try:
                async with asyncio.timeout(min(1.0, max(0.0, deadline - self.clock()))):
                    await self.inbox.arrived.wait()
            except TimeoutError:
                pass
        heard = max((self.inbox.newest_round(p) for p in self.view.live()), default=0)
        if heard == 0:
            return self.peers_round()
        return max(self._current_round(), min(heard, self.round_ceiling()) - 1)

    def peers_round(self) -> int:
        """The round a node that paused resumes at: the furthest peer's (never beyond the
        ceiling, so one peer cannot claim any round), or its own when that is further."""
        own = self._current_round()
        # A peer that finished its rounds and left tells how far the network got too.
        rounds = sorted(
            [
                *(
                    info.round
                    for p in self.view.live()
                    if (info := self.view.get(p)) is not None and info.round is not None
                ),
                *self.membership.finished.values(),
            ]
        )
        if not rounds:
            return own
        return max(own, min(rounds[-1], self.round_ceiling() - 1))

    def round_ceiling(self) -> int:
        """The highest round a model may claim: ours, or the median of ours and the
        established peers' rounds, plus the lag.

        Catching up to a network that is ahead is allowed (a restarted or slow node); one peer
        claiming round 10**9 is not, since adopting it would end everyone's run. Under tofu
        anyone can make keys and verified presence records, so only established peers count
        (in the view for a heartbeat interval, `presence_ttl / 3`), and this node counts too:
        a flood of fresh records moves nothing, and Sybils must outnumber this node and its
        established peers to move it. Of two middle values the higher one counts, so a
        restarted node with a single peer ahead still catches up with it.
        """
        own = self._current_round()
        key = (self.view.version, own, int(self.clock()))
        if self._ceiling is None or self._ceiling[0] != key:
            established = self.view.established(self.config.presence_ttl / 3)
            rounds = sorted(
                [
                    own,
                    *(
                        info.round
                        for p in established
                        if (info := self.view.get(p)) is not None and info.round is not None
                    ),
                ]
            )
            median = rounds[len(rounds) // 2]
            self._ceiling = (key, max(own, median) + self.config.max_round_lag + 1)
        return self._ceiling[1]
