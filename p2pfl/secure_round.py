"""A node's side of secure aggregation (``--secure-aggregation``): what it masks, what it
reveals, and how it unmasks a round's sum. The arithmetic is in ``p2pfl.secagg``;
`SecureRound` keeps the state and decisions, `SecureAggregation` drives them for a `Node`.

Who sends to receiver i in round r is the partial-mesh schedule's answer for i, computed by
each sender from its own view (the pure functions of ``p2pfl.topology``), and written in the
masked model (``meta.secagg``: the sorted senders), so the receiver sums only models masked for
the same set. When a sender leaves mid-round (its will arrives), the others mask again for the
senders left and send again, and the receiver waits for models masked for the senders it
expects now (`SecureAggregation.missing`). The receiver asks for seeds only for senders of
that set whose model did not come (one ``ask`` per surviving sender, one ``seeds`` answer
each). A sender answers an ask only for a receiver and round it sent a masked model to, only
for senders of that round's set other than itself, only when at least one other sender
survives (else the sum would be its own model), never for a sender it knows delivered (its
presence or bye says it finished round r), and only one set of dropped senders per receiver
and round. Seeds are kept from the time of masking, so a crashed sender's key is not needed
any more.

What it does not do (Bonawitz et al. double masking): a sender that is late rather than gone,
whose seeds were revealed, and whose model then reaches the receiver anyway, is exposed to that
receiver. A receiver that lies about who dropped is refused only as far as the checks above see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from p2pfl import secagg
from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView
from p2pfl.inbox import ReceivedModel
from p2pfl.protocol.envelope import Envelope, Signer
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import encode_model
from p2pfl.protocol.reveal import Ask, Seeds, encode_ask, encode_seeds, parse_reveal
from p2pfl.secagg import AgreementKey, Masked, Reveal
from p2pfl.topology import Schedule

log = logging.getLogger(__name__)

KEPT_ROUNDS = 3
"""Rounds a sender keeps its seeds for (a receiver asks within its own round)."""


@dataclass
class _Sent:
    senders: tuple[str, ...]
    seeds: dict[str, bytes]
    answered: tuple[str, ...] | None = None  # the dropped set revealed for, once


@dataclass
class _Collecting:
    """A receiver's open request: round, whom it asked, for which dropped senders."""

    round: int
    asked: frozenset[str]
    dropped: frozenset[str]
    reveals: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.reveals) == len(self.asked) * len(self.dropped)


@dataclass(frozen=True)
class Group:
    """The masked models of one round that share a senders set, and who is missing from it."""

    models: list[ReceivedModel]
    senders: tuple[str, ...]

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(sorted(m.src for m in self.models))

    @property
    def dropped(self) -> tuple[str, ...]:
        got = set(self.survivors)
        return tuple(p for p in self.senders if p not in got)


