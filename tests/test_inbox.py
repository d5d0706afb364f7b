"""Inbox.accept on chunked models: reassembled, parsed once, and checked like inline ones."""

from __future__ import annotations

import time

import numpy as np

from p2pfl.config import NodeConfig
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.protocol import chunking
from p2pfl.protocol.model import encode_model, layout

NET = "inboxtest"


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}


def inbox() -> Inbox:
    config = NodeConfig.model_validate({"network": NET, "id": "me"})
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
