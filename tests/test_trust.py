"""Trust: who may speak for an id (tofu, allowlist, ca, open), signatures, replays; attack by
attack."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pfl.certs import issue
from p2pfl.discovery.presence import presence_certificate
from p2pfl.identity import Identity, TrustedKeys, public_bytes
from p2pfl.protocol.envelope import Envelope, pack_envelope, peek
from p2pfl.protocol.errors import ProtocolError
from p2pfl.trust import (
    KEYS_PER_PEER,
    REPLAY_WINDOW,
    Duplicate,
    Trust,
    signature_ok,
    trust_label,
)

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


def test_an_allowlist_given_in_memory_accepts_only_its_keys() -> None:
    """The simulator's nodes trust the run's own keys: a listed id with another key, or an id
    not listed, is refused; `keys` pins nothing under tofu (the first key seen is pinned)."""
    friend, stranger = Identity.generate(), Identity.generate()
    t = trust("allowlist", keys={"n1": friend.public_raw})
    assert t.check(message(friend)).src == "n1"
    assert refused(t, message(stranger, seq=2)).startswith("untrusted")  # forged id
    assert refused(t, message(stranger, src="n2")).startswith("untrusted")
    tofu = trust("tofu", keys={"n1": friend.public_raw})
    assert tofu.check(message(stranger)).src == "n1"


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


def test_a_remembered_signature_check_never_admits_what_verify_would_refuse(
    tmp_path: Path,
) -> None:
    """Signature checks are remembered per process (many simulated nodes hear one record):
    a remembered good signature must not carry a tampered copy, another key, or a key that
    this node's policy does not trust."""
    real, mallory = Identity.generate(), Identity.generate()
    data = message(real, body={"round": 3})
    signature_ok.cache_clear()
    assert trust().check(data).src == "n1"
    assert signature_ok.cache_info().currsize == 1
    assert trust().check(data).src == "n1"  # another node: the check is remembered
    assert signature_ok.cache_info().hits == 1
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    assert refused(trust(), bytes(tampered)).startswith("bad signature")
    forged = data.replace(real.public_raw, mallory.public_raw)
    assert refused(trust(), forged).startswith("bad signature")
    TrustedKeys(tmp_path).add("n1", mallory.public)  # n1 is mallory's name here
    assert refused(trust("allowlist", tmp_path), data).startswith("untrusted")
    header = peek(data)
    assert header.pk is not None and header.sig is not None
    assert signature_ok(header.pk, header.sig, header.digest())
    assert not signature_ok(mallory.public_raw, header.sig, header.digest())
    assert not signature_ok(header.pk, header.sig[::-1], header.digest())


def test_replays_and_stale_or_future_messages_are_refused() -> None:
    me = Identity.generate()
    t = trust()
    first = message(me, seq=10_000)
    t.check(first)
    # the seq again with another body: not a copy of what was taken
    assert refused(t, message(me, seq=10_000, body={"x": 2})).startswith("replay")
    late = message(me, seq=9_990)
    t.check(late)  # late, out of order: taken once
    t.check(message(me, seq=10_001))
    assert refused(t, late).startswith("replay")  # a message taken before the last one
    assert refused(t, first).startswith("replay")
    assert refused(t, message(me, seq=10_000 - REPLAY_WINDOW)).startswith("replay")  # too old
    assert refused(t, message(me, seq=10_001, ts=NOW - 3600)).startswith("replay")
    assert refused(t, message(me, seq=10_002, ts=NOW + 3600)).startswith("replay")
    t.check(message(me, seq=10_003, ts=NOW + 10))  # small skew is fine
    t.check(message(me, seq=10_003 + 5 * REPLAY_WINDOW))  # a jump ahead resets the window


def test_a_copy_of_the_last_message_taken_is_a_duplicate_not_a_replay() -> None:
    """MQTT delivers at least once: the very message taken last, arriving again, is dropped as
    a Duplicate (no refusal to count); an altered or older one is still a replay."""
    me = Identity.generate()
    t = trust()
    record = message(me, seq=5000)
    t.check(record)
    for _ in range(2):
        with pytest.raises(Duplicate):
            t.check(record)
    assert refused(t, message(me, seq=5000, body={"x": 2})).startswith("replay")
    newer = message(me, seq=5001)
    t.check(newer)
    assert refused(t, record).startswith("replay")  # an old record replayed
    with pytest.raises(Duplicate):
        t.check(newer)
    # A message never taken is no duplicate of anything: refused like before.
    assert refused(t, message(me, seq=5001 - REPLAY_WINDOW)).startswith("replay")
    assert refused(t, message(me, seq=5002, ts=NOW - 3600)).startswith("replay")


