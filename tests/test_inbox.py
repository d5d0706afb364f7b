"""Inbox.accept on chunked models: reassembled, parsed once, and checked like inline ones."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.protocol import chunking
from p2pfl.protocol.envelope import Envelope, pack_envelope
from p2pfl.protocol.model import encode_model, layout
from p2pfl.trust import Trust
from tests.helpers import FakeClock

NET = "inboxtest"


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}


def inbox(mode: str = "async") -> Inbox:
    config = NodeConfig.model_validate({"network": NET, "id": "me", "mode": mode})
    box = Inbox(config, NodeCounters(), clock=time.monotonic)
    box.layout = layout(weights())
    return box


def chunks(net: str, src: str = "peer", transfer: str = "t1") -> list[bytes]:
    message = encode_model(weights(), net=net, src=src, seq=1, round=1, age=10.0)
    parts = chunking.split(message, max_chunk=2048, transfer_id=transfer, net=NET, src=src)
    assert len(parts) > 1
    return [bytes(part) for part in parts]


async def test_a_chunked_model_is_accepted_once_complete() -> None:
    box = inbox()
    for part in chunks(NET):
        await box.accept(part, lowest=0, highest=5)
    assert box.counters.models_received == 1 and box.counters.rejected_total == 0
    (received,) = box.take(1)
    assert received.src == "peer" and np.array_equal(received.weights["w"], weights()["w"])


async def test_a_reassembled_model_from_another_network_is_refused() -> None:
    box = inbox()
    for part in chunks("othernet"):  # the chunks say our network; the model inside does not
        await box.accept(part, lowest=0, highest=5)
    assert box.counters.models_received == 0
    assert box.counters.rejected_total == 1


# -- bounded reassembly: forged chunk headers and abandoned transfers -----------------------


def forged_chunk(total: int, count: int, src: str = "mallory") -> bytes:
    """A chunk header claiming `total` bytes in `count` chunks, with a first slice to match."""
    body = {"id": "t", "index": 0, "count": count, "total": total, "digest": bytes(16)}
    body["data"] = bytes(-(-total // count))
    return bytes(pack_envelope(Envelope.create("chunk", body, net=NET, src=src, seq=1)))


async def test_forged_chunk_headers_are_refused_under_fixed_labels() -> None:
    config = NodeConfig.model_validate({"network": NET, "id": "me", "max_message_size": 2**20})
    box = Inbox(config, NodeCounters(), clock=time.monotonic)
    await box.accept(forged_chunk(32 * 2**20, 2**15), lowest=0, highest=5)  # 32 MiB claimed
    assert dict(box.counters.rejected) == {"oversize": 1}
    await box.accept(forged_chunk(2**20, 2**20, src="eve"), lowest=0, highest=5)  # 1-byte slices
    assert dict(box.counters.rejected) == {"oversize": 1, "chunk": 1}


async def test_an_abandoned_transfer_expires_on_the_timer_alone(wait_until) -> None:
    clock = FakeClock()
    config = NodeConfig.model_validate({"network": NET, "id": "me"})
    box = Inbox(config, NodeCounters(), clock=clock)
    box.layout = layout(weights())
    first, *rest = chunks(NET)
    await box.accept(first, lowest=0, highest=5)
    clock.now = 1_000.0  # long past the timeout; no other chunk arrives from anyone
    async with asyncio.TaskGroup() as tg:
        sweeper = tg.create_task(box.sweep_loop(interval=0.01))
        await wait_until(lambda: box.counters.rejected["chunk"] > 0)
        sweeper.cancel()
    assert dict(box.counters.rejected) == {"chunk": 1}
    for part in rest:  # the late rest cannot complete it, and is not counted again
        await box.accept(part, lowest=0, highest=5)
    assert box.counters.models_received == 0
    assert dict(box.counters.rejected) == {"chunk": 1}


# -- only peers' models: unknown senders refused before anything is kept, state dropped on leave


def signed_chunks(src: str, key: Identity, transfer: str = "t1") -> list[bytes]:
    seq = time.time_ns() // 1000
    message = encode_model(weights(), net=NET, src=src, seq=seq, round=1, age=1.0, signer=key)
    parts = chunking.split(
        message, max_chunk=2048, transfer_id=transfer, net=NET, src=src, seq=seq + 1, signer=key
    )
    assert len(parts) > 1
    return [bytes(part) for part in parts]


async def test_an_unknown_sender_is_refused_before_reassembly_or_decoding() -> None:
    box = inbox()
    box.trust = Trust("tofu")
    box.admitted = lambda src: src == "peer"
    parts = signed_chunks("mallory", Identity.generate())
    for part in parts:  # each one verifies: a self-made key is pinned under tofu
        await box.accept(part, lowest=0, highest=5)
    assert dict(box.counters.rejected) == {"unknown-sender": len(parts)}
    assert box._reassembler.pending_transfers() == 0  # nothing was kept for it
    assert box._reassembler.total_pending_bytes() == 0
    inline = encode_model(
        weights(), net=NET, src="eve", seq=1, round=1, age=1.0, signer=Identity.generate()
    )
    await box.accept(bytes(inline), lowest=0, highest=5)
    assert box.counters.rejected["unknown-sender"] == len(parts) + 1
    assert box.counters.models_received == 0 and not box
    for part in signed_chunks("peer", Identity.generate()):
        await box.accept(part, lowest=0, highest=5)
    assert box.counters.models_received == 1


async def test_a_model_delivered_twice_is_taken_once_and_refuses_nothing() -> None:
    """MQTT QoS 1 may deliver a message twice: the copy is dropped, not counted a replay; the
    seq again with another body still is one."""
    box = inbox()
    box.trust = Trust("tofu")
    key, seq = Identity.generate(), time.time_ns() // 1000
    model = bytes(
        encode_model(weights(), net=NET, src="peer", seq=seq, round=1, age=1.0, signer=key)
    )
    await box.accept(model, lowest=0, highest=5)
    await box.accept(model, lowest=0, highest=5)
    assert box.counters.models_received == 1 and box.counters.rejected_total == 0
    other = encode_model(weights(), net=NET, src="peer", seq=seq, round=2, age=1.0, signer=key)
    await box.accept(bytes(other), lowest=0, highest=5)
    assert dict(box.counters.rejected) == {"replay": 1} and box.newest_round("peer") == 1


async def test_forget_drops_what_is_kept_for_a_peer() -> None:
    box = inbox()
    for part in chunks(NET, src="peer"):
        await box.accept(part, lowest=0, highest=5)
    first, *_ = chunks(NET, src="peer", transfer="t2")
    await box.accept(first, lowest=0, highest=5)  # a transfer under way
    box.reject("peer", "stale round: 1 < 3")
    for part in chunks(NET, src="other"):
        await box.accept(part, lowest=0, highest=5)
    box.reject("other", "stale round: 1 < 3")
    assert box._reassembler.pending_bytes("peer") > 0
    box.forget("peer")
    assert box._reassembler.pending_bytes("peer") == 0
    assert [m.src for m in box.take_newest()] == ["other"]
    assert box._logged == {("other", "stale")}
    for part in chunks(NET, src="kept"):
        await box.accept(part, lowest=0, highest=5)
    box.forget("kept", models=False)  # e.g. a peer that finished: its models still count
    assert [m.src for m in box.take_newest()] == ["kept"]


def test_log_once_entries_are_bounded_whatever_ids_peers_make_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = inbox()
    with caplog.at_level(logging.WARNING, logger="p2pfl.inbox"):
        for i in range(5000):
            box.reject(f"sybil{i}", "unknown sender: not a live peer of this node")
    assert box.counters.rejected == {"unknown-sender": 5000}
    assert len(box._logged) <= 4097
    assert len(caplog.records) <= 4097
    assert "counted, not logged" in caplog.records[-1].getMessage()
    box.forget("sybil0")  # a peer that leaves makes room: the next new one is logged again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2pfl.inbox"):
        box.reject("newcomer", "stale round: 1 < 3")
    assert [r.getMessage() for r in caplog.records] == [
        "message rejected peer=newcomer reason=stale round: 1 < 3"
    ]


async def test_a_model_taken_ahead_of_its_round_still_counts_as_that_rounds_model() -> None:
    """A node catching up at round 4 (the peer it expected is at round 6) takes that peer's
    round-6 model at once; at round 6 it must not wait for that peer's round-6 model again."""
    box = inbox("sync")
    model = encode_model(weights(), net=NET, src="peer", seq=1, round=6, age=1.0)
    await box.accept(bytes(model), lowest=0, highest=10)
    assert [m.round for m in box.take(4, expected=["peer"])] == [6]
    assert box.newest_round("peer") == 6 and not box  # nothing buffered, round 6 merged
    box.drop_models()  # a pause: what was merged before it no longer counts
    assert box.newest_round("peer") == 0
    again = encode_model(weights(), net=NET, src="peer", seq=2, round=6, age=1.0)
    await box.accept(bytes(again), lowest=0, highest=10)
    box.take(4, expected=["peer"])
    box.forget("peer")
    assert box.newest_round("peer") == 0


