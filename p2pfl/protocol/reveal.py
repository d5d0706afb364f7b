"""Secure aggregation's dropout messages (kind ``secagg``), on the inbox topic, signed.

When a sender's masked model has not arrived by the round deadline, the receiver sends each
sender that did deliver one ``ask``: ``{op: "ask", round, dropped: [ids]}``. Each answers
with ``{op: "seeds", round, seeds: {dropped id: 32-byte seed}}``, the seeds of its pairs with
the dropped senders for that receiver and round only (``p2pfl.secagg``). Anything else is a
ProtocolError whose text starts with ``secagg``, so it is counted under its own label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from p2pfl.protocol.envelope import Envelope, Signer, is_int, pack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import validate_name

SEED_SIZE = 32
MAX_IDS = 256


@dataclass(frozen=True)
class Ask:
    """A receiver asks a sender that delivered for its seeds with the senders that did not."""

    round: int
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class Seeds:
    """A sender's seeds with dropped senders, for the receiver that asked, for one round."""

    round: int
    seeds: dict[str, bytes]


def encode_ask(ask: Ask, *, net: str, src: str, seq: int, signer: Signer | None) -> bytes:
    body = {"op": "ask", "round": ask.round, "dropped": list(ask.dropped)}
    return bytes(pack_envelope(Envelope.create("secagg", body, net=net, src=src, seq=seq), signer))


def encode_seeds(seeds: Seeds, *, net: str, src: str, seq: int, signer: Signer | None) -> bytes:
    body = {"op": "seeds", "round": seeds.round, "seeds": dict(seeds.seeds)}
    return bytes(pack_envelope(Envelope.create("secagg", body, net=net, src=src, seq=seq), signer))


def parse_reveal(env: Envelope) -> Ask | Seeds:
    """The request or answer in a ``secagg`` envelope; ProtocolError when it is malformed."""
    body = env.body
    op, rnd = body.get("op"), body.get("round")
    if not isinstance(rnd, int) or not is_int(rnd) or not 0 <= rnd < 2**63:
        raise ProtocolError(
            f"secagg payload: round must be a non-negative integer, got {rnd!r:.40}"
        )
    if op == "ask" and set(body) == {"op", "round", "dropped"}:
        return Ask(rnd, _ids(body["dropped"]))
    if op == "seeds" and set(body) == {"op", "round", "seeds"}:
        seeds = body["seeds"]
        if not isinstance(seeds, Mapping) or not 0 < len(seeds) <= MAX_IDS:
            raise ProtocolError("secagg payload: seeds must be a non-empty map")
        _ids(list(seeds))
        if not all(isinstance(v, bytes) and len(v) == SEED_SIZE for v in seeds.values()):
            raise ProtocolError(f"secagg payload: every seed must be {SEED_SIZE} bytes")
        return Seeds(rnd, dict(seeds))
    raise ProtocolError(f"secagg payload: not an ask or seeds message (op {op!r:.20})")


def _ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ProtocolError("secagg payload: ids must be a list")
    if not 0 < len(value) <= MAX_IDS or len(set(value)) != len(value):
        raise ProtocolError(f"secagg payload: 1 to {MAX_IDS} distinct ids")
    try:
        return tuple(validate_name(v, "node id") for v in value)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"secagg payload: {exc}") from None
