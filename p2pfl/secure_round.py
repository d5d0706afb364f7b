"""A node's side of secure aggregation (``--secure-aggregation``): what it masks, what it
reveals, and how it unmasks a round's sum. The arithmetic is in ``p2pfl.secagg``.

Who sends to receiver i in round r is the partial-mesh schedule's answer for i, computed by
each sender from its own view (the pure functions of ``p2pfl.topology``), and written in the
masked model (``meta.secagg``: the sorted senders), so the receiver sums only models masked for
the same set. The receiver asks for seeds only for senders of that set whose model did not come
(one ``ask`` per surviving sender, one ``seeds`` answer each). A sender answers an ask only
for a receiver and round it sent a masked model to, only for senders of that round's set other
than itself, only when at least one other sender survives (else the sum would be its own model),
never for a sender it knows delivered (its presence or bye says it finished round r), and only
one set of dropped senders per receiver and round. Seeds are kept from the time of masking, so
a crashed sender's key is not needed any more.

What it does not do (Bonawitz et al. double masking): a sender that is late rather than gone,
whose seeds were revealed, and whose model then reaches the receiver anyway, is exposed to that
receiver. A receiver that lies about who dropped is refused only as far as the checks above see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from p2pfl import secagg
from p2pfl.inbox import ReceivedModel
from p2pfl.protocol.envelope import Envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.reveal import Ask, Seeds, parse_reveal
from p2pfl.secagg import AgreementKey, Masked, Reveal

log = logging.getLogger("p2pfl.node")

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
        seeds = {
            p: secagg.pair_seed(
                self.key,
                keys[p] or b"",
                net=self.net,
                receiver=receiver,
                round=round,
                pair=(self.node_id, p),
            )
            for p in partners
        }
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

    def handle(self, env: Envelope) -> Ask | Seeds:
        """A ``secagg`` message parsed (ProtocolError if malformed)."""
        return parse_reveal(env)