def test_chunks_of_one_transfer_share_a_seq_and_wills_are_exempt() -> None:
    me = Identity.generate()
    t = trust()
    t.check(message(me, seq=20, kind="chunk"))
    t.check(message(me, seq=20, kind="chunk"))
    # A will was signed at connect time, long before the broker publishes it.
    t.check(message(me, seq=3, ts=NOW - 7200, kind="will"))
    # A payload rebuilt from checked chunks is not a replay of them.
    t.check(message(me, seq=19, kind="model"), replay=False)


def test_the_number_of_keys_is_bounded_and_old_replay_windows_make_room() -> None:
    t = trust(max_peers=1)  # room for KEYS_PER_PEER keys and replay windows
    senders = [Identity.generate() for _ in range(KEYS_PER_PEER)]
    for i, key in enumerate(senders):
        t.check(message(key, src=f"n{i}", seq=100))
    assert refused(t, message(Identity.generate(), src="late")).startswith("untrusted")
    # a known sender is still heard; its window stays, so a replay of it is still refused
    t.check(message(senders[0], src="n0", seq=101))
    t.check(message(senders[0], src="n0", seq=102))
    assert refused(t, message(senders[0], src="n0", seq=101)).startswith("replay")


# ---- ca: membership certificates ----------------------------------------------------------

NETWORK = Ed25519PrivateKey.generate()


def ca_trust(**kw: object) -> Trust:
    return trust("ca", ca_key=NETWORK.public_key(), **kw)


def presence(signer: Identity, cert: bytes | None, *, src: str = "n1", seq: int = 1) -> bytes:
    """A presence-like message whose body carries ``cert``."""
    return message(signer, src=src, seq=seq, body={} if cert is None else {"cert": cert})


def body_cert(data: bytes, calls: list[int] | None = None) -> Callable[[], bytes | None]:
    """The ``cert`` callback a node passes: reads the certificate from the body."""

    def read() -> bytes | None:
        if calls is not None:
            calls.append(1)
        return presence_certificate(data)

    return read


