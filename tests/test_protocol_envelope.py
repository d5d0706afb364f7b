"""The message envelope: packing, and defensive unpacking."""

import dataclasses
import time
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.identity import Identity
from p2pfl.protocol import (
    KINDS,
    PROTOCOL_VERSION,
    Envelope,
    ProtocolError,
    pack_envelope,
    unpack_envelope,
)
from p2pfl.protocol.envelope import SIG_DOMAIN, peek


def fields(**changes: Any) -> dict[str, Any]:
    base = {
        "v": 1,
        "kind": "presence",
        "net": "lab",
        "src": "n1",
        "seq": 7,
        "ts": 1.5,
        "pk": None,
        "sig": None,
        "body": {"role": "trainer"},
    }
    return base | changes


def test_envelope_round_trips_with_and_without_signature() -> None:
    env = Envelope(1, "control", "lab", "n1", 3, 12.25, {"op": "stop", "n": [1, 2]})
    assert unpack_envelope(pack_envelope(env)) == env
    me = Identity.generate()
    signed = unpack_envelope(pack_envelope(env, me))
    assert signed.pk == me.public_raw and signed.sig is not None
    assert dataclasses.replace(signed, sig=None, pk=None) == env


def test_the_signature_covers_every_byte_and_is_checked_without_the_body() -> None:
    me = Identity.generate()
    body = {"round": 3, "data": bytes(range(200)) * 30}  # spliced in: above the copy threshold
    packed = bytes(pack_envelope(Envelope(1, "model", "lab", "n1", 9, 2.5, body), me))
    head = peek(packed)
    assert (head.kind, head.src, head.seq, head.pk) == ("model", "n1", 9, me.public_raw)
    assert head.sig is not None
    me.public.verify(head.sig, SIG_DOMAIN + head.digest())  # raises when it does not hold
    sig_at = packed.index(head.sig)
    for at in range(len(packed)):
        if sig_at <= at < sig_at + len(head.sig):
            continue  # a changed signature is simply another (wrong) signature
        tampered = bytearray(packed)
        tampered[at] ^= 0x01
        try:
            other = peek(tampered)
        except ProtocolError:
            continue
        assert other.sig is not None and other.pk is not None
        with pytest.raises(InvalidSignature):
            Ed25519PublicKey.from_public_bytes(other.pk).verify(
                other.sig, SIG_DOMAIN + other.digest()
            )


def test_peek_needs_the_wire_order() -> None:
    scrambled = msgpack.packb(dict(reversed(list(fields().items()))))
    with pytest.raises(ProtocolError, match="out of order"):
        peek(scrambled)
    with pytest.raises(ProtocolError, match="header"):
        peek(msgpack.packb(fields(src="x" * 5000)))


def test_peek_remembers_small_messages_by_content_and_never_a_mutable_one() -> None:
    me = Identity.generate()
    packed = bytes(pack_envelope(Envelope(1, "presence", "lab", "n1", 3, 2.0, {"r": 1}), me))
    first = peek(packed)
    again = peek(bytes(bytearray(packed)))  # equal bytes, another object: another receiver
    assert again is first
    fresh = peek(bytearray(packed))  # mutable: read anew every time
    assert fresh is not first and fresh.digest() == first.digest() == again.digest()
    changed = bytearray(packed)
    changed[-1] ^= 0x01  # the body's value, same length
    other = peek(bytes(changed))
    assert other is not first and other.digest() != first.digest()
    assert (other.src, other.seq) == (first.src, first.seq)
    big = bytes(pack_envelope(Envelope(1, "log", "lab", "n1", 4, 2.0, {"b": b"x" * 5000}), me))
    assert peek(big) is not peek(big)  # above HEADER_MAX: not remembered


def test_create_stamps_current_version_and_time() -> None:
    before = time.time()
    env = Envelope.create("bye", {}, net="lab", src="n1", seq=0)
    assert env.v == PROTOCOL_VERSION
    assert before <= env.ts <= time.time()


