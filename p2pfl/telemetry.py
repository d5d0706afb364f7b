"""Telemetry: the periodic status a node publishes (retained) for monitors, and its log topic.

A record is the node's status (`p2pfl.status.NodeStatus`, built by `Node.status()` on the
node's loop): what the node is doing (round, accuracy, traffic, CPU, memory, peers, and with
differential privacy the epsilon it has spent) and at which `detail` (`telemetry_detail`). At
`full` it also carries the confusion matrix of its last evaluation (a monitor sums them into the
network's global evaluation) and a 32-float random projection of its weights, seeded by the
network name, so a monitor estimates how far peers' models diverge without downloading any
model. Both reveal something private (the node's label distribution; a sketch of its weights),
so `metrics` leaves them out and `off` publishes no record at all. Forwarded warnings (the log
topic) are the same at every level.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import psutil

from p2pfl.config import NodeConfig
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import PROTOCOL_VERSION, Envelope, Signer, pack_envelope
from p2pfl.status import NodeStatus
from p2pfl.transport.base import Transport, TransportError

log = logging.getLogger(__name__)

PROJECTION_DIM = 32
_BLOCK = 1 << 15


def projection(weights: Mapping[str, np.ndarray], network: str) -> list[float]:
    """A Johnson-Lindenstrauss sketch of the flattened model: the same matrix network-wide.

    The Gaussian matrix is generated block by block from a seed derived from the network name
    and the tensor name, so it is never held whole in memory. Blocking: call it off the loop.
    """
    out = np.zeros(PROJECTION_DIM, dtype=np.float64)
    for name in sorted(weights):
        flat = np.asarray(weights[name], dtype=np.float32).ravel()
        if flat.size == 0 or not np.issubdtype(np.asarray(weights[name]).dtype, np.floating):
            continue
        digest = hashlib.sha256(f"{network}\x1f{name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            matrix = rng.standard_normal((PROJECTION_DIM, block.size), dtype=np.float32)
            out += matrix @ block
    return [float(v) for v in out / np.sqrt(PROJECTION_DIM)]


class ProcessStats:
    """CPU percent and resident memory of this process (psutil)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # first call primes the counter

    def sample(self) -> tuple[float, int]:
        return self._proc.cpu_percent(None), int(self._proc.memory_info().rss)


def encode_telemetry(
    net: str, node_id: str, seq: int, status: NodeStatus, signer: Signer | None = None
) -> bytes:
    """The telemetry envelope of `node_id`, signed by `signer` when given.

    ValueError when `status` is at detail `off`: such a node publishes none."""
    env = Envelope(
        v=PROTOCOL_VERSION, kind="telemetry", net=net, src=node_id, seq=seq, ts=time.time(),
        body=status.wire(),
    )  # fmt: skip
    return bytes(pack_envelope(env, signer))


def encode_log(
    net: str, node_id: str, seq: int, record: logging.LogRecord, signer: Signer | None = None
) -> bytes:
    """One warning or error of `node_id`, for the log topic, signed by `signer` when given."""
    body = {
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage()[:2000],
        "time": record.created,
    }
    env = Envelope(
        v=PROTOCOL_VERSION, kind="log", net=net, src=node_id, seq=seq, ts=time.time(), body=body
    )
    return bytes(pack_envelope(env, signer))


class LogForwarder(logging.Handler):
    """Collects this process's p2pfl warnings and errors for the node to publish, rate-limited.

    `emit` may run on any thread; records are kept in a bounded list that the node drains.
    """

    def __init__(self, *, per_minute: int = 60, keep: int = 100) -> None:
        super().__init__(level=logging.WARNING)
        self.per_minute = per_minute
        self.keep = keep
        self.dropped = 0
        self._pending: list[logging.LogRecord] = []
        self._window_start = time.monotonic()
        self._in_window = 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.per_minute or len(self._pending) >= self.keep:
            self.dropped += 1
            return
        self._in_window += 1
        self._pending.append(record)

    def drain(self) -> list[logging.LogRecord]:
        records, self._pending = self._pending, []
        return records


def measured(
    status: NodeStatus,
    stats: ProcessStats,
    weights: Callable[[], Mapping[str, np.ndarray]],
    network: str,
) -> NodeStatus:
    """`status` with this process's CPU and memory, and at `full` the projection of `weights()`.

    Blocking (the projection reads the whole model): run it in a worker thread, on a status that
    `Node.status()` built on the loop, so the thread reads nothing the loop changes.
    """
    cpu, rss = stats.sample()
    more: dict[str, Any] = {"cpu": cpu, "rss": rss}
    if status.detail == "full":
        more["projection"] = tuple(projection(weights(), network))
    return status.model_copy(update=more)


class TelemetryPublisher:
    """Publishes a node's status on its telemetry topic every `telemetry_interval` seconds
    (retained, at its `telemetry_detail`) and forwards its warnings to its log topic."""

    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        *,
        node_id: str,
        status: Callable[[], NodeStatus],
        weights: Callable[[], Mapping[str, np.ndarray]],
        next_seq: Callable[[], int],
        signer: Signer | None,
        logs: LogForwarder | None,
        clock: Callable[[], float],
    ) -> None:
        self.net = config.network
        self.node_id = node_id
        self.interval = config.telemetry_interval
        self.detail = config.telemetry_detail
        self.transport = transport
        self.status = status
        self.weights = weights
        self.next_seq = next_seq
        self.signer = signer
        self.logs = logs
        self.clock = clock

    async def run(self) -> None:
        """Publish until cancelled."""
        topic = topics.telemetry(self.net, self.node_id)
        interval = self.interval
        if self.detail == "off":
            # No status records; warnings are still forwarded (they carry no labels or weights).
            # An empty retained record deletes one an earlier run left on a shared broker.
            interval = 0.0
            await self._publish(topic, b"", True)
        if interval <= 0 and self.logs is None:
            return
        stats = ProcessStats()
        next_at = self.clock()
        while True:
            await self._forward_logs()
            if interval > 0 and self.clock() >= next_at:
                next_at = self.clock() + interval
                status = self.status()  # on the loop: the thread reads nothing the loop changes
                record = await asyncio.to_thread(measured, status, stats, self.weights, self.net)
                payload = encode_telemetry(
                    self.net, self.node_id, self.next_seq(), record, self.signer
                )
                await self._publish(topic, payload, True)
            await asyncio.sleep(min(1.0, interval) if interval > 0 else 1.0)

    async def _forward_logs(self) -> None:
        if self.logs is None:
            return
        for record in self.logs.drain():
            payload = encode_log(self.net, self.node_id, self.next_seq(), record, self.signer)
            await self._publish(topics.log(self.net, self.node_id), payload, False)

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        try:
            await self.transport.publish(topic, payload, qos=0, retain=retain)
        except TransportError as exc:
            log.debug("telemetry not published error=%s", exc)
