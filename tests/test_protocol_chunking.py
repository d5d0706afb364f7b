"""Chunking of large messages and their reassembly under a budget and a timeout."""

import contextlib
import dataclasses
import math
import random
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from p2pfl.protocol import Envelope, ProtocolError, Reassembler, pack_envelope, split
from p2pfl.protocol.envelope import unpack_envelope
from tests.helpers import FakeClock


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
    budget = Reassembler.cost(size, len(chunks))  # exactly what the whole transfer costs
    reassembler = Reassembler(max_pending_bytes_per_sender=budget, timeout=10)
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
    # What arrived and its bookkeeping are charged, not the 5120 bytes the header announces.
    charged = Reassembler.TRANSFER_OVERHEAD + len(first.body["data"]) + Reassembler.CHUNK_OVERHEAD
    assert reassembler.pending_bytes("n1") == charged
    clock.now = 5.0
    assert reassembler.expire() == 0  # not yet older than the timeout
    clock.now = 5.5
    assert reassembler.expire() == 1
    assert reassembler.pending_bytes("n1") == 0
    assert feed_all(reassembler, rest) == []  # the first chunk is gone with the transfer
    assert reassembler.pending_transfers() == 0  # and late chunks do not start it again


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


def test_duplicates_do_not_keep_a_transfer_alive() -> None:
    clock = FakeClock()
    reassembler = Reassembler(max_pending_bytes_per_sender=10_000, timeout=5.0, clock=clock)
    first = chunks_of(bytes(5_000), max_chunk=1_000)[0]
    reassembler.feed("n1", first)
    for _ in range(3):
        clock.now += 4.0
        assert reassembler.feed("n1", first) is None
    assert reassembler.expire() == 1


def test_expiry_tells_the_owner_which_sender_it_was() -> None:
    clock = FakeClock()
    expired: list[str] = []
    reassembler = Reassembler(10_000, timeout=5.0, clock=clock, on_expire=expired.append)
    reassembler.feed("n1", chunks_of(bytes(5_000), 1_000, transfer_id="a")[0])
    clock.now = 3.0
    reassembler.feed("n2", chunks_of(bytes(5_000), 1_000, transfer_id="a")[0])
    clock.now = 6.0
    assert reassembler.expire() == 1 and expired == ["n1"]
    clock.now = 9.0
    assert reassembler.expire() == 1 and expired == ["n1", "n2"]
    assert reassembler.total_pending_bytes() == 0


def test_transfer_that_could_never_fit_the_budget_is_refused_at_once() -> None:
    reassembler = Reassembler(4_000, timeout=10, max_message_size=10**6)
    chunks = chunks_of(bytes(5_000), max_chunk=1_000)
    with pytest.raises(ProtocolError, match="chunked transfer of 5000 bytes in 6 chunks refused"):
        reassembler.feed("n1", chunks[0])
    assert reassembler.pending_bytes("n1") == 0
    assert feed_all(reassembler, chunks[1:]) == []  # refused once, not once per chunk


def test_a_transfer_fits_a_budget_of_exactly_its_cost() -> None:
    chunks = chunks_of(bytes(range(256)) * 20, max_chunk=1_000)
    reassembler = Reassembler(Reassembler.cost(5_120, len(chunks)), timeout=10)
    assert feed_all(reassembler, chunks) == [bytes(range(256)) * 20]
    assert reassembler.total_pending_bytes() == 0


def test_budget_is_per_sender_and_freed_on_completion() -> None:
    first = chunks_of(bytes(4_000), max_chunk=1_000, transfer_id="a")
    second = chunks_of(bytes(4_000), max_chunk=1_000, transfer_id="b")
    budget = Reassembler.cost(4_000, len(first)) + 1_500  # one transfer, and a bit of another
    reassembler = Reassembler(max_pending_bytes_per_sender=budget, timeout=10)
    assert feed_all(reassembler, first[:-1]) == []
    with pytest.raises(ProtocolError, match="dropped: the peer already holds"):
        feed_all(reassembler, second)
    assert reassembler.pending_bytes("n1") <= budget
    assert feed_all(reassembler, second) == []  # the dropped transfer's chunks are ignored
    assert feed_all(reassembler, second, src="n2") == [bytes(4_000)]  # its own budget
    assert feed_all(reassembler, first[-1:]) == [bytes(4_000)]
    assert reassembler.total_pending_bytes() == 0


def test_total_budget_bounds_many_senders() -> None:
    """Sender ids are not authenticated: a flood under fresh ids must not grow memory."""
    late = chunks_of(bytes(3_000), 1_000, transfer_id="y")
    limit = 3 * Reassembler.cost(3_000, len(late))
    reassembler = Reassembler(10_000, timeout=10, max_pending_bytes=limit)
    for i in range(3):
        feed_all(reassembler, chunks_of(bytes(3_000), 1_000, transfer_id="x")[:-1], f"spoof{i}")
    with pytest.raises(ProtocolError, match="dropped: all peers hold"):
        feed_all(reassembler, late, src="honest")
    assert reassembler.total_pending_bytes() <= limit
    reassembler.forget("spoof0")  # room again: a new honest transfer goes through
    again = chunks_of(bytes(3_000), 1_000, transfer_id="z")
    assert feed_all(reassembler, again, src="honest") == [bytes(3_000)]


def test_concurrent_transfers_per_sender_are_bounded() -> None:
    reassembler = Reassembler(10**6, timeout=10, max_transfers_per_sender=2)
    for tid in ("a", "b"):
        reassembler.feed("n1", chunks_of(bytes(3_000), 1_000, transfer_id=tid)[0])
    with pytest.raises(ProtocolError, match="too many concurrent chunked transfers"):
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
        ({"total": 10**12}, "exceeds the limit of 1000000 bytes"),
        ({"total": 4_000}, "expected 1000"),
        ({"count": 3_000}, "expected 1"),
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


