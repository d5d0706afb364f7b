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
from collections.abc import Callable, Container, Sequence

import numpy as np

from p2pfl import resume
from p2pfl.admission import Admission
from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import NewPeerBucket, PeerView
from p2pfl.gossip import Gossip
from p2pfl.identity import Identity
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.learning.learner import EvalResult, FitResult, Learner, prepare
from p2pfl.learning.merge import parse_merge
from p2pfl.pausing import Pausing
from p2pfl.peer_watch import LONELY_ROUNDS, PeerWatch
from p2pfl.protocol import topics
from p2pfl.protocol.model import layout
from p2pfl.run_identity import RunIdentity
from p2pfl.secure_round import SecureAggregation
from p2pfl.status import NodeStatus, RoundReport
from p2pfl.store import StateDir
from p2pfl.telemetry import LogForwarder, TelemetryPublisher
from p2pfl.tokens import Tokens
from p2pfl.topology import Schedule
from p2pfl.training import LocalTraining
from p2pfl.transport.base import Payload, Transport
from p2pfl.trust import Trust

__all__ = ["LONELY_ROUNDS", "Node", "NodeCounters", "RoundReport"]

log = logging.getLogger(__name__)


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
        eligible: Callable[[], str | None] | None = None,
    ) -> None:
        """``limit_new_peers=False`` lets every new peer join the view at once (the simulator,
        whose peers are all its own); the cap of ``max_peers`` holds either way. ``eligible``
        says why the node may not train now (default: ``config.when``'s conditions; one given
        here is called on the loop, so must not block)."""
        self.config, self.learner, self.transport, self.state = config, learner, transport, state
        self.node_id, self.home_broker, self.schedule = node_id, home_broker, schedule
        self.on_round, self.clock, self.net = on_round, clock, config.network
        self.view = PeerView(
            node_id, ttl=config.presence_ttl, clock=clock, max_peers=config.max_peers,
            new_peers=NewPeerBucket(clock=clock) if limit_new_peers else None,
            configured={p.id for p in config.peers},
        )  # fmt: skip
        self.counters = NodeCounters()
        self.round = 0
        self.last_eval: EvalResult | None = None
        self.sent_to: tuple[str, ...] = ()
        self._merge = parse_merge(config.merge)
        # Above every seq of an earlier run of this node, so peers never take ours for replays.
        self._seq = time.time_ns() // 1000
        self._stop = asyncio.Event()
        # A pause by hand (`p2pfl pause`) and eligibility (`--when`): see p2pfl.pausing.
        self.pausing = Pausing.of(config, eligible)
        self.started = clock()
        self._trust(identity, trust)
        self.inbox = Inbox(config, self.counters, clock=clock)
        self.inbox.trust = self.trust
        self._peers(advertised, own_broker)
        self.runs = RunIdentity(config, state, self.membership.heard_runs, node_id=node_id)
        self.membership.run = lambda: self.runs.id  # announced in our presence
        self.gossip = Gossip(
            config, transport, node_id=node_id, view=self.view, membership=self.membership,
            inbox=self.inbox, schedule=schedule, learner=learner, merge=self._merge,
            counters=self.counters, signer=self.signer, next_seq=self._next_seq,
            current_round=lambda: self.round, stopping=lambda: self.stopping, clock=clock,
        )  # fmt: skip
        self.training = LocalTraining(
            learner, state=state, counters=self.counters, pausing=self.pausing,
            encode=self.gossip.encode, sleep=self._sleep, stopping=lambda: self.stopping,
        )  # fmt: skip
        self.secure = self.gossip.secure = self.training.secure = self._secure_aggregation()
        self.telemetry = TelemetryPublisher(
            config, transport, node_id=node_id, status=self.status, weights=learner.get_weights,
            next_seq=self._next_seq, signer=self.signer, logs=logs, clock=clock,
        )  # fmt: skip
        self.tokens = Tokens(config, self.inbox, self.view, node_id=node_id, clock=clock)

    def _trust(self, identity: Identity | None, trust: Trust | None) -> None:
        self.identity = identity or Identity.generate()
        # An open network checks nothing, so nothing is signed either (and nothing costs).
        self.signer = None if self.config.trust == "open" else self.identity
        self.trust = trust or Trust(
            self.config.trust,
            state_dir=None if self.state is None else self.state.path,
            max_peers=self.config.max_peers,
            max_skew=self.config.max_clock_skew,
            ca_key=self.config.ca_key,
        )
        self.trust.own(self.node_id, self.identity.public_raw)  # nobody else speaks as us

    def _peers(self, advertised: Sequence[str], own_broker: Container[str] | None) -> None:
        """Membership, and what this node does about its peers joining and leaving."""
        self.membership = Membership(
            self.config, self.transport, self.view, node_id=self.node_id,
            home_broker=self.home_broker, next_seq=self._next_seq,
            current_round=lambda: self.round, reject=self.inbox.reject, clock=self.clock,
            advertised=advertised, own_broker=own_broker, signer=self.signer, trust=self.trust,
            certificate=self.trust.certificate, paused=lambda: self.pausing.active,
        )  # fmt: skip
        self.admission = Admission(self.config, self.view, self.membership, self.inbox)
        self.view.on_refuse = self.inbox.reject
        self.view.on_leave = self.admission.peer_left
        self.inbox.admitted = self.admission.admits
        self.inbox.paused = lambda: self.pausing.active is not None
        if self.membership.sampled:
            self.inbox.on_shuffle = self.membership.on_shuffle
        self.peer_watch = PeerWatch(
            self.config, self.view, self.membership, node_id=self.node_id, stop=self._stop,
            clock=self.clock, peers_train=self._peers_train,
        )  # fmt: skip

    def _peers_train(self) -> bool:
        """Whether peers train already: a model of theirs came, or one is past our round."""
        return bool(self.inbox) or self.gossip.peers_round() > self.round

    def _secure_aggregation(self) -> SecureAggregation | None:
        if not self.config.secure_aggregation:
            return None
        secure = SecureAggregation(
            self.config, node_id=self.node_id, view=self.view, membership=self.membership,
            schedule=self.schedule, reject=self.inbox.reject, next_seq=self._next_seq,
            signer=self.signer, send=self.gossip.send_control, round_view=self.gossip.round_view,
            stopping=lambda: self.stopping, clock=self.clock,
        )  # fmt: skip
        self.membership.agreement_key = secure.public_key
        self.inbox.on_secagg = secure.on_message
        return secure

    # ---- public control -------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def stop(self) -> None:
        """Ask the node to finish: stop taking work, checkpoint, say bye, close."""
        self._stop.set()
        self.inbox.arrived.set()  # wakes a wait for peers' models or a token at once
        self.pausing.changed.set()  # and a paused node's wait

    def pause(self, reason: str = "manual") -> None:
        """Pause by hand (`p2pfl pause`): the node stops training at its next round boundary."""
        self.pausing.pause(reason)

    def resume(self) -> None:
        """Undo `pause`, and override `--when` until its conditions next turn eligible: the
        node trains again from its next check (within a few seconds)."""
        self.pausing.resume()

    @property
    def held(self) -> str | None:
        """Why the node was paused by hand, or None."""
        return self.pausing.held

    @property
    def paused(self) -> str | None:
        """Why the node does not train now (``manual``, ``window``, ...), or None."""
        return self.pausing.reason

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> NodeCounters:
        """Run until the round/time budget is spent or `stop()` is called."""
        weights = await asyncio.to_thread(self.learner.get_weights)
        self.inbox.layout = layout(weights)
        if self.state is not None:
            await asyncio.to_thread(self.runs.begin)  # the run, whose checkpoint we resume
            resumed = await resume.resume(self.state, self.learner, self.inbox.layout)
            if resumed is not None:
                self.round = resumed
                weights = await asyncio.to_thread(self.learner.get_weights)
        await self.training.begin(weights)
        self._merge.anchor(weights)
        await self.transport.connect(will=self.membership.will())
        await self.transport.subscribe(topics.inbox(self.net, self.node_id))
        await self.membership.start()
        log.info(
            "node started id=%s net=%s broker=%s schedule=%s mode=%s round=%d", self.node_id,
            self.net, self.home_broker, self.schedule.name, self.config.mode, self.round,
        )  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                receiver = tg.create_task(self.gossip.receive_loop())
                heartbeat = tg.create_task(self.membership.heartbeat_loop())
                discovery = tg.create_task(self.membership.discovery_loop())
                shuffles = tg.create_task(self.membership.shuffle_loop())
                telemetry = tg.create_task(self.telemetry.run())
                sweeper = tg.create_task(self.inbox.sweep_loop())
                await self._train_loop()
                for task in (receiver, heartbeat, discovery, shuffles, telemetry, sweeper):
                    task.cancel()
        finally:
            await self._shutdown()
        return self.counters

    # ---- training ---------------------------------------------------------------------------

    async def _train_loop(self) -> None:
        await self.peer_watch.wait_for_peers()
        await asyncio.to_thread(prepare, self.learner)  # made while idle, it cost ~70 MB
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
            if await self.pausing.hold(self.membership.announce, lambda: self.stopping):
                self.round = await self.gossip.catch_up()
                await self.membership.announce()  # peers stop waiting for rounds we skipped
                continue
            if walkers and not self.tokens.holding:
                await self.tokens.wait(deadline, lambda: self.stopping)
                continue
            await (self._walk() if walkers else self._one_round())
            if self.config.mode == "async" and self.config.period > 0:
                await self._sleep(self.config.period)
        if self.secure is not None and not self.stopping:
            await self.secure.linger()  # a receiver of our last round may need our seeds

    async def _one_round(self) -> None:
        """The round path: train, send to the round's targets, wait for the expected models
        (sync), merge them into ours."""
        started = self.clock()
        r = self.round + 1
        trained = await self.training.train(r)
        if trained is None:
            return
        fit, weights, payload = trained
        if payload is not None:
            await self._share(r, payload)
        # Our age in the unit peers claim theirs (samples this step), which `weighted` caps
        # theirs against.
        merged = await self._merge_received(weights, r, float(fit.samples))
        await self._end_round(r, fit, merged, started)

    async def _walk(self) -> None:
        """The walker path: continue from the token(s) that reached us, train, pass it on."""
        started = self.clock()
        adopted = await self._adopt_tokens()
        r = self.round + 1
        trained = await self.training.train(r)
        if trained is None:
            return
        fit, _, payload = trained
        sent = await self._share(r, payload) if payload is not None else set()
        self.tokens.passed_on(bool(sent))  # our copy stays, for evaluation
        await self._end_round(r, fit, adopted, started)

    async def _adopt_tokens(self) -> int:
        """Walkers: continue from the token(s) that reached us; how many."""
        adopted, top = await self.tokens.adopt(self.learner, self._merge)
        self.round = max(self.round, min(top, self.gossip.round_ceiling()))
        return adopted

    async def _share(self, r: int, payload: Payload) -> set[str]:
        """Send round `r`'s model as planned (sync: and wait for the expected ones); to whom."""
        sent: set[str] = set()
        await self.gossip.send_planned(r, payload, sent)
        self.sent_to = tuple(sorted(sent))
        if self.config.mode == "sync":
            await self.gossip.wait_for_round(r, payload, sent)
        return sent

    async def _merge_received(self, own: dict[str, np.ndarray], r: int, own_age: float) -> int:
        """Merge the round's models that came; the node catches up to the round they reached."""
        merged, caught_up = await self.gossip.merge_received(own, r, own_age)
        self.round = max(self.round, caught_up)
        if caught_up > r:  # rounds skipped: a sync peer must not wait for our model of them
            await self.membership.announce()
        return merged

    async def _end_round(self, r: int, fit: FitResult, merged: int, started: float) -> None:
        """Evaluate, checkpoint, and report round `r`."""
        eval_started = self.clock()
        result = await asyncio.to_thread(self.learner.evaluate)
        eval_seconds = self.clock() - eval_started
        self.last_eval = result
        self.round = max(r, self.round)
        self.counters.rounds += 1
        if self.state is not None:
            meta = await asyncio.to_thread(self.runs.checkpoint_meta)  # the run settles
            await resume.save_checkpoint(self.state, self.learner, self.round, meta)
        report = RoundReport(
            node_id=self.node_id, round=self.round, train_loss=fit.loss, test_loss=result.loss,
            accuracy=result.accuracy, peers=len(self.view.live()), merged=merged,
            seconds=self.clock() - started, counters=self.counters.as_dict(),
            fit_seconds=fit.seconds, eval_seconds=eval_seconds, epsilon=self.training.epsilon,
            paused=self.paused, run=self.runs.id,
        )  # fmt: skip
        await self.peer_watch.after_round(report.peers)
        if self.state is not None:
            await asyncio.to_thread(self.state.append_metrics, report.as_dict())
        if self.on_round is not None:
            self.on_round(report)

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
            id=self.node_id, detail=cfg.telemetry_detail, role=cfg.role, run=self.runs.id,
            tags=tuple(cfg.tags), config=self.runs.config_data, config_hash=self.runs.config_hash,
            schedule=self.schedule.name, mode=cfg.mode,
            broker=self.membership.advertised[0], round=self.round, rounds=c.rounds,
            train_loss=self.training.last_loss, test_loss=None if ev is None else ev.loss,
            accuracy=None if ev is None else ev.accuracy, confusion=confusion,
            samples=self.learner.num_samples, models_sent=c.models_sent,
            models_received=c.models_received, bytes_sent=c.bytes_sent,
            bytes_received=c.bytes_received, rejected=dict(sorted(c.rejected.items())),
            uptime=self.clock() - self.started, peers=tuple(self.view.live()),
            sent_to=self.sent_to, epsilon=self.training.epsilon, paused=self.paused,
        )  # fmt: skip

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _shutdown(self) -> None:
        try:
            await self.membership.say_bye()
        except Exception as exc:  # the broker may be gone already; closing matters more
            log.warning("could not publish bye error=%s", exc)
        await self.transport.close()
        log.info("node stopped id=%s round=%d", self.node_id, self.round)