def ca_refused(t: Trust, data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        t.check(data, cert=body_cert(data))
    return info.value.reason


def test_ca_needs_the_network_key() -> None:
    with pytest.raises(ValueError, match="ca_key"):
        Trust("ca")
    with pytest.raises(ValueError, match="32 bytes"):
        Trust("ca", ca_key="p2pfl-ed25519 AAAA")
    assert Trust("ca", ca_key=public_bytes(NETWORK.public_key())).policy == "ca"


def test_ca_admits_a_certified_key_and_then_its_messages_without_certificate() -> None:
    node = Identity.generate()
    t = ca_trust()
    data = presence(node, issue(NETWORK, "n1", node.public))
    assert t.check(data, cert=body_cert(data)).src == "n1"
    assert t.knows("n1")
    assert t.check(message(node, seq=2, kind="model")).src == "n1"  # no certificate needed now
    # still checked: the seq again, with another body
    assert refused(t, message(node, seq=2, kind="model", body={})).startswith("replay")


def test_ca_refuses_keys_without_a_certificate_from_the_network_key() -> None:
    node, mallory = Identity.generate(), Identity.generate()
    t = ca_trust()
    assert "no certificate" in refused(t, message(node))  # no callback at all
    assert "no certificate" in ca_refused(t, presence(node, None))
    other_network = Ed25519PrivateKey.generate()
    assert "not signed by the network key" in ca_refused(
        t, presence(node, issue(other_network, "n1", node.public), seq=2)
    )
    # someone else's certificate, shown with another key: for its id and for another id
    stolen = issue(NETWORK, "n1", node.public)
    assert "another key" in ca_refused(t, presence(mallory, stolen, seq=3))
    assert "issued to 'n1'" in ca_refused(t, presence(mallory, stolen, src="n2"))
    assert "malformed" in ca_refused(t, presence(node, b"garbage", seq=4))
    expired = issue(NETWORK, "n1", node.public, valid_days=1, now=NOW - 2 * 86400)
    assert "expired" in ca_refused(t, presence(node, expired, seq=5))
    assert not t.knows("n1") and not t.knows("n2")
    for reason in ("no certificate", "not signed", "another key", "malformed", "expired"):
        assert trust_label(f"untrusted certificate for 'x': {reason}") == "untrusted"


def test_ca_reads_the_certificate_only_after_the_signature_verified() -> None:
    node, mallory = Identity.generate(), Identity.generate()
    t = ca_trust()
    data = presence(node, issue(NETWORK, "n1", node.public))
    forged = data.replace(node.public_raw, mallory.public_raw)
    calls: list[int] = []
    with pytest.raises(ProtocolError, match="bad signature"):
        t.check(forged, cert=body_cert(forged, calls))
    assert calls == []  # nothing of the body was decoded
    t.check(data, cert=body_cert(data, calls))
    assert calls == [1]
    t.check(message(node, seq=2), cert=body_cert(data, calls))
    assert calls == [1]  # once admitted, not read again


def test_ca_a_newer_certificate_replaces_a_lost_key_and_an_older_one_does_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old, new = Identity.generate(), Identity.generate()
    t = ca_trust()
    old_cert = issue(NETWORK, "n1", old.public, now=NOW - 100)
    new_cert = issue(NETWORK, "n1", new.public, now=NOW - 10)
    t.check(presence(old, old_cert), cert=body_cert(presence(old, old_cert)))
    # re-admitted after losing its key: the newer certificate wins
    data = presence(new, new_cert, seq=2)
    assert t.check(data, cert=body_cert(data)).pk == new.public_raw
    assert refused(t, message(old, seq=3)).startswith("untrusted")
    # the old key, with its old certificate, cannot take the id back
    with caplog.at_level(logging.ERROR, logger="p2pfl.trust"):
        assert "certificate as new" in ca_refused(t, presence(old, old_cert, seq=4))
        ca_refused(t, presence(old, old_cert, seq=5))
    assert len([r for r in caplog.records if "KEY CHANGED" in r.getMessage()]) == 1
    assert t.check(message(new, seq=6)).pk == new.public_raw


def test_ca_an_expired_certificate_must_be_renewed() -> None:
    node = Identity.generate()
    now = [NOW]
    t = Trust("ca", ca_key=NETWORK.public_key(), clock=lambda: now[0], max_skew=1e9)
    short = issue(NETWORK, "n1", node.public, valid_days=1, now=NOW)
    t.check(presence(node, short), cert=body_cert(presence(node, short)))
    now[0] = NOW + 2 * 86400
    assert "no certificate" in refused(t, message(node, seq=2))
    assert "expired" in ca_refused(t, presence(node, short, seq=3))
    renewed = issue(NETWORK, "n1", node.public, valid_days=30, now=NOW + 86400)
    t.check(presence(node, renewed, seq=4), cert=body_cert(presence(node, renewed, seq=4)))
    assert t.check(message(node, seq=5)).src == "n1"


def test_ca_admit_key_takes_the_certificate_of_a_login() -> None:
    node, mallory = Identity.generate(), Identity.generate()
    t = ca_trust()
    with pytest.raises(ProtocolError, match="no certificate"):
        t.admit_key("n1", node.public_raw)
    with pytest.raises(ProtocolError, match="another key"):
        t.admit_key("n1", mallory.public_raw, issue(NETWORK, "n1", node.public))
    t.admit_key("n1", node.public_raw, issue(NETWORK, "n1", node.public))
    t.admit_key("n1", node.public_raw)  # known now
    assert t.check(message(node)).src == "n1"


def test_ca_the_number_of_ids_is_bounded() -> None:
    t = ca_trust(max_peers=2)
    for i in range(2):
        node = Identity.generate()
        t.admit_key(f"n{i}", node.public_raw, issue(NETWORK, f"n{i}", node.public))
    late = Identity.generate()
    for i in range(2, 2 * KEYS_PER_PEER):
        node = Identity.generate()
        t.admit_key(f"n{i}", node.public_raw, issue(NETWORK, f"n{i}", node.public))
    with pytest.raises(ProtocolError, match=f"already {2 * KEYS_PER_PEER} keys"):
        t.admit_key("late", late.public_raw, issue(NETWORK, "late", late.public))


def test_ca_our_own_id_is_never_handed_to_another_key() -> None:
    me, other = Identity.generate(), Identity.generate()
    t = ca_trust()
    t.own("me", me.public_raw)
    assert t.check(message(me, src="me")).src == "me"  # no certificate needed for ourselves
    data = presence(other, issue(NETWORK, "me", other.public), src="me", seq=2)
    assert "certificate as new" in ca_refused(t, data)
