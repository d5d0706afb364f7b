"""Secure aggregation's wire parts: the X25519 key in presence, the ask/seeds messages, and
masked models at the inbox."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.discovery.presence import encode_presence, parse_presence
from p2pfl.identity import Identity
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.protocol.envelope import Envelope, pack_envelope, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import encode_model, layout
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


# -- masked models at the inbox ---------------------------------------------------------------


def _inbox(secure: bool) -> Inbox:
    config = NodeConfig.model_validate(
        {"network": NET, "id": "me", "mode": "sync", "merge": "average",
         "schedule": "partial-mesh", "secure_aggregation": secure}
    )  # fmt: skip
    box = Inbox(config, NodeCounters(), clock=time.monotonic)
    box.layout = layout(_plain())
    return box


def _plain() -> dict[str, Any]:
    return {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _model(weights: dict[str, Any], meta: dict[str, Any] | None, **kw: Any) -> bytes:
    return bytes(encode_model(weights, net=NET, src="a", seq=1, round=1, age=1.0, meta=meta,
                              **kw))  # fmt: skip


@pytest.mark.parametrize(
    ("masked", "meta", "codec", "secure", "label"),
    [
        (False, None, "raw", True, "secagg-payload"),  # a plain model while secagg is on
        (True, {"secagg": ["a", "b"]}, "raw", False, "secagg-payload"),  # masked, secagg off
        (True, {"secagg": ["b", "c"]}, "raw", True, "secagg-payload"),  # not its own sender
        (True, {"secagg": ["b", "a"]}, "raw", True, "secagg-payload"),  # not sorted
        (True, {"secagg": ["a"]}, "raw", True, "secagg-payload"),  # alone: no mask
        (True, {"secagg": "ab"}, "raw", True, "secagg-payload"),
        (True, {"secagg": ["a", "b"]}, "int8", True, "secagg-payload"),  # masks need raw
        (False, {"secagg": ["a", "b"]}, "raw", True, "layout"),  # float32, not int64
    ],
)
async def test_bad_masked_payloads_are_dropped_by_reason(
    masked: bool, meta: dict[str, Any] | None, codec: str, secure: bool, label: str
) -> None:
    weights = _plain()
    if masked:
        weights = {k: np.full(v.shape, 7, np.int64) for k, v in weights.items()}
    box = _inbox(secure)
    await box.accept(_model(weights, meta, codec=codec), lowest=0, highest=5)
    assert box.counters.models_received == 0
    assert dict(box.counters.rejected) == {label: 1}


async def test_a_good_masked_payload_is_buffered_with_its_senders() -> None:
    box = _inbox(True)
    weights = {k: np.full(v.shape, 7, np.int64) for k, v in _plain().items()}
    await box.accept(_model(weights, {"secagg": ["a", "b"]}), lowest=0, highest=5)
    assert box.counters.rejected_total == 0
    model = box.model("a", 1)
    assert model is not None and model.senders == ("a", "b")