class SecureRound:
    """Secure aggregation state of one node (``net``, ``node_id``)."""

    def __init__(self, net: str, node_id: str) -> None:
        self.net = net
        self.node_id = node_id
        self.key = AgreementKey.generate()
        self._sent: dict[tuple[str, int], _Sent] = {}
        self.collecting: _Collecting | None = None

    # ---- sender -------------------------------------------------------------------------------

    def mask_for(
        self,
        receiver: str,
        round: int,
        senders: Iterable[str],
        keys: Mapping[str, bytes | None],
        quantized: Masked,
    ) -> tuple[Masked, tuple[str, ...]] | None:
        """Our masked model for ``receiver`` in ``round`` and the senders it is masked for;
        None (logged) when it cannot be sent: no other sender (the receiver would see our
        model), or a partner whose key we do not have."""
        group = tuple(sorted({*senders, self.node_id}))
        partners = [p for p in group if p != self.node_id]
        if not partners:
            log.warning(
                "secagg: not sending to %s round=%d: we are its only sender", receiver, round
            )
            return None
        if len(group) > secagg.MAX_SENDERS:
            log.warning("secagg: not sending to %s: %d senders is too many", receiver, len(group))
            return None
        missing = [p for p in partners if not keys.get(p)]
        if missing:
            log.warning(
                "secagg: not sending to %s round=%d: no agreement key yet from %s",
                receiver,
                round,
                ",".join(missing),
            )
            return None
        seeds: dict[str, bytes] = {}
        for p in partners:
            try:
                seeds[p] = secagg.pair_seed(
                    self.key, keys[p] or b"", net=self.net, receiver=receiver, round=round,
                    pair=(self.node_id, p),
                )  # fmt: skip
            except ValueError as exc:  # a peer announced a key no agreement can use
                log.warning("secagg: not sending to %s: the key of %s: %s", receiver, p, exc)
                return None
        self._sent[(receiver, round)] = _Sent(group, seeds)
        for old in [k for k in self._sent if k[1] <= round - KEPT_ROUNDS]:
            del self._sent[old]
        return secagg.mask(quantized, self.node_id, seeds), group

    def answer(self, receiver: str, ask: Ask, delivered: Callable[[str, int], bool]) -> Seeds:
        """The seeds ``receiver`` asked for; ProtocolError (secagg reveal/round) when the ask
        is one a sender must refuse. ``delivered(peer, r)``: whether we know ``peer`` finished
        round ``r``."""
        sent = self._sent.get((receiver, ask.round))
        if sent is None:
            raise ProtocolError(
                f"secagg round: no masked model was sent to {receiver} for round {ask.round}"
            )
        dropped = tuple(sorted(ask.dropped))
        if not set(dropped) <= set(sent.senders) or self.node_id in dropped:
            raise ProtocolError("secagg reveal: asked for a peer that was not a sender")
        if len(sent.senders) - len(dropped) < 2:
            raise ProtocolError("secagg reveal: would leave our model alone in the sum")
        done = [p for p in dropped if delivered(p, ask.round)]
        if done:
            raise ProtocolError(f"secagg reveal: asked for {done[0]}, which delivered")
        if sent.answered is not None and sent.answered != dropped:
            raise ProtocolError("secagg reveal: a second, different set of dropped senders")
        sent.answered = dropped
        return Seeds(ask.round, {p: sent.seeds[p] for p in dropped})

    # ---- receiver -----------------------------------------------------------------------------

    @staticmethod
    def group(models: list[ReceivedModel], r: int) -> tuple[Group | None, list[ReceivedModel]]:
        """The round-r models to sum (the largest group masked for one senders set; ties to
        the first set in sort order) and those left out (another round, another set)."""
        sets: dict[tuple[str, ...], list[ReceivedModel]] = {}
        for m in models:
            if m.round == r and m.src in m.senders:
                sets.setdefault(m.senders, []).append(m)
        if not sets:
            return None, list(models)
        best = max(sorted(sets), key=lambda s: len(sets[s]))
        chosen = sets[best]
        return Group(chosen, best), [m for m in models if m not in chosen]

    def open(self, r: int, group: Group) -> list[str]:
        """Start collecting seeds for the group's dropped senders; who to ask."""
        self.collecting = _Collecting(r, frozenset(group.survivors), frozenset(group.dropped))
        return list(group.survivors)

    def take_seeds(self, src: str, seeds: Seeds) -> bool:
        """Keep a survivor's seeds; ProtocolError for one nobody asked for. True when every
        seed of the open request is in."""
        c = self.collecting
        if c is None or seeds.round != c.round:
            raise ProtocolError(f"secagg round: seeds for round {seeds.round}, none asked")
        if src not in c.asked or not set(seeds.seeds) <= c.dropped:
            raise ProtocolError(f"secagg reveal: seeds from {src} that were not asked for")
        for dropped, seed in seeds.seeds.items():
            c.reveals[(src, dropped)] = seed
        return c.complete

    def close(self) -> list[Reveal] | None:
        """The reveals of the open request when complete, else None; the request ends."""
        c, self.collecting = self.collecting, None
        if c is None or not c.complete:
            return None
        return [Reveal(j, gone, seed) for (j, gone), seed in sorted(c.reveals.items())]

    @staticmethod
    def merge(
        own: Mapping[str, np.ndarray], group: Group, reveals: list[Reveal]
    ) -> dict[str, np.ndarray]:
        """(own + the survivors' models) / (survivors + 1): plain averaging, unmasked."""
        summed = secagg.unmask(secagg.total(m.weights for m in group.models), reveals)
        return secagg.merged_average(own, summed, len(group.models))


