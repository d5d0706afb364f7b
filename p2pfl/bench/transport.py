"""`transport`: what p2pfl's model path costs on a real broker, against plain aiomqtt.

Timed, per model size, codec and broker, from the sender's weights to the receiver's checked
model, on the path a node uses (`Gossip.encode`, `Gossip.send`, `Inbox.accept`): `encode_model`
signed with an Ed25519 key (nodes sign by default) -> `chunking.split` into signed `max_chunk`
pieces -> `MqttTransport.publish` at QoS 1 -> the broker -> the receiver's `MqttTransport` ->
`Inbox.accept` (signature and key check, reassembly, digests, decoding against the local
layout, finite values). One transfer at a time: the next starts once the model is in the inbox.

Baseline, on the same broker in the same run: two plain aiomqtt clients, one publishing the
model's tensor bytes at QoS 1 (cut beforehand into slices of the same `max_chunk`, as brokers
cap packet sizes; the same in-flight window as `MqttTransport`), one receiving them: no
envelope, codec, signature or check.

Figures: p2pfl's throughput / aiomqtt's (both in tensor bytes per second, so a compressing codec
can beat 1), and wire bytes (every payload published) / tensor bytes, per codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import aiomqtt
import numpy as np

from p2pfl.bench.core import BenchOptions, BenchResult, Figure, ratio
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.inbox import Inbox, NodeCounters
from p2pfl.protocol import chunking, topics
from p2pfl.protocol.model import encode_model, layout
from p2pfl.transport.base import LocalBroker
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.mosquitto import MosquittoBroker, find_mosquitto
from p2pfl.transport.mqtt import MqttTransport
from p2pfl.transport.options import MqttOptions
from p2pfl.trust import Trust

CODECS = ("raw", "fp16", "int8")
BROKERS = ("mosquitto", "embedded")
MB = 1_000_000
THROUGHPUT_GOAL = ">= 0.8"
WIRE_GOALS = {"raw": "<= 1.01", "int8": "<= 0.27"}
SENDER, RECEIVER = "sender", "receiver"
RAW_TOPIC = "bench/raw"
_TIMEOUT = 120.0  # one transfer, at worst (50 MB through a slow broker on a busy machine)


def run(options: BenchOptions) -> BenchResult:
    """Every size x codec through each broker, p2pfl's path against aiomqtt's."""
    sizes: list[float] = options.pick([0.1], [0.1, 1, 10], [0.1, 1, 10, 50])
    trials: int = options.pick(1, 3, 5)
    # Each measurement repeats transfers until it has moved this much (small models: many).
    volume: float = options.pick(0.5 * MB, 10 * MB, 50 * MB)
    result = BenchResult(
        "transport",
        "Model transfers through a broker, p2pfl's path against plain aiomqtt",
        ["broker", "model MB", "codec", "wire / tensor", "aiomqtt MB/s", "p2pfl MB/s", "ratio"],
    )
    config = NodeConfig.model_validate({})  # a node as `p2pfl run` makes it by default
    rows: dict[str, list[dict[str, Any]]] = {}
    for kind in BROKERS:
        if kind == "mosquitto" and find_mosquitto() is None:
            result.notes.append("mosquitto is not installed: its rows are missing")
            continue
        rows[kind] = asyncio.run(_measure_broker(kind, sizes, trials, volume, config, options))
        result.rows.extend(rows[kind])
    largest = max(sizes)
    for kind in BROKERS:
        at = [r for r in rows.get(kind, []) if r["model MB"] == largest and r["codec"] == "raw"]
        result.figures.append(
            Figure(
                f"throughput vs aiomqtt, {kind}, raw, {largest:g} MB",
                at[0]["ratio"] if at else None,
                goal=THROUGHPUT_GOAL if kind == "mosquitto" else None,
                note="" if at else f"{kind} not measured",
            )
        )
    for codec in CODECS:
        wire = [r["wire / tensor"] for rs in rows.values() for r in rs if r["codec"] == codec]
        result.figures.append(
            Figure(
                f"wire / tensor bytes, {codec}",
                max(wire) if wire else None,
                goal=WIRE_GOALS.get(codec),
                note="the largest over model sizes",
            )
        )
    result.notes.append(
        f"Medians of {trials} trial(s); each trial repeats a transfer until it has moved "
        f"{volume / MB:g} MB. p2pfl signs every message and chunk (trust tofu, the default) "
        f"and cuts at max_chunk = {config.max_chunk} bytes."
    )
    return result


async def _measure_broker(
    kind: str,
    sizes: list[float],
    trials: int,
    volume: float,
    config: NodeConfig,
    options: BenchOptions,
) -> list[dict[str, Any]]:
    rows = []
    async with _broker(kind) as broker, _P2pfl(broker.uri, config) as p2p, _Raw(broker) as raw:
        for size in sizes:
            weights = model_of(int(size * MB))
            tensor_bytes = sum(a.nbytes for a in weights.values())
            reps = max(1, math.ceil(volume / tensor_bytes))
            p2p.inbox.layout = layout(weights)
            slices = raw.slices(weights, config.max_chunk)
            raw_s: list[float] = []
            p2p_s: dict[str, list[float]] = {codec: [] for codec in CODECS}
            wire: dict[str, int] = {}
            # Once each, untimed: warms both paths up, checks the model arrives intact.
            await raw.transfer(slices)
            for codec in CODECS:
                wire[codec] = await p2p.transfer(weights, codec, check=True)
            for trial in range(trials):
                options.progress(f"transport: {kind}, {size:g} MB, trial {trial + 1}/{trials}")
                raw_s.append(await _timed(reps, partial(raw.transfer, slices)))
                for codec in CODECS:
                    p2p_s[codec].append(await _timed(reps, partial(p2p.transfer, weights, codec)))
            raw_rate = reps * tensor_bytes / statistics.median(raw_s)
            for codec in CODECS:
                rate = reps * tensor_bytes / statistics.median(p2p_s[codec])
                r = ratio(rate, raw_rate)
                rows.append(
                    {
                        "broker": kind,
                        "model MB": size,
                        "codec": codec,
                        "wire / tensor": round(wire[codec] / tensor_bytes, 4),
                        "aiomqtt MB/s": round(raw_rate / MB, 1),
                        "p2pfl MB/s": round(rate / MB, 1),
                        "ratio": None if r is None else round(r, 3),
                    }
                )
    return rows


async def _timed(reps: int, transfer: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for _ in range(reps):
        await transfer()
    return time.perf_counter() - started


def model_of(nbytes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 model of about `nbytes`: four layers of weights (rows x 256) and biases."""
    rng = np.random.default_rng(seed)
    per_layer = max(1, nbytes // 4 // 4 // 257)  # rows: a row is 256 weights and one bias
    weights = {}
    for i in range(4):
        weights[f"layer{i}.weight"] = rng.standard_normal((per_layer, 256), np.float32) * 0.05
        weights[f"layer{i}.bias"] = np.zeros(per_layer, np.float32)
    return weights


@contextlib.asynccontextmanager
async def _broker(kind: str) -> AsyncIterator[LocalBroker]:
    broker: LocalBroker = MosquittoBroker() if kind == "mosquitto" else EmbeddedBroker()
    async with broker:
        yield broker


class _P2pfl:
    """A sender and a receiver as two nodes have them: transports, the key, the inbox."""

    def __init__(self, uri: str, config: NodeConfig) -> None:
        self.config = config
        self.identity = Identity.generate()
        self.sender = MqttTransport(uri, f"bench-{SENDER}")
        self.receiver = MqttTransport(uri, f"bench-{RECEIVER}")
        self.counters = NodeCounters()
        self.inbox = Inbox(config, self.counters, clock=time.monotonic)
        self.inbox.trust = Trust(config.trust, max_peers=config.max_peers)
        self.topic = topics.inbox(config.network, RECEIVER)
        self._seq = time.time_ns() // 1000
        self._round = 0
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> _P2pfl:
        await self.receiver.connect()
        self._stack.push_async_callback(self.receiver.close)
        await self.receiver.subscribe(self.topic)
        await self.sender.connect()
        self._stack.push_async_callback(self.sender.close)
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        tasks.create_task(self._receive())
        # Unwound first: closing the receiver ends `messages()`, so the receiving task.
        self._stack.push_async_callback(self.receiver.close)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _receive(self) -> None:
        # Gossip.receive_loop, for the inbox topic
        async for message in self.receiver.messages():
            await self.inbox.accept(message.payload, lowest=0, highest=2**62)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def transfer(
        self, weights: dict[str, np.ndarray], codec: str, *, check: bool = False
    ) -> int:
        """One model from sender to receiver's inbox; the bytes published."""
        self._round += 1
        net, r = self.config.network, self._round
        self.inbox.arrived.clear()
        # Gossip.encode, in a worker thread as Node does
        payload = await asyncio.to_thread(
            encode_model, weights, net=net, src=SENDER, seq=self._next_seq(), round=r, age=1.0,
            codec=codec, signer=self.identity,
        )  # fmt: skip
        # Gossip.send
        seq = self._next_seq()
        parts = chunking.split(
            payload, max_chunk=self.config.max_chunk, transfer_id=f"{SENDER}-{seq}", net=net,
            src=SENDER, seq=seq, signer=self.identity,
        )  # fmt: skip
        wire = 0
        for part in parts:
            data = bytes(part) if isinstance(part, memoryview) else part
            await self.sender.publish(self.topic, data, qos=1)
            wire += len(data)
        try:
            async with asyncio.timeout(_TIMEOUT):
                await self.inbox.arrived.wait()
        except TimeoutError:
            raise RuntimeError(self._missing(r)) from None
        received = self.inbox.model(SENDER, r)
        if received is None:
            raise RuntimeError(self._missing(r))
        if check:
            _check(weights, received.weights, codec)
        self.inbox.take(r)  # frees the buffered model
        return wire

    def _missing(self, r: int) -> str:
        refused = dict(self.counters.rejected) or "nothing refused"
        return f"model of round {r} did not arrive ({refused}; {self.receiver.stats})"


def _check(sent: dict[str, np.ndarray], got: dict[str, np.ndarray], codec: str) -> None:
    """The model arrived whole: exactly for raw, within the codec's rounding otherwise."""
    tolerance = {"raw": 0.0, "fp16": 1e-3, "int8": 0.01}[codec]
    for name, array in sent.items():
        if got[name].shape != array.shape or not np.allclose(got[name], array, atol=tolerance):
            raise RuntimeError(f"{codec}: tensor {name} arrived changed")


class _Raw:
    """Plain aiomqtt: a publisher and a subscriber on one topic, nothing else."""

    def __init__(self, broker: LocalBroker) -> None:
        window = MqttOptions().max_inflight
        self.publisher = aiomqtt.Client(
            broker.host, broker.port, identifier="bench-raw-pub", timeout=_TIMEOUT,
            max_inflight_messages=window,
        )  # fmt: skip
        self.publisher.pending_calls_threshold = 10_000  # every slice is published at once
        self.subscriber = aiomqtt.Client(
            broker.host, broker.port, identifier="bench-raw-sub", timeout=_TIMEOUT
        )
        self._expected = 0
        self._received = 0
        self._done = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> _Raw:
        await self._stack.enter_async_context(self.subscriber)
        await self.subscriber.subscribe(RAW_TOPIC, qos=1)
        await self._stack.enter_async_context(self.publisher)
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self._stop, tasks.create_task(self._receive()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @staticmethod
    def _stop(task: asyncio.Task[None]) -> None:
        task.cancel()

    @staticmethod
    def slices(weights: dict[str, np.ndarray], size: int) -> list[bytes]:
        """The model's tensor bytes, cut into `size`-byte slices (before any timing)."""
        whole = b"".join(a.tobytes() for a in weights.values())
        return list(_cut(whole, size))

    async def _receive(self) -> None:
        async for message in self.subscriber.messages:
            payload = message.payload
            self._received += len(payload) if isinstance(payload, bytes | bytearray) else 0
            if self._received >= self._expected:
                self._done.set()

    async def transfer(self, slices: list[bytes]) -> None:
        """Every slice published at QoS 1 and received by the subscriber."""
        self._received, self._expected = 0, sum(len(s) for s in slices)
        self._done.clear()
        await asyncio.gather(*(self.publisher.publish(RAW_TOPIC, s, qos=1) for s in slices))
        try:
            async with asyncio.timeout(_TIMEOUT):
                await self._done.wait()
        except TimeoutError:
            raise RuntimeError(
                f"aiomqtt: {self._received} of {self._expected} bytes arrived"
            ) from None


def _cut(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
