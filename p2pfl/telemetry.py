"""Telemetry: the periodic status a node publishes (retained) for monitors, and its log topic.

A record says what the node is doing (round, accuracy, traffic, CPU, memory, peers, and with
differential privacy the epsilon it has spent) and at which `detail` (`telemetry_detail`). At
`full` it also carries the confusion matrix of its last evaluation (a monitor sums them into the
network's global evaluation) and a 32-float random projection of its weights, seeded by the
network name, so a monitor estimates how far peers' models diverge without downloading any
model. Both reveal something private (the node's label distribution; a sketch of its weights),
so `metrics` leaves them out and `off` publishes no record at all. Forwarded warnings (the log
topic) are the same at every level.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from p2pfl.protocol.envelope import PROTOCOL_VERSION, Envelope, Signer, pack_envelope

if TYPE_CHECKING:
    from p2pfl.node import Node

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
    net: str, node_id: str, seq: int, body: dict[str, Any], signer: Signer | None = None
) -> bytes:
    """The telemetry envelope of `node_id`, signed by `signer` when given."""
    env = Envelope(
        v=PROTOCOL_VERSION, kind="telemetry", net=net, src=node_id, seq=seq, ts=time.time(),
        body=body,
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


def node_status(node: Node, stats: ProcessStats) -> dict[str, Any]:
    """A node's telemetry body at its `telemetry_detail` (`full` or `metrics`; a node on `off`
    publishes none). At `full` it computes the weight projection: run it in a worker thread."""
    detail = node.config.telemetry_detail
    if detail == "off":
        raise ValueError("telemetry_detail is off: this node publishes no telemetry")
    ev = node.last_eval
    cpu, rss = stats.sample()
    c = node.counters
    body: dict[str, Any] = {
        "id": node.node_id,
        "detail": detail,
        "role": node.config.role,
        "run": node.config.run_name,
        "tags": list(node.config.tags),
        "schedule": node.schedule.name,
        "mode": node.config.mode,
        "broker": node.membership.advertised[0],
        "round": node.round,
        "loss": node.last_loss,
        "accuracy": None if ev is None else ev.accuracy,
        "test_loss": None if ev is None else ev.loss,
        "samples": node.learner.num_samples,
        "models_sent": c.models_sent,
        "models_received": c.models_received,
        "bytes_out": c.bytes_sent,
        "bytes_in": c.bytes_received,
        "rejected": dict(c.rejected),
        "cpu": cpu,
        "rss": rss,
        "uptime": node.clock() - node.started,
        "peers": node.view.live(),
        "sent_to": list(node.sent_to),
        "epsilon": node.epsilon,  # DP: spent on this node's samples; None without DP
    }
    if detail == "full":
        body["confusion"] = None if ev is None else ev.confusion.tolist()
        body["projection"] = projection(node.learner.get_weights(), node.net)
    return body
