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
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.learning.learner import EvalResult, FitResult, Learner
from p2pfl.learning.merge import parse_merge
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import decode_model, encode_model
from p2pfl.store import StateDir
from p2pfl.telemetry import (
    LogForwarder,
    ProcessStats,
    encode_log,
    encode_telemetry,
    projection,
)
from p2pfl.topology import Schedule, initial_token_holders, should_regenerate
from p2pfl.transport.base import Message, Payload, Transport, TransportError

log = logging.getLogger(__name__)

# Decoding big payloads is done off the loop; small ones are cheaper inline.
_INLINE_DECODE_BYTES = 256 * 1024


@dataclass
class NodeCounters:
    """What a node has done so far; reported every round and in telemetry."""

    rounds: int = 0
    models_sent: int = 0
    models_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    diverged: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "models_sent": self.models_sent,
            "models_received": self.models_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "diverged": self.diverged,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(self.rejected),
        }


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
            **self.counters,
        }


@dataclass(frozen=True)
class _Received:
    src: str
    round: int
    age: float
    weights: dict[str, np.ndarray]


# Rejection counters use a fixed set of labels, whatever text a peer's message provokes.
_REASONS = (
    ("exceeds the limit", "oversize"),
    ("oversize", "oversize"),
    ("msgpack", "malformed"),
    ("envelope", "malformed"),
    ("version", "version"),
    ("kind", "kind"),
    ("network", "network"),
    ("digest", "digest"),
    ("nan or infinite", "non-finite"),
    ("stale", "stale"),
    ("future", "future"),
    ("sender", "sender"),
    ("chunk", "chunk"),
    ("transfer", "chunk"),
    ("presence", "presence"),
    ("mismatch", "layout"),
    ("tensor", "layout"),
)


