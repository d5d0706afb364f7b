"""A node's status: the one record of what a node is doing, and the schema of its telemetry;
and `RoundReport`, the line of progress a node gives after each round.

`Node.status()` builds a `NodeStatus` on the node's event loop; the same record is what the node
publishes on its telemetry topic (`p2pfl.telemetry`), what its Prometheus endpoint exports, and
what a monitor validates and keeps of every node (`p2pfl.monitor.records`, `.state`).

Names. Inside the code a field has one name; the wire (msgpack telemetry body) and the
monitor's JSON keep the names they always had, so monitors and scrapers of earlier versions
still read them:

    field (here, NodeCounters)   telemetry / monitor JSON   Prometheus
    bytes_sent                   bytes_out                  p2pfl_bytes_sent_total
    bytes_received               bytes_in                   p2pfl_bytes_received_total
    train_loss                   train_loss, and loss       p2pfl_train_loss
    test_loss                    test_loss                  p2pfl_test_loss, and p2pfl_loss

A received record is checked here field by field (numbers finite, lists bounded, the confusion
matrix square, ids usable as node ids, text printable); what a monitor adds on top (the sender
must be the record's id, no record at `off`, a bound on evaluated samples) is in
`p2pfl.monitor.records`. A node's own record is not validated: it is built from the node's state,
and a monitor of any version checks it on arrival.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    computed_field,
    field_validator,
    model_validator,
)

from p2pfl.config import MAX_TAG, MAX_TAGS, TelemetryDetail
from p2pfl.protocol.topics import validate_name

MAX_CLASSES = 1000
MAX_PROJECTION = 1024
MAX_IDS = 10_000
MAX_TEXT = 2000
MAX_LABEL = MAX_TAG
MAX_LABELS = MAX_TAGS
MAX_CONFIG = 64  # keys of a run's learning configuration (p2pfl.runs.LEARNING_KEYS: 31)


def _printable(value: str) -> str:
    # Control characters would corrupt the terminal the dashboard draws on.
    return "".join(c if c.isprintable() else " " for c in value)


def _text(value: str) -> str:
    return _printable(value[:MAX_TEXT])


def _label(value: str) -> str:
    if not value or len(value) > MAX_LABEL:
        raise ValueError(f"labels must be 1 to {MAX_LABEL} characters")
    return _printable(value)


def _count(value: int) -> int:
    if not 0 <= value < 2**62:
        raise ValueError("must be a non-negative integer")
    return value


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # a diverged loss is shown as unknown


def _node_id(value: str) -> str:
    return validate_name(value, "node id")


Text = Annotated[StrictStr, AfterValidator(_text)]
Label = Annotated[StrictStr, AfterValidator(_label)]
Count = Annotated[StrictInt, AfterValidator(_count)]
Number = Annotated[StrictFloat, AfterValidator(_finite_or_none)]
"""A float, or None when it is not finite (NaN, inf)."""
NodeId = Annotated[StrictStr, AfterValidator(_node_id)]
Ids = Annotated[tuple[NodeId, ...], Field(max_length=MAX_IDS)]
ConfigValue = StrictBool | StrictInt | Number | Text | None
ConfusionRow = Annotated[tuple[Count, ...], Field(max_length=MAX_CLASSES)]
Confusion = Annotated[tuple[ConfusionRow, ...], Field(max_length=MAX_CLASSES)]
Projection = Annotated[
    tuple[Annotated[StrictFloat, Field(allow_inf_nan=False)], ...], Field(max_length=MAX_PROJECTION)
]


class NodeStatus(BaseModel):
    """What one node is doing: its telemetry record (see the module docstring for names).

    `detail` says what it reveals (`telemetry_detail`): `full` carries the confusion matrix of the
    last evaluation and the weight projection, `metrics` neither, and a node on `off` publishes
    no record (its status still feeds its own metrics endpoint).
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    id: NodeId
    detail: TelemetryDetail = "full"
    role: Text = "trainer"
    run: Text | None = None
    tags: Annotated[tuple[Label, ...], Field(max_length=MAX_LABELS)] = ()
    config: Annotated[dict[Label, ConfigValue], Field(max_length=MAX_CONFIG)] = {}
    """The run's learning configuration, as its run.json records it (`p2pfl.runs`)."""
    config_hash: Text | None = None
    schedule: Text | None = None
    mode: Text | None = None
    broker: Text = ""
    round: Count = 0
    rounds: Count | None = None
    """Local training steps done (rounds, or with walkers the steps this node took)."""
    train_loss: Number | None = Field(
        default=None, validation_alias=AliasChoices("train_loss", "loss")
    )
    test_loss: Number | None = None
    accuracy: Number | None = None
    confusion: Confusion | None = None
    samples: Count | None = None
    """Training samples this node holds."""
    models_sent: Count = 0
    models_received: Count = 0
    bytes_sent: Count = Field(
        default=0,
        validation_alias=AliasChoices("bytes_out", "bytes_sent"),
        serialization_alias="bytes_out",
    )
    bytes_received: Count = Field(
        default=0,
        validation_alias=AliasChoices("bytes_in", "bytes_received"),
        serialization_alias="bytes_in",
    )
    rejected: Annotated[dict[Label, Count], Field(max_length=MAX_LABELS)] = {}
    """Messages this node dropped, by reason."""
    cpu: Number | None = None
    rss: Count | None = None
    uptime: Number | None = None
    peers: Ids = ()
    """Live trainers in its view."""
    sent_to: Ids = ()
    """Whom it sent its model to in its last round."""
    projection: Projection | None = None
    epsilon: Number | None = None
    """Differential privacy: spent on the node's own samples; None without DP."""
    paused: Label | None = None
    """Why the node does not train now (`--when`, `p2pfl pause`); None: it trains."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def loss(self) -> float | None:
        """The training loss under the name that monitors before `train_loss` read."""
        return self.train_loss

    @model_validator(mode="before")
    @classmethod
    def _nil_is_absent(cls, data: Any) -> Any:
        # A field sent as nil takes its default, except `detail`, which must say a level.
        if not isinstance(data, Mapping):
            return data
        return {k: v for k, v in data.items() if v is not None or k == "detail"}

    @model_validator(mode="before")
    @classmethod
    def _detail_holds(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        detail = data.get("detail", "full")
        if detail != "full" and (data.get("confusion") is not None or data.get("projection")):
            raise ValueError(
                f"telemetry detail {str(detail)[:20]} carries no confusion or projection"
            )
        return data

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return value or "trainer"

    @field_validator("rejected")
    @classmethod
    def _sorted(cls, value: dict[str, int]) -> dict[str, int]:
        return dict(sorted(value.items()))

    @field_validator("confusion", "projection")
    @classmethod
    def _empty_is_none(cls, value: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        return value or None

    @field_validator("confusion")
    @classmethod
    def _square(
        cls, value: tuple[tuple[int, ...], ...] | None
    ) -> tuple[tuple[int, ...], ...] | None:
        if value is not None and any(len(row) != len(value) for row in value):
            raise ValueError("confusion matrix must be square")
        return value

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError("epsilon must not be negative")
        return value

    def confusion_matrix(self) -> np.ndarray | None:
        """The confusion matrix (rows = true label) as an int64 array; None when absent."""
        return None if self.confusion is None else np.array(self.confusion, dtype=np.int64)

    def wire(self) -> dict[str, Any]:
        """The telemetry body: wire names, and at `metrics` no confusion or projection key.

        ValueError at `off`: such a node publishes no telemetry.
        """
        if self.detail == "off":
            raise ValueError("telemetry_detail is off: this node publishes no telemetry")
        hidden = set() if self.detail == "full" else {"confusion", "projection"}
        return self.model_dump(by_alias=True, exclude=hidden)

    def summary(self) -> dict[str, Any]:
        """Plain JSON-ready numbers under the monitor's snapshot keys (`summary_keys()`)."""
        return {
            "detail": self.detail,
            "round": self.round,
            "rounds": self.rounds,
            "accuracy": self.accuracy,
            "loss": self.train_loss,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "peers": len(self.peers),
            "peer_ids": list(self.peers),
            "models_sent": self.models_sent,
            "models_received": self.models_received,
            "bytes_in": self.bytes_received,
            "bytes_out": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "cpu": self.cpu,
            "rss": self.rss,
            "uptime": self.uptime,
            "samples": self.samples,
            "epsilon": self.epsilon,
            "paused": self.paused,
            "schedule": self.schedule,
            "mode": self.mode,
            "run": self.run,
            "tags": list(self.tags),
            "config_hash": self.config_hash,
            "sent_to": list(self.sent_to),
            "confusion": None if self.confusion is None else [list(r) for r in self.confusion],
            "projection": None if self.projection is None else list(self.projection),
        }