# -- hostile chunk headers: an attacker on the LAN with a plain MQTT client ---------------------


def forged(
    src: str, tid: str, index: int, count: int, total: int, digest: bytes = bytes(16)
) -> Envelope:
    """A chunk whose header claims whatever the attacker likes, with a slice that matches it."""
    size = math.ceil(total / count) if count else 0
    length = max(0, min(size, total - index * size))
    body = {"id": tid, "index": index, "count": count, "total": total}
    body |= {"digest": digest, "data": bytes(length)}
    return Envelope.create("chunk", body, net="lab", src=src, seq=0)


def test_a_claimed_total_over_the_message_limit_is_refused_before_anything_is_held() -> None:
    reassembler = Reassembler(2**26, timeout=10, max_message_size=2**20)
    tracemalloc.start()
    try:
        for i in range(50):  # 1 KiB slices of a claimed 32 MiB transfer
            with pytest.raises(ProtocolError, match="of 33554432 bytes exceeds the limit"):
                reassembler.feed(f"s{i}", forged(f"s{i}", "t", 0, 2**15, 32 * 2**20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reassembler.total_pending_bytes() == 0 and reassembler.pending_transfers() == 0
    assert peak < 2**20  # not one claimed buffer was ever allocated


def test_forged_claims_within_the_limit_pin_only_the_bytes_sent() -> None:
    """200 headers claiming 32 MiB each (6.4 GiB) hold about 200 KiB: what was really sent."""
    reassembler = Reassembler(2**28, timeout=10, max_pending_bytes=2**30, max_message_size=2**26)
    sent = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            chunk = forged(f"s{i}", "t", 0, 2**15, 32 * 2**20)
            sent += len(chunk.body["data"])
            assert reassembler.feed(chunk.src, chunk) is None
        del chunk
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert reassembler.pending_transfers() == 200
    per_transfer = Reassembler.TRANSFER_OVERHEAD + Reassembler.CHUNK_OVERHEAD
    assert reassembler.total_pending_bytes() == sent + 200 * per_transfer
    assert held <= reassembler.total_pending_bytes()  # what is charged covers what is held
    assert held < 2**20


def test_a_count_too_large_for_the_budget_is_refused() -> None:
    """One-byte chunks of a 32 MiB claim: their bookkeeping alone would outgrow the budget."""
    reassembler = Reassembler(2**27, timeout=10, max_message_size=2**26)
    with pytest.raises(ProtocolError, match="in 33554432 chunks refused"):
        reassembler.feed("s", forged("s", "t", 0, 32 * 2**20, 32 * 2**20))
    assert reassembler.total_pending_bytes() == 0


def test_remembered_transfers_are_bounded_whatever_the_sender_ids() -> None:
    chunks = chunks_of(bytes(400), max_chunk=300)
    reassembler = Reassembler(10**6, timeout=10)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5_000):  # completed transfers under fresh, spoofed sender ids
            assert feed_all(reassembler, chunks, src=f"spoofed-{i:06d}") == [bytes(400)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2**20
    assert reassembler.total_pending_bytes() == 0


# What an attacker claims of a transfer: id, total, slice size aimed for, extra chunks beyond
# those, and one of two digests (so a reused id can disagree with itself).
hostile_claim = st.tuples(
    st.sampled_from(["t1", "t2", "t3"]),
    st.integers(0, 6_000) | st.integers(0, 6_000) | st.integers(0, 2**25),
    st.integers(1, 2048),
    st.sampled_from([0, 0, 0, 0, 0, 0, 1, 2**20]),
    st.booleans(),
)
# One chunk sent: sender, which claim, which index (modulo its count), seconds since the last.
hostile_step = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 7),
    st.integers(0, 2**16),
    st.sampled_from([0.0, 0.0, 0.0, 0.5, 6.0]),
)


@given(
    claims=st.lists(hostile_claim, min_size=1, max_size=6),
    steps=st.lists(hostile_step, max_size=100),
    per_sender=st.integers(2_000, 12_000),
    senders_in_budget=st.sampled_from([1, 2]),
    expire=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_hostile_headers_never_exceed_the_budgets(
    claims: list[tuple[str, int, int, int, bool]],
    steps: list[tuple[str, int, int, float]],
    per_sender: int,
    senders_in_budget: int,
    expire: bool,
) -> None:
    clock = FakeClock()
    everyone = senders_in_budget * per_sender
    fullest = 0
    reassembler = Reassembler(
        per_sender,
        timeout=5.0,
        clock=clock,
        max_pending_bytes=everyone,
        max_transfers_per_sender=2,
        max_message_size=2**25,
    )
    for src, which, index, seconds in steps:
        tid, total, size, extra, other = claims[which % len(claims)]
        clock.now += seconds
        if expire:
            reassembler.expire()
        count = math.ceil(total / size) + extra
        chunk = forged(src, tid, index % max(count, 1), count, total, bytes([other]) * 16)
        with contextlib.suppress(ProtocolError):
            assert reassembler.feed(src, chunk) is None  # forged digests: nothing completes
        held = [reassembler.pending_bytes(s) for s in "abc"]
        assert max(held) <= per_sender
        assert sum(held) == reassembler.total_pending_bytes() <= everyone
        fullest = max(fullest, reassembler.total_pending_bytes())
    target(fullest / everyone)  # steer generation towards full budgets, where refusals happen
    clock.now += 6.0
    reassembler.expire()
    assert reassembler.total_pending_bytes() == 0 and reassembler.pending_transfers() == 0
