"""What a node accepts from its peers: the inbox topic's defensive decoding and model buffer.

Every message on a node's inbox goes through `Inbox.accept`: size limit, signature, whether
the sender is a peer of this node at all, envelope, network, chunk reassembly, model decoding
against the local model's layout, and a round window. Anything wrong is dropped, counted under a
label from a fixed set and logged once per peer; nothing is ever raised into the node's loop.
Accepted models wait in a small per-sender buffer until the node merges them; everything kept
per sender goes when the node says the peer left (`forget`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.discovery.shuffle import MAX_SHUFFLE
from p2pfl.protocol import chunking
from p2pfl.protocol.envelope import Envelope, Header, peek, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import ModelMessage, container_limit, model_from_envelope
from p2pfl.secagg import MAX_SENDERS, masked_layout
from p2pfl.transport.base import Payload
from p2pfl.trust import TRUST_REASONS, Duplicate, Trust

log = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

# Decoding big payloads is done off the loop; small ones are cheaper inline.
_INLINE_DECODE_BYTES = 256 * 1024
# Rounds buffered per sender, whatever a peer sends.
_ROUNDS_PER_SENDER = 3
# (peer, label) pairs logged once: beyond this many, refusals are counted but not logged, so a
# flood of made-up sender ids cannot grow the set or the log (entries go when a peer leaves).
_MAX_LOGGED = 4096

# Rejection counters use a fixed set of labels, whatever text a peer's message provokes.
_REASONS = (
    *TRUST_REASONS,
    # secure aggregation (p2pfl.secure_round): first, whatever else their text says
    ("secagg payload", "secagg-payload"),
    ("secagg reveal", "secagg-reveal"),
    ("secagg round", "secagg-round"),
    ("shuffle", "shuffle"),
    # before "sender", which would capture "unknown sender"
    ("unknown sender", "unknown-sender"),
    ("max-peers", "max-peers"),
    ("new-peer-rate", "new-peer-rate"),
    ("acl:", "acl"),  # refused by this node's broker (p2pfl.broker_auth)
    ("retained budget", "retained"),
    ("malformed", "malformed"),
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
    ("own broker", "own-broker"),
    ("presence", "presence"),
    ("mismatch", "layout"),
    ("tensor", "layout"),
    ("node paused", "paused"),
)


async def _off_loop_if(big: bool, work: Callable[[A], R], arg: A) -> R:
    """Large messages are parsed in a worker thread, so the loop keeps serving the others."""
    return await asyncio.to_thread(work, arg) if big else work(arg)


def reason_label(reason: str) -> str:
    """A short label from a fixed set for a rejection reason."""
    text = reason.lower()
    return next((label for needle, label in _REASONS if needle in text), "invalid")


@dataclass
class NodeCounters:
    """What a node has done so far; reported every round and in telemetry."""

    rounds: int = 0
    """Rounds this node finished since it started (with walkers: its local training steps)."""
    models_sent: int = 0
    models_received: int = 0
    """Models accepted into the inbox; refused ones count in `rejected` instead."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages refused, by reason (see `reason_label`)."""
    bytes_sent: int = 0
    bytes_received: int = 0
    # Presence records (joins, heartbeats, leaves) and shuffles delivered to this node: the
    # membership's cost (`p2pfl bench scale`), bounded by the view size in a sampled network.
    membership_received: int = 0
    diverged: int = 0

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
            "membership_received": self.membership_received,
            "diverged": self.diverged,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(self.rejected),
        }


@dataclass(frozen=True)
class ReceivedModel:
    """A validated model from a peer, waiting to be merged."""

    src: str
    round: int
    age: float
    weights: dict[str, np.ndarray]
    senders: tuple[str, ...] = ()
    """Secure aggregation: who the sender masked with (the round's senders); () for a plain
    model."""


