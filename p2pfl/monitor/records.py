"""What a monitor accepts from the telemetry and log topics, checked field by field.

Telemetry comes from any process that can publish on a broker, so a body is validated before it
is shown or summed: numbers finite, lists bounded, the confusion matrix square and non-negative.
A body that fails is rejected as a whole (ProtocolError); a missing optional field is None.

`detail` says what the node chose to reveal (`telemetry_detail`): `full` (the default, and what a
record without the field means) or `metrics`, which carries no confusion matrix and no weight
projection; a `metrics` record that carries either contradicts itself and is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from p2pfl.config import TelemetryDetail
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import validate_name

MAX_CLASSES = 1000
MAX_EVAL_SAMPLES = 10_000_000
"""Samples one node's confusion matrix may count: a test set far larger than a node holds."""
MAX_PROJECTION = 1024
MAX_IDS = 10_000
MAX_TEXT = 2000
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DETAILS = tuple(d for d in get_args(TelemetryDetail) if d != "off")
"""The `detail` a telemetry record may say: a node on `off` publishes none."""


@dataclass(frozen=True)
class Telemetry:
    """One node's status report (see `p2pfl.telemetry`)."""

    id: str
    detail: str = "full"
    role: str = "trainer"
    run: str | None = None
    schedule: str | None = None
    mode: str | None = None
    broker: str = ""
    round: int = 0
    loss: float | None = None
    accuracy: float | None = None
    test_loss: float | None = None
    confusion: np.ndarray | None = None
    samples: int | None = None
    models_sent: int = 0
    models_received: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    rejected: tuple[tuple[str, int], ...] = ()
    cpu: float | None = None
    rss: int | None = None
    uptime: float | None = None
    peers: tuple[str, ...] = ()
    sent_to: tuple[str, ...] = ()
    projection: tuple[float, ...] | None = None
    tags: tuple[str, ...] = ()
    epsilon: float | None = None  # DP: spent on the node's own samples; None without DP


@dataclass(frozen=True)
class LogLine:
    """One warning or error a node forwarded."""

    node: str
    level: str
    logger: str
    msg: str
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "node": self.node,
            "level": self.level,
            "logger": self.logger,
            "msg": self.msg,
        }


def parse_telemetry(node_id: str, body: Mapping[str, Any]) -> Telemetry:
    """Validate a telemetry body from `node_id`; ProtocolError when any field is unusable."""
    if not isinstance(body, Mapping):
        raise ProtocolError("telemetry body must be a map")
    if body.get("id", node_id) != node_id:
        raise ProtocolError("telemetry id does not match its sender")
    rejected = body.get("rejected") or {}
    if not isinstance(rejected, Mapping) or len(rejected) > 100:
        raise ProtocolError("telemetry rejected must be a small map")
    detail = body.get("detail", "full")
    if detail not in DETAILS:
        raise ProtocolError(f"unknown telemetry detail {str(detail)[:20]!r}")
    if detail != "full" and (body.get("confusion") is not None or body.get("projection")):
        raise ProtocolError(f"telemetry detail {detail} carries no confusion or projection")
    return Telemetry(
        id=node_id,
        detail=detail,
        role=_text(body, "role") or "trainer",
        run=_text(body, "run"),
        schedule=_text(body, "schedule"),
        mode=_text(body, "mode"),
        broker=_text(body, "broker") or "",
        round=_count(body, "round") or 0,
        loss=_number(body, "loss"),
        accuracy=_number(body, "accuracy"),
        test_loss=_number(body, "test_loss"),
        confusion=_confusion(body.get("confusion")),
        samples=_count(body, "samples"),
        models_sent=_count(body, "models_sent") or 0,
        models_received=_count(body, "models_received") or 0,
        bytes_out=_count(body, "bytes_out") or 0,
        bytes_in=_count(body, "bytes_in") or 0,
        rejected=tuple(sorted((_label(k), _int(v, "rejected")) for k, v in rejected.items())),
        cpu=_number(body, "cpu"),
        rss=_count(body, "rss"),
        uptime=_number(body, "uptime"),
        peers=_ids(body.get("peers"), "peers"),
        sent_to=_ids(body.get("sent_to"), "sent_to"),
        projection=_projection(body.get("projection")),
        tags=tuple(_label(t) for t in _list(body.get("tags"), "tags", 100)),
        epsilon=_epsilon(body),
    )


def parse_log(node_id: str, body: Mapping[str, Any]) -> LogLine:
    """Validate a log body from `node_id`; ProtocolError when unusable."""
    if not isinstance(body, Mapping):
        raise ProtocolError("log body must be a map")
    level = body.get("level")
    if level not in LOG_LEVELS:
        raise ProtocolError(f"unknown log level {str(level)[:20]!r}")
    when = _number(body, "time")
    return LogLine(
        node=node_id,
        level=str(level),
        logger=_text(body, "logger") or "",
        msg=_text(body, "msg") or "",
        time=0.0 if when is None else when,
    )


def _text(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"telemetry {key} must be a string")
    # Control characters would corrupt the terminal the dashboard draws on.
    return "".join(c if c.isprintable() else " " for c in value[:MAX_TEXT])


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number")
    value = float(value)
    return value if math.isfinite(value) else None  # a diverged loss is shown as unknown


def _epsilon(body: Mapping[str, Any]) -> float | None:
    value = _number(body, "epsilon")
    if value is not None and value < 0:
        raise ProtocolError("epsilon must not be negative")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise ProtocolError(f"{key} must be a non-negative integer")
    return value


def _count(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    return None if value is None else _int(value, key)


def _label(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise ProtocolError("labels must be short strings")
    return "".join(c if c.isprintable() else " " for c in value)


def _list(value: Any, key: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise ProtocolError(f"{key} must be a list of at most {limit} items")
    return list(value)


def _ids(value: Any, key: str) -> tuple[str, ...]:
    out = []
    for item in _list(value, key, MAX_IDS):
        try:
            out.append(validate_name(item, "node id"))
        except ValueError as exc:
            raise ProtocolError(f"{key}: {exc}") from None
    return tuple(out)


def _confusion(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    rows = _list(value, "confusion", MAX_CLASSES)
    if not rows:
        return None
    n = len(rows)
    matrix = np.zeros((n, n), dtype=np.int64)
    for i, row in enumerate(rows):
        cells = _list(row, "confusion row", MAX_CLASSES)
        if len(cells) != n:
            raise ProtocolError("confusion matrix must be square")
        matrix[i] = [_int(c, "confusion cell") for c in cells]
    if int(matrix.sum()) > MAX_EVAL_SAMPLES:
        raise ProtocolError("confusion counts exceed what a node can evaluate")
    return matrix


def _projection(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = _list(value, "projection", MAX_PROJECTION)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ProtocolError("projection must be finite numbers")
        out.append(float(item))
    return tuple(out) or None
