"""Chunking of large messages and their reassembly under a budget and a timeout."""

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.protocol import Envelope, ProtocolError, Reassembler, pack_envelope, split
from p2pfl.protocol.envelope import unpack_envelope


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunks_of(payload: bytes, max_chunk: int, transfer_id: str = "t1") -> list[Envelope]:
    messages = split(payload, max_chunk=max_chunk, transfer_id=transfer_id, net="lab", src="n1")
    return [unpack_envelope(message) for message in messages]


def feed_all(reassembler: Reassembler, chunks: list[Envelope], src: str = "n1") -> list[bytearray]:
    done = [reassembler.feed(src, chunk) for chunk in chunks]
    return [payload for payload in done if payload is not None]


def with_body(chunk: Envelope, **changes: Any) -> Envelope:
    return dataclasses.replace(chunk, body=chunk.body | changes)


def test_a_payload_that_fits_is_returned_unchanged() -> None:
    payload = b"x" * 1000
    [message] = split(payload, max_chunk=1000, transfer_id="t", net="lab", src="n1")
    assert message is payload


@given(size=st.integers(1, 20_000), max_chunk=st.integers(300, 5_000), seed=st.integers(0, 2**32))
@settings(max_examples=60)
def test_chunks_reassemble_in_any_order_with_duplicates(
    size: int, max_chunk: int, seed: int
) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    messages = split(payload, max_chunk=max_chunk, transfer_id=b"\x01id", net="lab", src="n1")
    if size <= max_chunk:
        assert messages == [payload]
        return
    assert all(len(message) <= max_chunk for message in messages)
    chunks = [unpack_envelope(message) for message in messages]
    shuffled = chunks + rng.sample(chunks, k=len(chunks) // 2)  # duplicates too
    rng.shuffle(shuffled)
    reassembler = Reassembler(max_pending_bytes_per_sender=size, timeout=10)
    assert feed_all(reassembler, shuffled) == [payload]
    assert reassembler.pending_bytes("n1") == 0


def test_chunks_are_equal_sized_except_the_last() -> None:
    chunks = chunks_of(bytes(10_000), max_chunk=1_000)
    sizes = [len(chunk.body["data"]) for chunk in chunks]
    assert len(set(sizes[:-1])) == 1 and 0 < sizes[-1] <= sizes[0]
    assert sum(sizes) == 10_000
    assert {chunk.body["count"] for chunk in chunks} == {len(chunks)}
    assert [chunk.body["index"] for chunk in chunks] == list(range(len(chunks)))


def test_incomplete_transfer_expires_after_the_timeout() -> None:
    clock = FakeClock()
    reassembler = Reassembler(max_pending_bytes_per_sender=10_000, timeout=5.0, clock=clock)
    first, *rest = chunks_of(bytes(range(256)) * 20, max_chunk=1_000)
    assert reassembler.feed("n1", first) is None
    assert reassembler.pending_bytes("n1") == 5120
    clock.now = 5.0
    assert reassembler.expire() == 0  # not yet older than the timeout
    clock.now = 5.5
    assert reassembler.expire() == 1
    assert reassembler.pending_bytes("n1") == 0
    assert feed_all(reassembler, rest) == []  # the first chunk is gone with the transfer


def test_a_new_chunk_keeps_a_slow_transfer_alive() -> None:
    clock = FakeClock()
    reassembler = Reassembler(max_pending_bytes_per_sender=10_000, timeout=5.0, clock=clock)
    payload = bytes(range(256)) * 20
    chunks = chunks_of(payload, max_chunk=1_000)
    results = []
    for chunk in chunks:
        clock.now += 4.0
        assert reassembler.expire() == 0
        results.append(reassembler.feed("n1", chunk))
    assert results[-1] == payload


def test_transfer_larger_than_the_budget_is_refused() -> None:
    reassembler = Reassembler(max_pending_bytes_per_sender=4_000, timeout=10)
    chunks = chunks_of(bytes(5_000), max_chunk=1_000)
    with pytest.raises(ProtocolError, match="transfer of 5000 bytes refused"):
        reassembler.feed("n1", chunks[0])
    assert reassembler.pending_bytes("n1") == 0


def test_budget_is_per_sender_and_freed_on_completion() -> None:
    reassembler = Reassembler(max_pending_bytes_per_sender=6_000, timeout=10)
    first = chunks_of(bytes(4_000), max_chunk=1_000, transfer_id="a")
    second = chunks_of(bytes(4_000), max_chunk=1_000, transfer_id="b")
    reassembler.feed("n1", first[0])
    with pytest.raises(ProtocolError, match="already holds 4000 of 6000 bytes"):
        reassembler.feed("n1", second[0])
    assert reassembler.feed("n2", second[0]) is None  # another sender has its own budget
    assert feed_all(reassembler, first[1:]) == [bytes(4_000)]
    assert feed_all(reassembler, second) == [bytes(4_000)]


def test_total_budget_bounds_many_senders() -> None:
    """Sender ids are not authenticated: a flood under fresh ids must not grow memory."""
    reassembler = Reassembler(10_000, timeout=10, max_pending_bytes=9_000)
    for i in range(3):
        reassembler.feed(f"spoof{i}", chunks_of(bytes(3_000), 1_000, transfer_id="x")[0])
    late = chunks_of(bytes(3_000), 1_000, transfer_id="y")
    with pytest.raises(ProtocolError, match="all senders already hold 9000 of 9000 bytes"):
        reassembler.feed("honest", late[0])
    assert reassembler.total_pending_bytes() == 9_000
    reassembler.forget("spoof0")  # room again: the honest transfer goes through
    assert feed_all(reassembler, late, src="honest") == [bytes(3_000)]


def test_concurrent_transfers_per_sender_are_bounded() -> None:
    reassembler = Reassembler(10**6, timeout=10, max_transfers_per_sender=2)
    for tid in ("a", "b"):
        reassembler.feed("n1", chunks_of(bytes(3_000), 1_000, transfer_id=tid)[0])
    with pytest.raises(ProtocolError, match="too many concurrent transfers"):
        reassembler.feed("n1", chunks_of(bytes(3_000), 1_000, transfer_id="c")[0])


def test_corrupted_chunk_fails_the_digest_and_drops_the_transfer() -> None:
    payload = bytes(range(256)) * 20
    chunks = chunks_of(payload, max_chunk=1_000)
    data = bytearray(chunks[1].body["data"])
    data[3] ^= 0xFF
    chunks[1] = with_body(chunks[1], data=bytes(data))
    reassembler = Reassembler(10_000, timeout=10)
    with pytest.raises(ProtocolError, match="digest mismatch"):
        feed_all(reassembler, chunks)
    assert reassembler.pending_bytes("n1") == 0


def test_late_duplicate_after_completion_is_ignored() -> None:
    chunks = chunks_of(bytes(3_000), max_chunk=1_000)
    reassembler = Reassembler(10_000, timeout=10)
    assert feed_all(reassembler, chunks) == [bytes(3_000)]
    assert reassembler.feed("n1", chunks[0]) is None
    assert reassembler.pending_bytes("n1") == 0


def test_forget_drops_a_departed_senders_transfers() -> None:
    reassembler = Reassembler(10_000, timeout=10)
    reassembler.feed("n1", chunks_of(bytes(3_000), max_chunk=1_000)[0])
    assert reassembler.forget("n1") == 1
    assert reassembler.pending_bytes("n1") == 0


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"index": 9}, "out of range"),
        ({"index": -1}, "non-negative integers"),
        ({"count": 0}, "inconsistent chunking"),
        ({"count": 5000}, "inconsistent chunking"),
        ({"total": 10**12}, "expected 250000000000"),
        ({"data": b"short"}, "expected"),
        ({"data": "text"}, "binary"),
        ({"digest": b"x"}, "digest must be 16 bytes"),
        ({"id": ""}, "transfer id"),
        ({"id": "x" * 65}, "transfer id"),
        ({"id": 5}, "transfer id"),
        ({"extra": 1}, "chunk fields"),
    ],
)
def test_malformed_chunks_are_refused(changes: dict[str, Any], fragment: str) -> None:
    chunk = chunks_of(bytes(3_000), max_chunk=1_000)[0]
    reassembler = Reassembler(10**6, timeout=10)
    with pytest.raises(ProtocolError) as info:
        reassembler.feed("n1", with_body(chunk, **changes))
    assert fragment in info.value.reason
    assert reassembler.pending_bytes("n1") == 0


def test_chunk_disagreeing_with_its_transfer_is_refused() -> None:
    first, second, *_ = chunks_of(bytes(3_000), max_chunk=1_000)
    reassembler = Reassembler(10**6, timeout=10)
    reassembler.feed("n1", first)
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembler.feed("n1", with_body(second, digest=b"\x00" * 16))


def test_only_chunk_envelopes_are_reassembled() -> None:
    with pytest.raises(ProtocolError, match="expected a chunk"):
        Reassembler(100, 1).feed("n1", Envelope.create("bye", {}, net="lab", src="n1", seq=0))


def test_split_refuses_impossible_parameters() -> None:
    with pytest.raises(ValueError, match="leaves no room"):
        split(bytes(1000), max_chunk=60, transfer_id="t", net="lab", src="n1")
    with pytest.raises(ValueError, match="transfer id"):
        split(bytes(1000), max_chunk=500, transfer_id="", net="lab", src="n1")


def test_chunk_envelopes_repack_identically() -> None:
    message = split(bytes(5_000), max_chunk=1_000, transfer_id="t", net="lab", src="n1")[2]
    assert pack_envelope(unpack_envelope(message)) == message