def _reason_key(reason: str) -> str:
    """A short label from a fixed set for a rejection reason."""
    text = reason.lower()
    return next((label for needle, label in _REASONS if needle in text), "invalid")


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
    ) -> None:
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
        self.view = PeerView(node_id, ttl=config.presence_ttl, clock=clock)
        self.counters = NodeCounters()
        self.round = 0
        self.last_eval: EvalResult | None = None
        self._merge = parse_merge(config.merge)
        self._seq = 0
        self._inbox_topic = topics.inbox(self.net, node_id)
        # sender -> round -> model; sync mode keeps a drifted neighbour's next round for later
        self._received: dict[str, dict[int, _Received]] = {}
        self._arrived = asyncio.Event()
        self._stop = asyncio.Event()
        self._reassembler = chunking.Reassembler(
            max_pending_bytes_per_sender=2 * config.max_message_size,
            timeout=max(config.round_timeout, 30.0),
            clock=clock,
        )
        self._expected: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        self._logged_peers: set[tuple[str, str]] = set()
        self._announced: set[str] = set()
        self._started = clock()
        self._discovered: asyncio.Queue[PeerInfo] = asyncio.Queue()
        self._last_good: dict[str, np.ndarray] | None = None
        self._logs = logs
        self._last_loss: float | None = None
        self._sent_to: tuple[str, ...] = ()
        # peers that said bye after finishing a round: sync rounds up to it keep their shape
        self._finished: dict[str, int] = {}
        self._holding = False
        self._token_seen = clock()

    # ---- public control -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the node to finish: stop taking work, checkpoint, say bye, close."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> NodeCounters:
        """Run until the round/time budget is spent or `stop()` is called."""
        weights = self.learner.get_weights()
        self._expected = {k: (v.dtype, tuple(v.shape)) for k, v in weights.items()}
        await self._resume()
        self._last_good = self.learner.get_weights()
        await self.transport.connect(will=self._presence_message(online=False, graceful=False))
        await self.transport.subscribe(self._inbox_topic)
        if "presence" in self.config.discovery:
            await self.transport.subscribe(topics.presence_all(self.net))
        for peer in self.config.peers:
            if peer.id == self.node_id:
                continue
            if "presence" in self.config.discovery:
                await self._announce_to(peer.broker)
            else:
                self.view.upsert(self._static_info(peer.id, peer.broker))
        await self._publish_presence(online=True)
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
                heartbeat = tg.create_task(self._heartbeat_loop())
                discovery = tg.create_task(self._discovery_loop())
                telemetry = tg.create_task(self._telemetry_loop())
                await self._train_loop()
                for task in (receiver, heartbeat, discovery, telemetry):
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
        log.info("starting with peers=%d wanted=%d", len(self.view.live()), wanted)

    async def _train_loop(self) -> None:
        await self._wait_for_peers()
        deadline = None if self.config.duration is None else self.clock() + self.config.duration
        walkers = self.config.walkers
        if walkers:
            members = [self.node_id, *self.view.live()]
            self._holding = self.node_id in initial_token_holders(
                members, walkers, self.config.seed
            )
            self._token_seen = self.clock()
        while not self.stopping:
            # With walkers a node's budget is its own local steps; otherwise the shared round.
            done = self.counters.rounds if walkers else self.round
            if self.config.rounds and done >= self.config.rounds:
                break
            if deadline is not None and self.clock() >= deadline:
                break
            if walkers and not self._holding:
                await self._wait_for_token(deadline)
                continue
            await self._one_round()
            if self.config.mode == "async" and self.config.period > 0:
                await self._sleep(self.config.period)

    async def _wait_for_token(self, deadline: float | None) -> None:
        """Walkers: wait until a token (a model) arrives, or regenerate one lost with a peer."""
        while not self.stopping and (deadline is None or self.clock() < deadline):
            if self._received:
                self._holding = True
                return
            age = self.clock() - self._token_seen
            live = self.view.live()
            if should_regenerate(
                self.node_id, live, age, self.config.token_timeout, self.config.walkers,
                seed=self.config.seed,
            ):  # fmt: skip
                log.info("regenerating a lost token after %.1fs", age)
                self._holding = True
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(0.5):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    async def _adopt_tokens(self) -> int:
        """Walkers: the token's model replaces ours (several tokens met here: their average)."""
        tokens = sorted(
            (by_round[max(by_round)] for by_round in self._received.values() if by_round),
            key=lambda m: m.src,
        )
        self._received = {}
        if not tokens:
            return 0
        self._token_seen = self.clock()
        if len(tokens) == 1:
            merged = tokens[0].weights
        else:
            merged = await asyncio.to_thread(
                self._merge, [t.weights for t in tokens], [t.age for t in tokens]
            )
        await asyncio.to_thread(self.learner.set_weights, merged)
        self.round = max(self.round, max(t.round for t in tokens))
        return len(tokens)

    async def _one_round(self) -> None:
        started = self.clock()
        walkers = self.config.walkers > 0
        adopted = await self._adopt_tokens() if walkers else 0
        r = self.round + 1
        fit: FitResult = await asyncio.to_thread(self.learner.fit)
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
        self._last_loss = fit.loss
        sent: set[str] = set()
        if payload is not None:
            await self._send_planned(r, payload, sent)
            self._sent_to = tuple(sorted(sent))
            if self.config.mode == "sync":
                await self._wait_for_round(r, payload, sent)
        if walkers:
            merged = adopted
            # The token moved on (alone, a node keeps it); our copy stays for evaluation.
            self._holding = not sent
            self._token_seen = self.clock()
        else:
            merged = await self._merge_received(weights, r, float(self.learner.num_samples))
        eval_started = self.clock()
        result = await asyncio.to_thread(self.learner.evaluate)
        eval_seconds = self.clock() - eval_started
        self.last_eval = result
        self.round = max(r, self.round)
        self.counters.rounds += 1
        if self.state is not None:
            await asyncio.to_thread(
                self.state.save_checkpoint, self.round, self.learner.get_weights(), {}
            )
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
        )
        if self.state is not None:
            await asyncio.to_thread(self.state.append_metrics, report.as_dict())
        if self.on_round is not None:
            self.on_round(report)

    def _plan_targets(self, r: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        live = self.view.live()
        if self.config.mode == "sync" and self._finished:
            # A peer that finished round r and left already did its part in round r: keep it
            # in round r's plan so its departure does not reshuffle who merges what.
            done = [p for p, last in self._finished.items() if last >= r and p not in live]
            live = sorted([*live, *done])
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
            if target in sent:
                continue
            info = self.view.get(target)
            if info is None:  # gone, or finished (it has no use for our model any more)
                continue
            sent.add(target)
            await self._send(target, info.broker, payload)

    async def _wait_for_round(self, r: int, payload: Payload, sent: set[str]) -> None:
        """Sync mode: wait for the expected senders' round-r models, re-planning on view changes."""
        deadline = self.clock() + self.config.round_timeout
        view_version = self.view.version
        while not self.stopping:
            _, expect = self._plan_targets(r)
            missing = [p for p in expect if max(self._received.get(p, ()), default=0) < r]
            if not missing:
                return
            remaining = deadline - self.clock()
            if remaining <= 0:
                log.info("round timeout round=%d missing=%s", r, ",".join(missing))
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._arrived.wait()
            except TimeoutError:
                pass
            if self.view.version != view_version:
                # A neighbour joined or left: our new successor may not have our model yet.
                view_version = self.view.version
                await self._send_planned(r, payload, sent)

    def _take_models(self, r: int) -> list[_Received]:
        """The models to merge at round r: the newest per sender, within the allowed lag.

        In sync mode a neighbour one round ahead (it does not wait for us) keeps its round-r+1
        model buffered for our next round; a neighbour further ahead is taken at once, so a
        node that fell behind catches up instead of trailing forever.
        """
        taken: list[_Received] = []
        kept: dict[str, dict[int, _Received]] = {}
        oldest = r - self.config.max_round_lag
        for src, by_round in self._received.items():
            now = [m for rr, m in by_round.items() if oldest <= rr <= r or rr > r + 1]
            if self.config.mode == "sync" and r + 1 in by_round:
                kept[src] = {r + 1: by_round[r + 1]}
            else:
                now.extend(m for rr, m in by_round.items() if rr == r + 1)
            if now:
                taken.append(max(now, key=lambda m: m.round))
        self._received = kept
        # Merge in a fixed order: float sums then do not depend on arrival order.
        return sorted(taken, key=lambda m: m.src)

    async def _merge_received(self, own: dict[str, np.ndarray], r: int, own_age: float) -> int:
        fresh = self._take_models(r)
        if not fresh:
            return 0
        models = [own, *(m.weights for m in fresh)]
        ages = [own_age, *(m.age for m in fresh)]
        merged = await asyncio.to_thread(self._merge, models, ages)
        await asyncio.to_thread(self.learner.set_weights, merged)
        # Rounds are adopted from the furthest peer, so a restarted node catches up.
        self.round = max(self.round, max(m.round for m in fresh) - 1)
        return len(fresh)

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
        )
        for part in parts:
            if isinstance(part, memoryview):
                part = bytes(part)
            try:
                await self.transport.publish(topic, part, qos=1, broker=self._broker_for(broker))
            except (ValueError, TransportError) as exc:
                log.warning("cannot send to peer=%s broker=%s error=%s", target, broker, exc)
                return
            self.counters.bytes_sent += len(part)
        self.counters.models_sent += 1

    def _broker_for(self, broker: str) -> str | None:
        return None if broker in ("", self.home_broker) else broker

    # ---- receiving --------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        async for message in self.transport.messages():
            self.counters.bytes_received += len(message.payload)
            if message.topic == self._inbox_topic:
                await self._on_inbox(message)
            else:
                await self._on_other(message)

    def _reject(self, src: str, reason: str) -> None:
        self.counters.rejected[_reason_key(reason)] += 1
        key = (src, _reason_key(reason))
        if key not in self._logged_peers:
            self._logged_peers.add(key)
            log.warning("message rejected peer=%s reason=%s", src, reason)

    async def _on_inbox(self, message: Message) -> None:
        data = message.payload
        src = "?"
        try:
            if len(data) > self.config.max_message_size:
                raise ProtocolError(f"oversize: {len(data)} bytes")
            env = unpack_envelope(data, max_size=self.config.max_message_size)
            src = env.src
            if env.net != self.net:
                raise ProtocolError(f"wrong network: {env.net!r}")
            if env.kind == "chunk":
                self._reassembler.expire()
                complete = self._reassembler.feed(env.src, env)
                if complete is None:
                    return
                data = complete
            elif env.kind != "model":
                raise ProtocolError(f"unexpected kind in inbox: {env.kind}")
            if len(data) > _INLINE_DECODE_BYTES:
                env, model = await asyncio.to_thread(self._decode, data)
            else:
                env, model = self._decode(data)
            if env.src != src:
                raise ProtocolError("sender mismatch between chunks and model")
            if model.round < self.round - self.config.max_round_lag:
                raise ProtocolError(f"stale round: {model.round} < {self.round}")
            if model.round > self._round_ceiling():
                raise ProtocolError(f"future round: {model.round} > {self._round_ceiling()}")
        except ProtocolError as exc:
            self._reject(src, exc.reason)
            return
        self.counters.models_received += 1
        by_round = self._received.setdefault(src, {})
        by_round[model.round] = _Received(src, model.round, model.age, model.weights)
        while len(by_round) > 3:  # bounded memory whatever a peer sends
            del by_round[min(by_round)]
        self._arrived.set()

    def _round_ceiling(self) -> int:
        """The highest round a model may claim: ours, or the live peers' median, plus the lag.

        Catching up to a network that is ahead is allowed (a restarted or slow node); one peer
        claiming round 10**9 is not, since adopting it would end everyone's run.
        """
        rounds = sorted(
            info.round
            for p in self.view.live()
            if (info := self.view.get(p)) is not None and info.round is not None
        )
        median = rounds[(len(rounds) - 1) // 2] if rounds else 0
        return max(self.round, median) + self.config.max_round_lag + 1

    def _decode(self, data: Payload) -> Any:
        return decode_model(
            data, expected=self._expected, net=self.net, max_size=self.config.max_message_size
        )

    async def _on_other(self, message: Message) -> None:
        try:
            _net, kind, peer_id = topics.parse(message.topic)
        except ProtocolError:
            return
        if kind != "presence" or peer_id == self.node_id or not message.payload:
            return
        try:
            env = unpack_envelope(message.payload, max_size=64 * 1024)
            record = parse_presence(env)
            if env.src != peer_id or env.net != self.net:
                raise ProtocolError("presence record does not match its topic")
        except ProtocolError as exc:
            self._reject(peer_id, exc.reason)
            return
        if not record.online:
            if record.graceful and record.round is not None:
                self._finished[peer_id] = record.round
            if self.view.remove(peer_id, "offline"):
                log.info("peer left id=%s", peer_id)
            return
        self._finished.pop(peer_id, None)
        info = PeerInfo(
            id=peer_id,
            role=record.role,
            broker=record.broker,
            source="presence",
            last_seen=self.clock(),
            round=record.round,
        )
        if peer_id not in self.view:
            log.info("peer joined id=%s broker=%s", peer_id, record.broker)
        self.view.upsert(info)
        if record.broker and record.broker not in self._announced:
            # The peer learned of us before we knew it: make sure it hears our presence too.
            await self._announce_to(record.broker)

    # ---- presence ---------------------------------------------------------------------------

    def discovered(self, info: PeerInfo) -> None:
        """A discovery source (mDNS) found a peer; safe to call from any callback on the loop."""
        if info.id != self.node_id:
            self._discovered.put_nowait(info)

    def vanished(self, peer_id: str) -> None:
        """A discovery source saw a peer leave (e.g. an mDNS goodbye)."""
        if self.view.remove(peer_id, "gone"):
            log.info("peer left id=%s", peer_id)

    async def _discovery_loop(self) -> None:
        while True:
            info = await self._discovered.get()
            if "presence" in self.config.discovery:
                # Like a static peer: an address. It joins the view when its presence is heard.
                if info.broker and info.broker not in self._announced:
                    await self._announce_to(info.broker)
            else:
                if info.id not in self.view:
                    log.info(
                        "peer joined id=%s broker=%s source=%s", info.id, info.broker, info.source
                    )
                self.view.upsert(info)

    def _presence_message(self, *, online: bool, graceful: bool = True) -> Message:
        self._seq += 1
        payload = encode_presence(
            self.net,
            self.node_id,
            self._seq,
            online=online,
            graceful=graceful,
            role=self.config.role,
            broker=self.home_broker,
            round=self.round,
        )
        return Message(topics.presence(self.net, self.node_id), payload, retain=True)

    def _static_info(self, peer_id: str, broker: str) -> PeerInfo:
        return PeerInfo(
            id=peer_id, role="trainer", broker=broker, source="static", last_seen=self.clock()
        )

    async def _announce_to(self, broker: str) -> None:
        self._announced.add(broker)
        if broker == self.home_broker:
            return
        msg = self._presence_message(online=True)
        try:
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self._broker_for(broker)
            )
        except (ValueError, TransportError) as exc:
            log.warning("cannot announce to broker=%s error=%s", broker, exc)

    async def _publish_presence(self, *, online: bool) -> None:
        if "presence" not in self.config.discovery:
            return
        msg = self._presence_message(online=online)
        brokers = {self.home_broker} | self._announced
        for broker in brokers:
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self._broker_for(broker)
            )

    async def _heartbeat_loop(self) -> None:
        interval = self.config.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            for gone in self.view.expire():
                log.info("peer expired id=%s", gone)
            await self._publish_presence(online=True)

    # ---- telemetry --------------------------------------------------------------------------

    async def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval
        if interval <= 0 and self._logs is None:
            return
        stats = ProcessStats()
        topic = topics.telemetry(self.net, self.node_id)
        next_at = self.clock()
        while True:
            if self._logs is not None:
                for record in self._logs.drain():
                    self._seq += 1
                    payload = encode_log(self.net, self.node_id, self._seq, record)
                    await self._publish_home(topics.log(self.net, self.node_id), payload, False)
            if interval > 0 and self.clock() >= next_at:
                next_at = self.clock() + interval
                body = await asyncio.to_thread(self._telemetry_body, stats)
                self._seq += 1
                payload = encode_telemetry(self.net, self.node_id, self._seq, body)
                await self._publish_home(topic, payload, True)
            await asyncio.sleep(min(1.0, interval) if interval > 0 else 1.0)

    async def _publish_home(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            await self.transport.publish(topic, payload, qos=0, retain=retain)
        except TransportError as exc:
            log.debug("telemetry not published error=%s", exc)

    def _telemetry_body(self, stats: ProcessStats) -> dict[str, Any]:
        """The status record; computes the weight projection, so it runs in a worker thread."""
        ev = self.last_eval
        cpu, rss = stats.sample()
        c = self.counters
        return {
            "id": self.node_id,
            "role": self.config.role,
            "run": self.config.run_name,
            "tags": list(self.config.tags),
            "schedule": self.schedule.name,
            "mode": self.config.mode,
            "broker": self.home_broker,
            "round": self.round,
            "loss": self._last_loss,
            "accuracy": None if ev is None else ev.accuracy,
            "test_loss": None if ev is None else ev.loss,
            "confusion": None if ev is None else ev.confusion.tolist(),
            "samples": self.learner.num_samples,
            "models_sent": c.models_sent,
            "models_received": c.models_received,
            "bytes_out": c.bytes_sent,
            "bytes_in": c.bytes_received,
            "rejected": dict(c.rejected),
            "cpu": cpu,
            "rss": rss,
            "uptime": self.clock() - self._started,
            "peers": self.view.live(),
            "sent_to": list(self._sent_to),
            "projection": projection(self.learner.get_weights(), self.net),
        }

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _resume(self) -> None:
        if self.state is None:
            return
        ckpt = await asyncio.to_thread(self.state.latest_checkpoint)
        if ckpt is None:
            return
        self.learner.set_weights(ckpt.weights)
        self.round = ckpt.round
        log.info("resumed from checkpoint round=%d", ckpt.round)

    async def _shutdown(self) -> None:
        try:
            await self._publish_presence(online=False)
        except Exception as exc:  # the broker may be gone already; closing matters more
            log.warning("could not publish bye error=%s", exc)
        await self.transport.close()
        log.info("node stopped id=%s round=%d", self.node_id, self.round)
