"""Trust: who may speak for an id (tofu, allowlist, open), signatures, replays; attack by attack."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from p2pfl.identity import Identity, TrustedKeys
from p2pfl.protocol.envelope import Envelope, pack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.trust import REPLAY_WINDOW, Trust

NOW = 1_000_000.0


def message(
    signer: Identity | None,
    *,
    src: str = "n1",
    seq: int = 1,
    ts: float = NOW,
    kind: str = "presence",
    body: dict[str, object] | None = None,
) -> bytes:
    env = Envelope(1, kind, "lab", src, seq, ts, body if body is not None else {"x": 1})
    return bytes(pack_envelope(env, signer))


def trust(policy: str = "tofu", state_dir: Path | None = None, **kw: object) -> Trust:
    return Trust(policy, state_dir=state_dir, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def refused(t: Trust, data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        t.check(data)
    return info.value.reason


def test_unsigned_messages_are_refused_unless_the_network_is_open() -> None:
    assert refused(trust(), message(None)).startswith("unsigned")
    assert trust("open").check(message(None)).src == "n1"


def test_first_key_is_pinned_and_an_impostor_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real, mallory = Identity.generate(), Identity.generate()
    t = trust(state_dir=tmp_path)
    assert t.check(message(real, seq=1)).pk == real.public_raw
    with caplog.at_level(logging.ERROR, logger="p2pfl.trust"):
        assert refused(t, message(mallory, seq=2)).startswith("untrusted")
        assert refused(t, message(mallory, seq=3)).startswith("untrusted")
    loud = [r for r in caplog.records if "KEY CHANGED" in r.getMessage()]
    assert len(loud) == 1  # loudly, once
    # The pin survives a restart of the node.
    again = trust(state_dir=tmp_path)
    assert refused(again, message(mallory, seq=4)).startswith("untrusted")
    assert again.check(message(real, seq=5)).src == "n1"


def test_allowlist_accepts_only_trusted_keys(tmp_path: Path) -> None:
    friend, stranger = Identity.generate(), Identity.generate()
    TrustedKeys(tmp_path).add("n1", friend.public)
    t = trust("allowlist", tmp_path)
    assert t.check(message(friend)).src == "n1"
    assert refused(t, message(stranger, src="n2")).startswith("untrusted")
    assert refused(t, message(stranger, seq=2)).startswith("untrusted")  # forged id


def test_a_tampered_message_has_a_bad_signature() -> None:
    me = Identity.generate()
    data = bytearray(message(me, body={"round": 3}))
    data[-1] ^= 0x01  # the round in the body
    assert refused(trust(), bytes(data)).startswith("bad signature")


def test_a_key_swapped_in_by_an_attacker_does_not_verify() -> None:
    real, mallory = Identity.generate(), Identity.generate()
    data = message(real)
    forged = data.replace(real.public_raw, mallory.public_raw)
    assert refused(trust(), forged).startswith("bad signature")


def test_replays_and_stale_or_future_messages_are_refused() -> None:
    me = Identity.generate()
    t = trust()
    first = message(me, seq=10_000)
    t.check(first)
    assert refused(t, first).startswith("replay")  # the same message again
    t.check(message(me, seq=9_990))  # late, out of order: taken once
    assert refused(t, message(me, seq=9_990)).startswith("replay")
    assert refused(t, message(me, seq=10_000 - REPLAY_WINDOW)).startswith("replay")  # too old
    assert refused(t, message(me, seq=10_001, ts=NOW - 3600)).startswith("replay")
    assert refused(t, message(me, seq=10_002, ts=NOW + 3600)).startswith("replay")
    t.check(message(me, seq=10_003, ts=NOW + 10))  # small skew is fine
    t.check(message(me, seq=10_003 + 5 * REPLAY_WINDOW))  # a jump ahead resets the window


def test_chunks_of_one_transfer_share_a_seq_and_wills_are_exempt() -> None:
    me = Identity.generate()
    t = trust()
    t.check(message(me, seq=20, kind="chunk"))
    t.check(message(me, seq=20, kind="chunk"))
    # A will was signed at connect time, long before the broker publishes it.
    t.check(message(me, seq=3, ts=NOW - 7200, kind="will"))
    # A payload rebuilt from checked chunks is not a replay of them.
    t.check(message(me, seq=19, kind="model"), replay=False)


def test_the_number_of_ids_is_bounded() -> None:
    t = trust(max_peers=3)
    for i in range(3):
        t.check(message(Identity.generate(), src=f"n{i}"))
    assert refused(t, message(Identity.generate(), src="n9")).startswith("untrusted")


def test_ca_policy_is_not_offered_yet() -> None:
    with pytest.raises(ValueError, match="not available yet"):
        Trust("ca")
