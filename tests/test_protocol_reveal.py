"""Secure aggregation's wire parts: the X25519 key in presence, and the ask/seeds messages."""

from __future__ import annotations

from typing import Any

import pytest

from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.identity import Identity
from p2pfl.protocol.envelope import Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.reveal import Ask, Seeds, encode_ask, encode_seeds, parse_reveal
from p2pfl.trust import Trust

NET = "rv"
KEY = Identity.generate()


def test_presence_carries_a_signed_agreement_key() -> None:
    data = encode_presence(NET, "a", 1, online=True, role="trainer", broker="mqtt://h:1",
                           signer=KEY, xk=b"k" * 32)  # fmt: skip
    Trust("tofu").check(data)  # the key is inside what the identity key signed
    assert parse_presence(unpack_envelope(data)).xk == b"k" * 32
    tampered = bytearray(data)
    tampered[tampered.index(b"k" * 32)] ^= 1
    with pytest.raises(ProtocolError, match="bad signature"):
        Trust("tofu").check(bytes(tampered))
    plain = encode_presence(NET, "a", 2, online=True, role="trainer", broker="mqtt://h:1")
    assert parse_presence(unpack_envelope(plain)).xk is None
    short = encode_presence(NET, "a", 3, online=True, role="trainer", broker="mqtt://h:1",
                            xk=b"k" * 31)  # fmt: skip
    with pytest.raises(ProtocolError, match="xk"):
        parse_presence(unpack_envelope(short))


def test_ask_and_seeds_round_trip() -> None:
    ask = encode_ask(Ask(3, ("b", "c")), net=NET, src="a", seq=1, signer=KEY)
    assert parse_reveal(unpack_envelope(ask)) == Ask(3, ("b", "c"))
    seeds = encode_seeds(Seeds(3, {"b": b"s" * 32}), net=NET, src="a", seq=2, signer=KEY)
    assert parse_reveal(unpack_envelope(seeds)) == Seeds(3, {"b": b"s" * 32})


@pytest.mark.parametrize(
    "body",
    [
        {"op": "ask", "round": 1},
        {"op": "ask", "round": -1, "dropped": ["b"]},
        {"op": "ask", "round": True, "dropped": ["b"]},
        {"op": "ask", "round": 1, "dropped": []},
        {"op": "ask", "round": 1, "dropped": ["b", "b"]},
        {"op": "ask", "round": 1, "dropped": ["a/b"]},
        {"op": "ask", "round": 1, "dropped": "b"},
        {"op": "ask", "round": 1, "dropped": ["b"], "extra": 1},
        {"op": "seeds", "round": 1, "seeds": {}},
        {"op": "seeds", "round": 1, "seeds": {"b": b"short"}},
        {"op": "seeds", "round": 1, "seeds": {"b": "s" * 32}},
        {"op": "seeds", "round": 1, "seeds": [b"s" * 32]},
        {"op": "reveal-all", "round": 1},
    ],
)
def test_malformed_bodies_are_refused_as_secagg_payload(body: dict[str, Any]) -> None:
    env = unpack_envelope(pack_envelope(Envelope.create("secagg", body, net=NET, src="a", seq=1)))
    with pytest.raises(ProtocolError) as err:
        parse_reveal(env)
    assert err.value.reason.startswith("secagg payload")