class SecureAggregation:
    """Secure aggregation for one node: masks its model per receiver, sums and unmasks what it
    receives, asks for and answers seed reveals. The node calls it at four points of a sync
    round: `start_round`, `payload_for` (each target), `merge`, and `linger` after the last.

    ``send(peer, payload)`` delivers a small message to a peer's inbox (False: not sent);
    ``round_view(r)`` is the node's live view for round ``r`` (the schedule's input).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        node_id: str,
        view: PeerView,
        membership: Membership,
        schedule: Schedule,
        reject: Callable[[str, str], None],
        next_seq: Callable[[], int],
        signer: Signer | None,
        send: Callable[[str, bytes], Awaitable[bool]],
        round_view: Callable[[int], list[str]],
        stopping: Callable[[], bool],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.net = config.network
        self.node_id = node_id
        self.view = view
        self.membership = membership
        self.schedule = schedule
        self.state = SecureRound(self.net, node_id)
        self._reject = reject
        self._next_seq = next_seq
        self._signer = signer
        self._send = send
        self._round_view = round_view
        self._stopping = stopping
        self._clock = clock
        self._outgoing: tuple[int, Masked, float] | None = None  # round, quantized model, age
        self._masked_for: dict[str, tuple[str, ...]] = {}  # this round: target -> its senders
        self._seeds_in = asyncio.Event()

    @property
    def public_key(self) -> bytes:
        """Our X25519 key, for our presence record."""
        return self.state.key.public_raw

    async def start_round(self, r: int, weights: Mapping[str, np.ndarray], age: float) -> None:
        """Our round-r model, in fixed point, ready to be masked per receiver (ValueError for
        values that cannot be: see `secagg.quantize`)."""
        quantized = await asyncio.to_thread(secagg.quantize, weights)
        self._outgoing = (r, quantized, age)
        self._masked_for.clear()

    async def payload_for(self, target: str, r: int, sent: Container[str]) -> bytes | None:
        """Our round-r model masked for ``target``; None when there is nothing to send: it
        cannot be masked (see `SecureRound.mask_for`), or ``target`` has it (in ``sent``),
        masked for the senders our view still gives it. When a sender comes or goes
        mid-round, the target gets our model again, masked for the new set."""
        if self._outgoing is None or self._outgoing[0] != r:
            return None
        members = sorted({self.node_id, *self._round_view(r)} - {target})
        senders = tuple(sorted(self.schedule.plan(target, members, r).expect_from))
        if self.node_id not in senders:
            return None
        if target in sent and self._masked_for.get(target) == senders:
            return None
        _, quantized, age = self._outgoing
        keys = {p: self._agreement_key(p) for p in senders}
        made = await asyncio.to_thread(self.state.mask_for, target, r, senders, keys, quantized)
        if made is None:
            return None
        masked, group = made
        self._masked_for[target] = senders
        seq = self._next_seq()
        return bytes(
            await asyncio.to_thread(
                lambda: encode_model(
                    masked, net=self.net, src=self.node_id, seq=seq, round=r, age=age,
                    meta={"secagg": list(group)}, signer=self._signer,
                )
            )
        )  # fmt: skip

    async def merge(
        self, own: dict[str, np.ndarray], r: int, fresh: list[ReceivedModel]
    ) -> tuple[dict[str, np.ndarray] | None, int]:
        """The plain average of our model and the round's masked models, asking the
        survivors for seeds when some sender did not deliver; (None, 0) when nothing can be
        merged. Models of another round or senders set are refused (`secagg-round`)."""
        group, left_out = self.state.group(fresh, r)
        for m in left_out:
            self._reject(m.src, f"secagg round: round {m.round} or another senders set")
        if group is None:
            return None, 0
        reveals: list[Reveal] | None = []
        if group.dropped:
            log.info(
                "secagg round=%d: no model from %s, asking %s for their seeds",
                r,
                ",".join(group.dropped),
                ",".join(group.survivors),
            )
            reveals = await self._collect_seeds(r, group)
        if reveals is None:
            log.warning("secagg round=%d not merged: the survivors' seeds did not all come", r)
            return None, 0
        merged = await asyncio.to_thread(self.state.merge, own, group, reveals)
        return merged, len(group.models)

    @staticmethod
    def missing(
        expect: Iterable[str], r: int, model: Callable[[str, int], ReceivedModel | None]
    ) -> list[str]:
        """The expected senders whose round-r model has not come masked for exactly the
        senders expected now (``model(src, r)``: what is buffered). When a sender leaves
        mid-round the others mask again for the rest: wait for those, not sum the old ones."""
        senders = tuple(sorted(expect))
        return [p for p in senders if (m := model(p, r)) is None or m.senders != senders]

    async def on_message(self, env: Envelope) -> None:
        """An ask for our seeds, or a survivor's seeds (ProtocolError: refused, counted)."""
        message = parse_reveal(env)
        if isinstance(message, Seeds):
            self.state.take_seeds(env.src, message)
            self._seeds_in.set()
            return
        seeds = self.state.answer(env.src, message, self._delivered)
        payload = encode_seeds(seeds, net=self.net, src=self.node_id, seq=self._next_seq(),
                               signer=self._signer)  # fmt: skip
        if await self._send(env.src, payload):
            log.info(
                "secagg: revealed seeds receiver=%s round=%d dropped=%s",
                env.src,
                message.round,
                ",".join(message.dropped),
            )

    async def linger(self) -> None:
        """After the last round, stay (at most a round timeout) until every receiver of our
        last masked models has finished that round: one missing a sender asks us for seeds."""
        if self._outgoing is None:
            return
        r = self._outgoing[0]
        await self.membership.announce()  # our own round, so peers lingering for us stop too
        deadline = self._clock() + self.config.round_timeout
        while not self._stopping() and self._clock() < deadline:
            rounds = [self._peer_round(t) for t in self._masked_for]
            if all(rr is None or rr >= r for rr in rounds):  # finished, or gone
                return
            await asyncio.sleep(0.1)

    async def _collect_seeds(self, r: int, group: Group) -> list[Reveal] | None:
        """One ask to each survivor, then wait (at most a round timeout) for every seed."""
        if len(group.survivors) < 2:
            return None  # one survivor's seeds would reveal its model: it refuses
        for survivor in self.state.open(r, group):
            payload = encode_ask(Ask(r, group.dropped), net=self.net, src=self.node_id,
                                 seq=self._next_seq(), signer=self._signer)  # fmt: skip
            if not await self._send(survivor, payload):
                self.state.close()
                return None
        deadline = self._clock() + self.config.round_timeout
        c = self.state.collecting
        while c is not None and not c.complete and not self._stopping():
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._seeds_in.clear()
            try:
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._seeds_in.wait()
            except TimeoutError:
                pass
        return self.state.close()

    def _agreement_key(self, peer: str) -> bytes | None:
        info = self.view.get(peer)
        key = None if info is None else info.meta.get("xk")
        return key if isinstance(key, bytes) else None

    def _peer_round(self, peer: str) -> int | None:
        """The round a live peer announced (0: none yet); None when it is not in the view."""
        info = self.view.get(peer)
        return None if info is None else info.round or 0

    def _delivered(self, peer: str, r: int) -> bool:
        """Whether ``peer`` is known to have finished round ``r`` (so it sent its model)."""
        if (self._peer_round(peer) or 0) >= r:
            return True
        return self.membership.finished.get(peer, -1) >= r