def test_packed_envelope_is_plain_msgpack_with_exactly_the_design_keys() -> None:
    blob = bytes(range(256)) * 64  # above the size where the writer splices the bytes in
    env = Envelope(1, "log", "lab", "n1", 1, 2.0, {"blob": memoryview(blob), "small": b"ab"})
    packed = pack_envelope(env)
    decoded = msgpack.unpackb(packed)
    assert list(decoded) == ["v", "kind", "net", "src", "seq", "ts", "pk", "sig", "body"]
    # Byte-identical to msgpack's own encoding of the same map.
    expected = fields(kind="log", seq=1, ts=2.0, body={"blob": blob, "small": b"ab"})
    assert bytes(packed) == msgpack.packb(expected)


def test_known_kinds_include_the_design_ones() -> None:
    assert {"model", "chunk", "presence", "bye", "telemetry", "log", "control"} <= KINDS


def test_oversize_message_is_refused_before_parsing() -> None:
    garbage = b"\xc1" * 101  # 0xc1 is never valid msgpack: a parse would fail differently
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 bytes"):
        unpack_envelope(garbage, max_size=100)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"v": "1"}, "version"),
        ({"kind": "weights"}, "kind"),
        ({"kind": 3}, "kind"),
        ({"net": "a/b"}, "network name"),
        ({"src": ""}, "sender id"),
        ({"src": 5}, "sender id"),
        ({"seq": -1}, "sequence"),
        ({"seq": False}, "sequence"),
        ({"ts": float("nan")}, "timestamp"),
        ({"ts": float("inf")}, "timestamp"),
        ({"ts": "now"}, "timestamp"),
        ({"body": [1, 2]}, "body"),
        ({"body": {b"k": 1}}, "body"),
        ({"sig": "text"}, "signature"),
        ({"sig": b"x" * 2000}, "signature"),
        ({"pk": b"short"}, "public key"),
        ({"pk": "text"}, "public key"),
        ({"extra": 1}, "unexpected ['extra']"),
    ],
)
def test_malformed_fields_are_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack_envelope(msgpack.packb(fields(**changes)))
    assert fragment in info.value.reason


def test_missing_field_is_named() -> None:
    data = fields()
    del data["ts"]
    with pytest.raises(ProtocolError, match=r"missing \['ts'\]"):
        unpack_envelope(msgpack.packb(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x91" * 5000 + b"\x01",  # nesting deeper than msgpack's stack
        b"\xdd\xff\xff\xff\xff",  # array header announcing 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map header announcing 4 billion pairs
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xa2\xff\xfe",  # invalid UTF-8 string
        msgpack.packb(msgpack.ExtType(1, b"abc")),  # extension types are not part of v1
        msgpack.packb(fields()) + b"\x00",  # trailing data
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: 2}),  # non-string map key
    ],
)
def test_hostile_bytes_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_envelope(data)


def test_container_cap_refuses_long_arrays_and_maps() -> None:
    listed = msgpack.packb(fields(body={"items": list(range(65))}))
    mapped = msgpack.packb(fields(body={f"k{i}": i for i in range(65)}))
    for data in (listed, mapped):
        assert unpack_envelope(data).body  # the default cap lets them through
        with pytest.raises(ProtocolError, match=r"exceeds max_(array|map)_len"):
            unpack_envelope(data, max_container_len=64)


def test_a_nest_of_inflated_headers_is_refused_under_a_tight_cap() -> None:
    """Each header claims 16383 items but a few bytes follow: msgpack would preallocate all."""
    for header in (b"\xdc\x3f\xff", b"\xde\x3f\xff"):
        with pytest.raises(ProtocolError):
            unpack_envelope(header * 1700, max_container_len=64)


@given(st.binary(max_size=512))
@settings(max_examples=300)
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    try:
        env = unpack_envelope(data)
    except ProtocolError:
        return
    assert env.v == PROTOCOL_VERSION  # a random valid envelope is possible, if improbable


def test_every_truncation_of_a_valid_message_is_refused() -> None:
    packed = bytes(pack_envelope(Envelope(1, "presence", "lab", "n1", 1, 1.0, {"a": [1, b"x"]})))
    for end in range(len(packed)):
        with pytest.raises(ProtocolError):
            unpack_envelope(packed[:end])


def test_pack_refuses_what_peers_would_refuse() -> None:
    with pytest.raises(ValueError, match="kind"):
        pack_envelope(Envelope(1, "weights", "lab", "n1", 0, 0.0, {}))
    with pytest.raises(ValueError, match="node id"):
        pack_envelope(Envelope(1, "bye", "lab", "n/1", 0, 0.0, {}))