class Inbox:
    """Validates what arrives on a node's inbox and buffers the models worth merging."""

    trust: Trust | None = None
    """Checks signatures and senders' keys first (set by the node; None: trust everyone)."""
    admitted: Callable[[str], bool] | None = None
    """Whether a sender whose signature verified is a peer of this node, whose models may be
    taken at all (set by the node; None: every sender)."""
    on_secagg: Callable[[Envelope], Awaitable[None]] | None = None
    """Takes a verified ``secagg`` message (secure aggregation's seed requests and reveals);
    None: such messages are refused."""
    paused: Callable[[], bool] | None = None
    """While it says True the node does not train (`--when`, `p2pfl pause`): models that come
    are dropped, counted ``paused``, before reassembly or decoding (nothing kept to merge
    later). None: never paused."""
    on_shuffle: Callable[[Envelope], Awaitable[None]] | None = None
    """Takes a verified ``shuffle`` message (peer sampling), from any signed sender: a node
    shuffles with peers that do not know it yet. None: such messages are refused."""

    def __init__(self, config: NodeConfig, counters: NodeCounters, *, clock: Any) -> None:
        self.config = config
        self.counters = counters
        self.net = config.network
        self.layout: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        self.arrived = asyncio.Event()
        self._models: dict[str, dict[int, ReceivedModel]] = {}
        # The newest round merged from each sender: a model taken early (a node catching up
        # takes a model from rounds ahead at once) still counts as that round's model.
        self._merged: dict[str, int] = {}
        self._logged: set[tuple[str, str]] = set()
        self._reassembler = chunking.Reassembler(
            max_pending_bytes_per_sender=2 * config.max_message_size,
            timeout=max(config.round_timeout, 30.0),
            clock=clock,
            # Room for every mesh neighbour's model at once; spoofed sender ids get no more.
            max_pending_bytes=max(4, config.degree + 1) * config.max_message_size,
            max_message_size=config.max_message_size,
            on_expire=self._transfer_expired,
        )

    async def sweep_loop(self, interval: float | None = None) -> None:
        """Drop chunked transfers left idle past their timeout, every ``interval`` seconds.

        Runs until cancelled. Without it an abandoned transfer would hold its bytes until the
        next chunk arrives from anyone. The default interval is a quarter of the timeout.
        """
        period = self._reassembler.timeout / 4 if interval is None else interval
        while True:
            await asyncio.sleep(period)
            self._reassembler.expire()

    def _transfer_expired(self, src: str) -> None:
        self.reject(src, "chunked transfer expired incomplete")

    def reject(self, src: str, reason: str) -> None:
        """Count a refused message and log it once per peer and label."""
        label = reason_label(reason)
        self.counters.rejected[label] += 1
        if (src, label) in self._logged:
            return
        if len(self._logged) >= _MAX_LOGGED:
            if ("", "") not in self._logged:  # said once, in the last place left
                self._logged.add(("", ""))
                log.warning(
                    "rejections from %d peer/reason pairs logged already: further ones are "
                    "counted, not logged, until peers leave",
                    len(self._logged),
                )
            return
        self._logged.add((src, label))
        log.warning("message rejected peer=%s reason=%s", src, reason)

    def forget(self, src: str, *, models: bool = True) -> None:
        """Drop what is kept for a peer that left: its partial transfers, its log-once
        entries and (``models``) its buffered models."""
        if models:
            self._models.pop(src, None)
            self._merged.pop(src, None)
        self._reassembler.forget(src)
        self._logged = {entry for entry in self._logged if entry[0] != src}
        self._logged.discard(("", ""))  # room again: the next new one is logged

    async def accept(self, data: Payload, *, lowest: int, highest: int) -> None:
        """Take one inbox message; a model with a round in [lowest, highest] is buffered."""
        src = "?"
        try:
            if len(data) > self.config.max_message_size:
                raise ProtocolError(f"oversize: {len(data)} bytes")
            big = len(data) > _INLINE_DECODE_BYTES
            if self.trust is not None or self.admitted is not None:
                # who says it, before anything of the body is decoded or reassembled
                header = peek(data)
                src = header.src
                await self._check_sender(header, len(data), big)
            env = await _off_loop_if(big, self._unpack, data)
            src = env.src
            if env.net != self.net:
                raise ProtocolError(f"wrong network: {env.net!r}")
            if env.kind in ("model", "chunk") and self.paused is not None and self.paused():
                raise ProtocolError("node paused: models are not kept while it does not train")
            if env.kind == "chunk":
                self._reassembler.expire()
                complete = self._reassembler.feed(env.src, env)
                if complete is None:
                    return
                data = complete
                # Every chunk was signed by `src`, over a slice and the digest of the whole,
                # which the reassembler checked: hashing the payload again would add nothing.
                # The model inside must still name the same sender (checked below).
                big = len(data) > _INLINE_DECODE_BYTES
                env = await _off_loop_if(big, self._unpack, data)
            elif env.kind == "secagg" and self.on_secagg is not None:
                await self.on_secagg(env)
                return
            elif env.kind == "shuffle" and self.on_shuffle is not None:
                self.counters.membership_received += 1
                await self.on_shuffle(env)
                return
            elif env.kind != "model":
                raise ProtocolError(f"unexpected kind in inbox: {env.kind}")
            # A model message is parsed once: validated from the envelope already unpacked.
            model = await _off_loop_if(len(data) > _INLINE_DECODE_BYTES, self._validate, env)
            if env.src != src:
                raise ProtocolError("sender mismatch between chunks and model")
            if model.round < lowest:
                raise ProtocolError(f"stale round: {model.round} < {lowest}")
            if model.round > highest:
                raise ProtocolError(f"future round: {model.round} > {highest}")
        except ProtocolError as exc:
            self.reject(src, exc.reason)
            return
        except Duplicate:  # delivered twice (MQTT QoS 1): taken already, nothing refused
            return
        self.counters.models_received += 1
        by_round = self._models.setdefault(src, {})
        senders = tuple(model.meta.get("secagg", ()))
        by_round[model.round] = ReceivedModel(src, model.round, model.age, model.weights, senders)
        while len(by_round) > _ROUNDS_PER_SENDER:
            del by_round[min(by_round)]
        self.arrived.set()

    async def _check_sender(self, header: Header, size: int, big: bool) -> None:
        """The signature and admission of a message's sender (raises ProtocolError)."""
        shuffle = header.kind == "shuffle" and self.on_shuffle is not None
        if shuffle and size > MAX_SHUFFLE:
            raise ProtocolError(f"oversize: a view exchange of {size} bytes")
        if self.trust is not None:
            await _off_loop_if(big, self.trust.verify, header)
        if self.admitted is not None and not shuffle and not self.admitted(header.src):
            raise ProtocolError("unknown sender: not a live peer of this node")

    def _unpack(self, data: Payload) -> Envelope:
        return unpack_envelope(
            data,
            max_size=self.config.max_message_size,
            max_container_len=container_limit(self.layout),
        )

    def _validate(self, env: Envelope) -> ModelMessage:
        if env.net != self.net:  # again: a reassembled payload carries its own envelope
            raise ProtocolError(f"wrong network: {env.net!r}")
        meta = env.body.get("meta")
        masked = isinstance(meta, dict) and "secagg" in meta
        if not self.config.secure_aggregation:
            if masked:
                raise ProtocolError("secagg payload: masked model, secure aggregation is off")
            return model_from_envelope(env, expected=self.layout)
        if not masked:
            raise ProtocolError("secagg payload: plain model, secure aggregation is on")
        model = model_from_envelope(env, expected=masked_layout(self.layout))
        senders = model.meta["secagg"]
        if (
            not isinstance(senders, list)
            or not 2 <= len(senders) <= MAX_SENDERS
            or env.src not in senders
            or not all(isinstance(p, str) for p in senders)
            or sorted(set(senders)) != senders
        ):
            raise ProtocolError("secagg payload: the senders list is not a sorted list of ids")
        if model.codec != "raw":
            raise ProtocolError("secagg payload: a masked model travels raw")
        return model

    def drop_models(self) -> None:
        """Forget every buffered model (the node pauses: they would be stale when it resumes)."""
        self._models = {}
        self._merged = {}

    def __bool__(self) -> bool:
        return any(self._models.values())

    def newest_round(self, src: str) -> int:
        """The newest round buffered or merged from `src` (0 if none)."""
        return max([self._merged.get(src, 0), *self._models.get(src, ())])

    def model(self, src: str, r: int) -> ReceivedModel | None:
        """The round-r model buffered from `src`, if any."""
        return self._models.get(src, {}).get(r)

    def take(self, r: int, expected: Collection[str] = ()) -> list[ReceivedModel]:
        """The models to merge at round r: the newest per sender, within the allowed lag.

        In sync mode a model of a later round waits in the buffer for its round: a neighbour
        ahead of us (one that does not wait for us) would otherwise make us skip rounds by
        timing alone, and the same seed would give another run. A node catches up only on
        evidence that it fell behind: a sender it `expected` this round whose round-r model
        neither came nor was merged (that sender is past round r, or we resumed from a
        checkpoint); then models two or more rounds ahead are taken at once, so it does not
        trail forever. A neighbour's next round stays buffered even then (we play it next).
        """
        taken: list[ReceivedModel] = []
        kept: dict[str, dict[int, ReceivedModel]] = {}
        oldest = r - self.config.max_round_lag
        sync = self.config.mode == "sync"
        behind = not sync or any(self._skipped(p, r) for p in expected)
        ahead = r + 1 if sync else r  # rounds above this are taken when behind
        for src, by_round in self._models.items():
            now = [m for rr, m in by_round.items() if oldest <= rr <= r]
            if behind:
                now.extend(m for rr, m in by_round.items() if rr > ahead)
            newest = max(now, key=lambda m: m.round, default=None)
            last = r if newest is None else max(r, newest.round)
            later = {rr: m for rr, m in by_round.items() if rr > last}
            if later:
                kept[src] = later
            if newest is not None:
                taken.append(newest)
                self._merged[src] = max(self._merged.get(src, 0), newest.round)
        self._models = kept
        # Merge in a fixed order: float sums then do not depend on arrival order.
        return sorted(taken, key=lambda m: m.src)

    def _skipped(self, src: str, r: int) -> bool:
        """Whether `src`'s round-r model neither came (buffered, within the lag) nor was merged."""
        if self._merged.get(src, 0) >= r:
            return False
        oldest = r - self.config.max_round_lag
        return not any(oldest <= rr <= r for rr in self._models.get(src, ()))

    def take_newest(self) -> list[ReceivedModel]:
        """Every sender's newest model (walker tokens), emptying the buffer."""
        newest = [by_round[max(by_round)] for by_round in self._models.values() if by_round]
        self._models = {}
        return sorted(newest, key=lambda m: m.src)
