"""MQTT topic names of wire protocol v1 (see DESIGN.md, "Wire protocol v1").

Every topic lives under ``p2pfl/v1/<net>/``; node ids and network names are single topic levels,
so they may not contain ``/``, ``+`` or ``#``.
"""

import functools
import re
import unicodedata
from typing import Literal

from p2pfl.protocol.errors import ProtocolError

PREFIX = "p2pfl/v1"
MAX_NAME_LENGTH = 64
SEED_BUCKETS = 256
SEED_GROUP = 16
"""Seed buckets a joining node reads at once when its own one is empty (a smaller network)."""

TopicKind = Literal["inbox", "presence", "telemetry", "log"]

_FORBIDDEN = frozenset("/+#")
_RECORD_KINDS: dict[str, TopicKind] = {
    "presence": "presence",
    "telemetry": "telemetry",
    "log": "log",
}


_SEED_LEVELS = frozenset(str(b) for b in range(SEED_BUCKETS))

# A run id names a directory of the state dir too (p2pfl.runs): a plain word, no dots first.
MAX_RUN = 64
_RUN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def is_run_id(value: object) -> bool:
    """Whether ``value`` can name a run: 1-64 of ``A-Za-z0-9._+-``, a letter or digit first."""
    return isinstance(value, str) and _RUN_RE.fullmatch(value) is not None


def validate_run_name(value: str) -> str:
    """``run_name`` as configured: empty (the default run) or a run id; else ValueError."""
    if value and not is_run_id(value):
        raise ValueError(
            f"{value!r} is not a run name: 1-{MAX_RUN} letters, digits and ._+- "
            "(a letter or digit first)"
        )
    return value


def validate_name(value: str, what: str) -> str:
    """Return ``value`` if it is usable as a node id or network name; else raise ValueError.

    ``what`` names the value in the message, e.g. ``"node id"``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} {value[:16]!r}... is longer than {MAX_NAME_LENGTH} characters")
    for char in value:
        # MQTT wildcards and level separators would change which topics match; whitespace and
        # control characters make ids unreadable in logs and ambiguous on the command line.
        if char in _FORBIDDEN or char.isspace() or unicodedata.category(char).startswith("C"):
            raise ValueError(f"{what} {value!r} must not contain {char!r}")
    return value


@functools.lru_cache(maxsize=8192)
def inbox(net: str, node_id: str) -> str:
    """Topic on which a node receives models and control messages."""
    return f"{_base(net)}/node/{validate_name(node_id, 'node id')}/inbox"


def presence(net: str, node_id: str) -> str:
    """Retained presence record of a node (replaced by its will when it dies)."""
    return _record(net, "presence", node_id)


def telemetry(net: str, node_id: str) -> str:
    """Retained latest status of a node."""
    return _record(net, "telemetry", node_id)


def log(net: str, node_id: str) -> str:
    """Warnings and errors of a node, for distributed logging."""
    return _record(net, "log", node_id)


@functools.lru_cache(maxsize=8192)
def _record(net: str, kind: str, node_id: str) -> str:
    """The topic of a node's record of ``kind``: ``<base>/<kind>/<node id>``."""
    return f"{_base(net)}/{kind}/{validate_name(node_id, 'node id')}"


def seed(net: str, bucket: int, node_id: str) -> str:
    """Where a node of a sampled network (``view_size``) also keeps its presence record
    (retained), in its own one of :data:`SEED_BUCKETS` buckets: a joining node reads one
    bucket for its first contacts (N / 256 records), instead of every node's presence."""
    return f"{_base(net)}/seed/{bucket % SEED_BUCKETS}/{validate_name(node_id, 'node id')}"


def seed_bucket(net: str, bucket: int) -> str:
    """Subscription matching the heartbeats sent to one seed bucket."""
    return f"{_base(net)}/seed/{bucket % SEED_BUCKETS}/+"


def seed_group(net: str, bucket: int) -> tuple[str, ...]:
    """Subscriptions to the :data:`SEED_GROUP` seed buckets around ``bucket`` (its own among
    them): where a joining node looks when its own bucket is empty."""
    first = bucket % SEED_BUCKETS // SEED_GROUP * SEED_GROUP
    return tuple(seed_bucket(net, b) for b in range(first, first + SEED_GROUP))


def presence_all(net: str) -> str:
    """Subscription matching every node's presence record."""
    return f"{_base(net)}/presence/+"


def telemetry_all(net: str) -> str:
    """Subscription matching every node's telemetry."""
    return f"{_base(net)}/telemetry/+"


def log_all(net: str) -> str:
    """Subscription matching every node's log topic."""
    return f"{_base(net)}/log/+"


@functools.lru_cache(maxsize=16384)
def parse(topic: str) -> tuple[str, TopicKind, str]:
    """Split an incoming topic into ``(net, kind, node_id)``; raise ProtocolError if not ours."""
    levels = topic.split("/")
    if len(levels) < 5 or "/".join(levels[:2]) != PREFIX:
        raise ProtocolError(f"topic {topic[:200]!r} is not a p2pfl v1 topic")
    net, rest = levels[2], levels[3:]
    kind: TopicKind
    if len(rest) == 3 and rest[0] == "node" and rest[2] == "inbox":
        kind, node_id = "inbox", rest[1]
    elif len(rest) == 2 and rest[0] in _RECORD_KINDS:
        kind, node_id = _RECORD_KINDS[rest[0]], rest[1]
    elif len(rest) == 3 and rest[0] == "seed" and rest[1] in _SEED_LEVELS:
        kind, node_id = "presence", rest[2]  # a presence record, sent to a seed bucket
    else:
        raise ProtocolError(f"topic {topic[:200]!r} has an unknown layout")
    try:
        validate_name(net, "network name")
        validate_name(node_id, "node id")
    except ValueError as exc:
        raise ProtocolError(f"topic {topic[:200]!r}: {exc}") from None
    return net, kind, node_id


def _base(net: str) -> str:
    return f"{PREFIX}/{validate_name(net, 'network name')}"
