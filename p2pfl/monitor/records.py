"""What a monitor accepts from the telemetry and log topics.

Telemetry comes from any process that can publish on a broker, so a body is validated before it
is shown or summed, against the one schema of a node's status (`p2pfl.status.NodeStatus`:
numbers finite, lists bounded, the confusion matrix square and non-negative). A body that fails
is rejected as a whole (ProtocolError, whose reason names the field); a missing optional field
is None. On top of the schema a monitor asks that the record be its sender's, that it say a
level a node publishes at, and that its confusion matrix count no more than a node evaluates.

`detail` says what the node chose to reveal (`telemetry_detail`): `full` (the default, and what a
record without the field means) or `metrics`, which carries no confusion matrix and no weight
projection; a `metrics` record that carries either contradicts itself and is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictFloat, ValidationError

from p2pfl.config import TelemetryDetail
from p2pfl.protocol.errors import ProtocolError
from p2pfl.status import NodeStatus, Text

MAX_EVAL_SAMPLES = 10_000_000
"""Samples one node's confusion matrix may count: a test set far larger than a node holds."""
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS = get_args(LogLevel)
DETAILS = tuple(d for d in get_args(TelemetryDetail) if d != "off")
"""The `detail` a telemetry record may say: a node on `off` publishes none."""


class LogLine(BaseModel):
    """One warning or error a node forwarded."""

    model_config = ConfigDict(frozen=True)

    time: Annotated[StrictFloat, AfterValidator(lambda t: t if math.isfinite(t) else 0.0)]
    node: str
    level: LogLevel
    logger: Text = ""
    msg: Text = ""

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


def parse_telemetry(node_id: str, body: Mapping[str, Any]) -> NodeStatus:
    """Validate a telemetry body from `node_id`; ProtocolError when any field is unusable."""
    if not isinstance(body, Mapping):
        raise ProtocolError("telemetry body must be a map")
    if body.get("id", node_id) != node_id:
        raise ProtocolError("telemetry id does not match its sender")
    if body.get("detail", "full") not in DETAILS:
        raise ProtocolError(f"unknown telemetry detail {str(body.get('detail'))[:20]!r}")
    status = _validated(NodeStatus, "telemetry", {**body, "id": node_id})
    if status.confusion is not None and sum(map(sum, status.confusion)) > MAX_EVAL_SAMPLES:
        raise ProtocolError("confusion counts exceed what a node can evaluate")
    return status


def parse_log(node_id: str, body: Mapping[str, Any]) -> LogLine:
    """Validate a log body from `node_id`; ProtocolError when unusable."""
    if not isinstance(body, Mapping):
        raise ProtocolError("log body must be a map")
    fields = {k: v for k, v in body.items() if v is not None and k != "node"}
    return _validated(LogLine, "log", {"time": 0.0, **fields, "node": node_id})


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], what: str, data: Mapping[str, Any]) -> M:
    """`model` of `data`; ProtocolError naming the first field that is unusable."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in err["loc"]) or "body"
        raise ProtocolError(
            f"{what} {where}: {err['msg'].removeprefix('Value error, ')}"[:200]
        ) from None
