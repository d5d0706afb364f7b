"""The node daemon: membership, schedule, training, gossip and merge in one asyncio loop.

`Node` is given its parts (a `Learner`, a `Transport`, a state directory) and runs them; it never
knows whether it talks to a real broker or the simulator's in-memory bus. `p2pfl.daemon` builds
the parts from a `NodeConfig` for `p2pfl run`.

Data path (DESIGN.md): the schedule picks targets from the live view; the model is trained in a
worker thread, encoded (chunked when large) and published to each target's inbox on the target's
home broker; received models are reassembled, decoded, validated against the local model's
shapes, and merged with the local model by the configured rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import NewPeerBucket, PeerInfo, PeerView
from p2pfl.identity import Identity
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.learning.learner import EvalResult, FitResult, Learner, privacy_of
from p2pfl.learning.merge import parse_merge
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.model import encode_model, layout
from p2pfl.secure_round import SecureAggregation
from p2pfl.status import NodeStatus
from p2pfl.store import StateDir, StateDirError
from p2pfl.telemetry import LogForwarder, TelemetryPublisher
from p2pfl.tokens import Tokens
from p2pfl.topology import Schedule
from p2pfl.transport.base import Payload, Transport, TransportError
from p2pfl.trust import Trust

log = logging.getLogger(__name__)

LONELY_ROUNDS = 3
"""Rounds without any live peer after which a node warns that it trains alone."""


@dataclass(frozen=True)
class RoundReport:
    """One line of progress: what a round did."""

    node_id: str
    round: int
    train_loss: float
    test_loss: float
    accuracy: float
    peers: int
    merged: int
    seconds: float
    counters: dict[str, Any]
    fit_seconds: float = 0.0
    eval_seconds: float = 0.0
    epsilon: float | None = None  # DP: epsilon spent so far on this node's samples

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": "round",
            "node": self.node_id,
            "round": self.round,
            "train_loss": round(self.train_loss, 6),
            "test_loss": round(self.test_loss, 6),
            "accuracy": round(self.accuracy, 6),
            "peers": self.peers,
            "merged": self.merged,
            "seconds": round(self.seconds, 4),
            "fit_seconds": round(self.fit_seconds, 4),
            "eval_seconds": round(self.eval_seconds, 4),
            "epsilon": None if self.epsilon is None else round(self.epsilon, 6),
            **self.counters,
        }


class Node:
    """One participant of the gossip network."""

    def __init__(
        self,
        config: NodeConfig,
        learner: Learner,
        transport: Transport,
        *,
        node_id: str,
        home_broker: str,
        schedule: Schedule,
        state: StateDir | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        logs: LogForwarder | None = None,
        advertised: Sequence[str] = (),
        own_broker: Container[str] | None = None,
        identity: Identity | None = None,
        trust: Trust | None = None,
        limit_new_peers: bool = True,
    ) -> None:
        """``limit_new_peers=False`` lets every new peer join the view at once (the simulator,
        whose peers are all its own); the cap of ``max_peers`` holds either way."""
        self.config = config
        self.learner = learner
        self.transport = transport
        self.node_id = node_id
        self.home_broker = home_broker
        self.schedule = schedule
        self.state = state
        self.on_round = on_round
        self.clock = clock
        self.net = config.network
        self.view = PeerView(
            node_id,
            ttl=config.presence_ttl,
            clock=clock,
            max_peers=config.max_peers,
            new_peers=NewPeerBucket(clock=clock) if limit_new_peers else None,
            configured={p.id for p in config.peers},
        )
        self.counters = NodeCounters()
        self.round = 0
        self.last_eval: EvalResult | None = None
        self._merge = parse_merge(config.merge)
        # Above every seq of an earlier run of this node, so peers never take ours for replays.
        self._seq = time.time_ns() // 1000
        self.identity = identity or Identity.generate()
        # An open network checks nothing, so nothing is signed either (and nothing costs).
        self.signer = None if config.trust == "open" else self.identity
        self.trust = trust or Trust(
            config.trust,
            state_dir=None if state is None else state.path,
            max_peers=config.max_peers,
            max_skew=config.max_clock_skew,
            ca_key=config.ca_key,
        )
        self.trust.own(node_id, self.identity.public_raw)  # nobody else speaks as us
        self._inbox_topic = topics.inbox(self.net, node_id)
        self.inbox = Inbox(config, self.counters, clock=clock)
        self.inbox.trust = self.trust
        self._stop = asyncio.Event()
        self.started = clock()
        self.membership = Membership(
            config,
            transport,
            self.view,
            node_id=node_id,
            home_broker=home_broker,
            next_seq=self._next_seq,
            current_round=lambda: self.round,
            reject=self.inbox.reject,
            clock=clock,
            advertised=advertised,
            own_broker=own_broker,
            signer=self.signer,
            trust=self.trust,
            certificate=self.trust.certificate,
        )
        # Only peers of the view steer this node: they alone get models merged, and what is
        # kept for a peer goes when it leaves.
        self.view.on_refuse = self.inbox.reject
        self.view.on_leave = self._peer_left
        self.inbox.admitted = self._admitted
        self.secure: SecureAggregation | None = None
        if config.secure_aggregation:
            self.secure = SecureAggregation(
                config, node_id=node_id, view=self.view, membership=self.membership,
                schedule=schedule, reject=self.inbox.reject, next_seq=self._next_seq,
                signer=self.signer, send=self._send_control, round_view=self._round_view,
                stopping=lambda: self.stopping, clock=clock,
            )  # fmt: skip
            self.membership.agreement_key = self.secure.public_key
            self.inbox.on_secagg = self.secure.on_message
        self._last_good: dict[str, np.ndarray] | None = None
        self.telemetry = TelemetryPublisher(
            config, transport, node_id=node_id, status=self.status, weights=learner.get_weights,
            next_seq=self._next_seq, signer=self.signer, logs=logs, clock=clock,
        )  # fmt: skip
        self.last_loss: float | None = None
        self.sent_to: tuple[str, ...] = ()
        self.tokens = Tokens(config, self.inbox, self.view, node_id=node_id, clock=clock)
        self._ceiling: tuple[tuple[int, int, int], int] | None = None
        self._alone_rounds = 0  # consecutive rounds without a live peer
        # DP: the learner's budget; `epsilon` is what it spent, as of the last fit.
        self.privacy = privacy_of(learner)
        self.epsilon: float | None = None

    # ---- public control -------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def stop(self) -> None:
        """Ask the node to finish: stop taking work, checkpoint, say bye, close."""
        self._stop.set()
        self.inbox.arrived.set()  # wakes a wait for peers' models or a token at once

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> NodeCounters:
        """Run until the round/time budget is spent or `stop()` is called."""
        weights = await asyncio.to_thread(self.learner.get_weights)
        self.inbox.layout = layout(weights)
        if await self._resume():
            weights = await asyncio.to_thread(self.learner.get_weights)
        if self.privacy is not None:
            self.epsilon = await asyncio.to_thread(self._restore_privacy)
        self._last_good = weights
        self._merge.anchor(weights)
        await self.transport.connect(will=self.membership.will())
        await self.transport.subscribe(self._inbox_topic)
        await self.membership.start()
        log.info(
            "node started id=%s net=%s broker=%s schedule=%s mode=%s round=%d",
            self.node_id,
            self.net,
            self.home_broker,
            self.schedule.name,
            self.config.mode,
            self.round,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self._receive_loop())
                heartbeat = tg.create_task(self.membership.heartbeat_loop())
                discovery = tg.create_task(self.membership.discovery_loop())
                telemetry = tg.create_task(self.telemetry.run())
                sweeper = tg.create_task(self.inbox.sweep_loop())
                await self._train_loop()
                for task in (receiver, heartbeat, discovery, telemetry, sweeper):
                    task.cancel()
        finally:
            await self._shutdown()
        return self.counters

    # ---- training ---------------------------------------------------------------------------

    async def _wait_for_peers(self) -> None:
        """Sync mode starts together: wait for the expected peers, at most one round timeout."""
        wanted = self.config.min_peers
        if wanted is None:
            static = {p.id for p in self.config.peers} - {self.node_id}
            wanted = len(static) if self.config.mode == "sync" or self.config.walkers else 0
        if wanted <= 0:
            return
        deadline = self.clock() + self.config.round_timeout
        while len(self.view.live()) < wanted and self.clock() < deadline and not self.stopping:
            await self._sleep(0.05)
        live = len(self.view.live())
        if live >= wanted or self.stopping:
            log.info("starting with peers=%d wanted=%d", live, wanted)
            return
        log.warning(
            "starting with peers=%d wanted=%d after %gs: %s",
            live,
            wanted,
            self.config.round_timeout,
            await self.membership.diagnose(),
        )
        if live == 0:
            self._alone_rounds = LONELY_ROUNDS  # said already: not again in this stretch

    async def _check_alone(self, peers: int) -> None:
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

    async def _train_loop(self) -> None:
        await self._wait_for_peers()
        deadline = None if self.config.duration is None else self.clock() + self.config.duration
        walkers = self.config.walkers
        if walkers:
            self.tokens.deal()
        while not self.stopping:
            # With walkers a node's budget is its own local steps; otherwise the shared round.
            done = self.counters.rounds if walkers else self.round
            if self.config.rounds and done >= self.config.rounds:
                break
            if deadline is not None and self.clock() >= deadline:
                break
            if walkers and not self.tokens.holding:
                await self.tokens.wait(deadline, lambda: self.stopping)
                continue
            await self._one_round()
            if self.config.mode == "async" and self.config.period > 0:
                await self._sleep(self.config.period)
        if self.secure is not None and not self.stopping:
            await self.secure.linger()  # a receiver of our last round may need our seeds

    async def _adopt_tokens(self) -> int:
        """Walkers: continue from the token that reached us, as the merge rule adopts it."""
        tokens = self.tokens.take()
        if not tokens:
            return 0
        # Plain rules let the token's model replace ours (several tokens met here: the rule
        # merges them). Clipped gossip moves ours towards the token by at most its radius
        # instead: a token is just another peer's model, and a Byzantine one must not
        # overwrite every node it reaches.
        own = await asyncio.to_thread(self.learner.get_weights)
        merged = await asyncio.to_thread(
            partial(self._merge.adopt, senders=[t.src for t in tokens]),
            own,
            [t.weights for t in tokens],
            [t.age for t in tokens],
        )
        await asyncio.to_thread(self.learner.set_weights, merged)
        self.round = max(self.round, min(max(t.round for t in tokens), self._round_ceiling()))
        return len(tokens)

    async def _one_round(self) -> None:
        started = self.clock()
        walkers = self.config.walkers > 0
        adopted = await self._adopt_tokens() if walkers else 0
        r = self.round + 1
        fit: FitResult = await asyncio.to_thread(self._fit)
        if self.stopping:
            return
        weights = await asyncio.to_thread(self.learner.get_weights)
        payload: Payload | None = None
        try:
            payload = await asyncio.to_thread(self._encode, weights, r, fit.samples)
            self._last_good = weights
        except ValueError as exc:
            # Training diverged (NaN/inf): peers would refuse it. Fall back to the last good
            # model, so neighbours waiting for us in sync mode are not left to time out.
            self.counters.diverged += 1
            log.error("local model diverged round=%d reason=%s", r, exc)
            if self._last_good is not None:
                weights = self._last_good
                await asyncio.to_thread(self.learner.set_weights, weights)
                payload = await asyncio.to_thread(self._encode, weights, r, fit.samples)
        if self.secure is not None and payload is not None:
            try:
                await self.secure.start_round(r, weights, float(fit.samples))
            except ValueError as exc:  # values too large for fixed point: nothing to send
                log.error("cannot mask the model round=%d reason=%s", r, exc)
                payload = None
        self.last_loss = fit.loss
        sent: set[str] = set()
        if payload is not None:
            await self._send_planned(r, payload, sent)
            self.sent_to = tuple(sorted(sent))
            if self.config.mode == "sync":
                await self._wait_for_round(r, payload, sent)
        if walkers:
            merged = adopted
            self.tokens.passed_on(bool(sent))  # our copy stays, for evaluation
        else:
            # Our age in the unit peers claim theirs (samples this step), which `weighted`
            # caps theirs against.
            merged = await self._merge_received(weights, r, float(fit.samples))
        eval_started = self.clock()
        result = await asyncio.to_thread(self.learner.evaluate)
        eval_seconds = self.clock() - eval_started
        self.last_eval = result
        self.round = max(r, self.round)
        self.counters.rounds += 1
        if self.state is not None:
            # Copying the model is work too: do it in the worker thread, not on the loop.
            state, learner, done = self.state, self.learner, self.round
            await asyncio.to_thread(lambda: state.save_checkpoint(done, learner.get_weights()))
        report = RoundReport(
            node_id=self.node_id,
            round=self.round,
            train_loss=fit.loss,
            test_loss=result.loss,
            accuracy=result.accuracy,
            peers=len(self.view.live()),
            merged=merged,
            seconds=self.clock() - started,
            counters=self.counters.as_dict(),
            fit_seconds=fit.seconds,
            eval_seconds=eval_seconds,
            epsilon=self.epsilon,
        )
        await self._check_alone(report.peers)
        if self.state is not None:
            await asyncio.to_thread(self.state.append_metrics, report.as_dict())
        if self.on_round is not None:
            self.on_round(report)

    def _fit(self) -> FitResult:
        """Train once (in a worker thread). With DP, what the fit will spend is written down
        first: a node killed after sending this fit's model must not forget it on restart."""
        privacy = self.privacy
        if privacy is None:
            return self.learner.fit()
        if self.state is not None and privacy.allows_fit():
            self.state.save_privacy(privacy.record(fits_ahead=1))
        fit = self.learner.fit()
        self.epsilon = privacy.spent
        return fit

    def _restore_privacy(self) -> float:
        """Take over what an earlier run of this node spent (its state dir's record)."""
        assert self.privacy is not None
        if self.state is None:
            return self.privacy.spent
        record = self.state.load_privacy()
        if record is not None:
            try:
                self.privacy.restore(record)
            except (ValueError, TypeError) as exc:
                raise StateDirError(f"cannot use {self.state.privacy_path}: {exc}") from None
            log.info(
                "privacy budget resumed epsilon=%.3f of %g",
                self.privacy.spent,
                self.privacy.epsilon,
            )
        return self.privacy.spent

    def _round_view(self, r: int) -> list[str]:
        live = self.view.live()
        finished = self.membership.finished
        if self.config.mode == "sync" and finished:
            # A peer that finished round r and left already did its part in round r: keep it
            # in round r's plan so its departure does not reshuffle who merges what.
            done = [p for p, last in finished.items() if last >= r and p not in live]
            live = sorted([*live, *done])
        return live

    def _plan_targets(self, r: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        live = self._round_view(r)
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

    async def _send_planned(self, r: int, payload: Payload, sent: set[str]) -> None:
        send_to, _ = self._plan_targets(r)
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
            await self._send(target, info.broker, payload)

    async def _wait_for_round(self, r: int, payload: Payload, sent: set[str]) -> None:
        """Sync mode: wait for the expected senders' round-r models, re-planning on view changes."""
        deadline = self.clock() + self.config.round_timeout
        view_version = self.view.version
        while not self.stopping:
            _, expect = self._plan_targets(r)
            if self.secure is None:
                missing = [p for p in expect if self.inbox.newest_round(p) < r]
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
                await self._send_planned(r, payload, sent)

    async def _merge_received(self, own: dict[str, np.ndarray], r: int, own_age: float) -> int:
        # Only peers of the view get a model merged: not one that left or was never admitted
        # (its presence still being dialled when the model came, then refused). A peer that
        # finished its rounds and said bye is the exception: sync rounds up to its last
        # counted on its model.
        live = set(self.view.live())
        finished = self.membership.finished
        fresh = [m for m in self.inbox.take(r) if m.src in live or m.src in finished]
        if self.secure is not None:
            merged_masked, count = await self.secure.merge(own, r, fresh)
            if merged_masked is not None:
                await asyncio.to_thread(self.learner.set_weights, merged_masked)
                self.round = max(self.round, r - 1)
            return count
        if not fresh:
            return 0
        models = [own, *(m.weights for m in fresh)]
        ages = [own_age, *(m.age for m in fresh)]
        senders = [m.src for m in fresh]
        merged = await asyncio.to_thread(partial(self._merge, senders=senders), models, ages)
        await asyncio.to_thread(self.learner.set_weights, merged)
        # Rounds are adopted from the furthest peer, so a restarted node catches up; never
        # beyond the ceiling (the inbox took no model above it, but the view may have changed).
        top = min(max(m.round for m in fresh), self._round_ceiling())
        self.round = max(self.round, top - 1)
        return len(fresh)

    async def _send_control(self, target: str, payload: bytes) -> bool:
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

    def _encode(self, weights: Mapping[str, np.ndarray], r: int, age: float) -> Payload:
        self._seq += 1
        return encode_model(
            dict(weights),
            net=self.net,
            src=self.node_id,
            seq=self._seq,
            round=r,
            age=age,
            codec=self.config.codec,
            signer=self.signer,
        )

    async def _send(self, target: str, broker: str, payload: Payload) -> None:
        topic = topics.inbox(self.net, target)
        self._seq += 1
        parts = chunking.split(
            payload,
            max_chunk=self.config.max_chunk,
            transfer_id=f"{self.node_id}-{self._seq}",
            net=self.net,
            src=self.node_id,
            seq=self._seq,
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

    # ---- receiving --------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for message in self.transport.messages():
            self.counters.bytes_received += len(message.payload)
            if message.topic == self._inbox_topic:
                lowest = self.round - self.config.max_round_lag
                await self.inbox.accept(
                    message.payload, lowest=lowest, highest=self._round_ceiling()
                )
            else:
                await self.membership.on_message(message)

    def _round_ceiling(self) -> int:
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
        key = (self.view.version, self.round, int(self.clock()))
        if self._ceiling is None or self._ceiling[0] != key:
            established = self.view.established(self.config.presence_ttl / 3)
            rounds = sorted(
                [
                    self.round,
                    *(
                        info.round
                        for p in established
                        if (info := self.view.get(p)) is not None and info.round is not None
                    ),
                ]
            )
            median = rounds[len(rounds) // 2]
            self._ceiling = (key, max(self.round, median) + self.config.max_round_lag + 1)
        return self._ceiling[1]

    def _admitted(self, src: str) -> bool:
        """Whether the inbox may take a model from `src`: a trainer of the view, or a peer
        whose verified presence is being dialled (its first model would race its admission)."""
        info = self.view.get(src)
        if info is not None:
            return info.role == "trainer"
        return self.membership.pending(src)

    def _peer_left(self, info: PeerInfo) -> None:
        """Drop what is kept for a peer that left the view (`PeerView.on_leave`)."""
        # Its buffered models stay when it finished its rounds (sync rounds up to its last
        # count on them), and with walkers: a token that reached us is ours to carry on.
        keep = info.id in self.membership.finished or self.config.walkers > 0
        self.inbox.forget(info.id, models=not keep)
        self.membership.forget(info)

    def discovered(self, info: PeerInfo) -> None:
        """A discovery source (mDNS) found a peer; call it on the node's loop."""
        self.membership.discovered(info)

    def vanished(self, peer_id: str) -> None:
        """A discovery source saw a peer leave (e.g. an mDNS goodbye)."""
        self.membership.vanished(peer_id)

    # ---- status -----------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        """What this node is doing now, as a frozen record: its telemetry, less the process's
        CPU and memory and the weight projection (`telemetry.measured`). Call it on the node's
        event loop, which changes what it reads."""
        ev, c, cfg = self.last_eval, self.counters, self.config
        confusion = None
        if ev is not None and cfg.telemetry_detail == "full":
            confusion = tuple(tuple(row) for row in ev.confusion.tolist())
        return NodeStatus.model_construct(
            id=self.node_id, detail=cfg.telemetry_detail, role=cfg.role, run=cfg.run_name,
            tags=tuple(cfg.tags), schedule=self.schedule.name, mode=cfg.mode,
            broker=self.membership.advertised[0], round=self.round, rounds=c.rounds,
            train_loss=self.last_loss, test_loss=None if ev is None else ev.loss,
            accuracy=None if ev is None else ev.accuracy, confusion=confusion,
            samples=self.learner.num_samples, models_sent=c.models_sent,
            models_received=c.models_received, bytes_sent=c.bytes_sent,
            bytes_received=c.bytes_received, rejected=dict(sorted(c.rejected.items())),
            uptime=self.clock() - self.started, peers=tuple(self.view.live()),
            sent_to=self.sent_to, epsilon=self.epsilon,
        )  # fmt: skip

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _resume(self) -> bool:
        """Load the newest checkpoint that fits the model; True when the node resumed from one.

        `run()` has set `inbox.layout` from the learner's weights: a checkpoint of another
        layout, or one holding NaN/Inf, is refused by the state dir and an older one tried.
        """
        if self.state is None:
            return False
        assert self.inbox.layout, "run() sets the model layout before resuming"
        ckpt = await asyncio.to_thread(self.state.latest_checkpoint, self.inbox.layout)
        if ckpt is None:
            return False
        await asyncio.to_thread(self.learner.set_weights, ckpt.weights)
        self.round = ckpt.round
        log.info("resumed from checkpoint round=%d", ckpt.round)
        return True

    async def _shutdown(self) -> None:
        try:
            await self.membership.say_bye()
        except Exception as exc:  # the broker may be gone already; closing matters more
            log.warning("could not publish bye error=%s", exc)
        await self.transport.close()
        log.info("node stopped id=%s round=%d", self.node_id, self.round)