def unknown_summary() -> dict[str, Any]:
    """`NodeStatus.summary()`'s keys for a node that has sent no status: nothing known."""
    return {key: [] if key in ("peer_ids", "sent_to", "tags") else None for key in _SUMMARY_KEYS}


_SUMMARY_KEYS = tuple(NodeStatus(id="x").summary())


@dataclass(frozen=True)
class RoundReport:
    """One line of progress: what a round did."""

    node_id: str
    round: int
    train_loss: float
    test_loss: float
    accuracy: float
    peers: int
    merged: int
    seconds: float
    counters: dict[str, Any]
    fit_seconds: float = 0.0
    eval_seconds: float = 0.0
    epsilon: float | None = None  # DP: epsilon spent so far on this node's samples
    paused: str | None = None  # why the node will not train next round (--when, pause)
    run: str = ""  # the run the node takes part in (p2pfl.run_identity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": "round",
            "node": self.node_id,
            "run": self.run,
            "round": self.round,
            "train_loss": round(self.train_loss, 6),
            "test_loss": round(self.test_loss, 6),
            "accuracy": round(self.accuracy, 6),
            "peers": self.peers,
            "merged": self.merged,
            "seconds": round(self.seconds, 4),
            "fit_seconds": round(self.fit_seconds, 4),
            "eval_seconds": round(self.eval_seconds, 4),
            "epsilon": None if self.epsilon is None else round(self.epsilon, 6),
            "paused": self.paused,
            **self.counters,
        }