async def offer(box: Inbox, src: str, *rounds: int) -> None:
    for seq, r in enumerate(rounds, 1):
        model = encode_model(weights(), net=NET, src=src, seq=seq, round=r, age=1.0)
        await box.accept(bytes(model), lowest=0, highest=20)


async def test_sync_keeps_a_later_rounds_model_for_its_round_when_nothing_says_we_are_behind() -> (
    None
):
    """A random-walk neighbour that runs ahead sends its round-6 model while we are in round
    4: merging it now would skip round 5 by timing alone (a same-seed run would differ)."""
    box = inbox("sync")
    await offer(box, "mine", 4)  # the sender we expected: its round-4 model came
    await offer(box, "ahead", 6, 7)
    assert [(m.src, m.round) for m in box.take(4, expected=["mine"])] == [("mine", 4)]
    assert box.newest_round("ahead") == 7 and box  # both still buffered
    assert box.take(5, expected=[]) == []
    assert [(m.src, m.round) for m in box.take(6, expected=["ahead"])] == [("ahead", 6)]
    assert [(m.src, m.round) for m in box.take(7, expected=[])] == [("ahead", 7)]
    assert not box


async def test_sync_catches_up_only_when_an_expected_sender_is_past_the_round() -> None:
    box = inbox("sync")
    await offer(box, "expected", 5, 7)  # its round-4 model never came: it is past round 4
    await offer(box, "other", 6)
    taken = box.take(4, expected=["expected"])
    # Two or more rounds ahead is taken at once from everyone; the next round is played next.
    assert [(m.src, m.round) for m in taken] == [("expected", 7), ("other", 6)]
    assert not box  # the round-5 model is older than what was merged from its sender


async def test_sync_an_expected_model_merged_ahead_is_not_a_sign_of_falling_behind() -> None:
    box = inbox("sync")
    await offer(box, "peer", 6)
    box.take(4, expected=["peer"])  # caught up: peer's round 6 merged
    await offer(box, "later", 8)
    assert box.take(6, expected=["peer"]) == []  # peer's round 6 is merged: not behind
    assert box.newest_round("later") == 8


async def test_async_takes_every_senders_newest_model_at_once() -> None:
    box = inbox()
    await offer(box, "a", 3, 5)
    await offer(box, "b", 9)
    assert [(m.src, m.round) for m in box.take(4)] == [("a", 5), ("b", 9)]
    assert not box
