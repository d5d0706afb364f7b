"""The simulated network: per-link latency, jitter, bandwidth, loss and timed partitions.

`LinkDelay` is the `MemoryBus` delay hook: for each delivery it returns how long the message
travels, or None when the network loses it. Random draws are a pure function of
(seed, source node, destination node, message number on that link), so two runs with the same
seed see the same delays and losses, whatever else happens in the process.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["LinkDelay", "NetworkModel", "Partition", "resolve_groups"]

# A later message on a link never overtakes an earlier one (MQTT over TCP keeps order per
# connection); equal deadlines would leave the order to asyncio's heap, so keep them apart.
_FIFO_GAP = 1e-6


class Partition(BaseModel):
    """The network splits into groups from `start` to `end` (seconds since the run started).

    Either `groups` lists node ids (or node indices) per group, and nodes not listed form one
    more group together; or `split` puts that fraction of the nodes (by sorted id) in the first
    group and the rest in the second.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: float = Field(ge=0)
    end: float = Field(gt=0)
    groups: tuple[tuple[str | int, ...], ...] | None = None
    split: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> Partition:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        if (self.groups is None) == (self.split is None):
            raise ValueError("give either groups or split")
        if self.groups is not None:
            seen: set[str | int] = set()
            for group in self.groups:
                for node in group:
                    if node in seen:
                        raise ValueError(f"groups: node {node!r} is in two groups")
                    seen.add(node)
        return self

    def active(self, t: float) -> bool:
        """Whether the partition holds at `t` seconds since the run started."""
        return self.start <= t < self.end


def resolve_groups(partition: Partition, node_ids: Sequence[str]) -> dict[str, int]:
    """Map every node id to its group number under `partition`.

    Raises ValueError for a group member that is neither a known id nor a valid index.
    """
    ids = sorted(node_ids)
    if partition.split is not None:
        first = round(partition.split * len(ids))
        return {node: 0 if i < first else 1 for i, node in enumerate(ids)}
    assert partition.groups is not None
    known = set(ids)
    out: dict[str, int] = {}
    for g, group in enumerate(partition.groups):
        for member in group:
            if isinstance(member, int):
                if not 0 <= member < len(ids):
                    raise ValueError(f"node index {member} is out of range 0..{len(ids) - 1}")
                member = ids[member]
            elif member not in known:
                raise ValueError(f"unknown node id {member!r}")
            out[member] = g
    rest = len(partition.groups)
    return {node: out.get(node, rest) for node in ids}


class NetworkModel(BaseModel):
    """How links behave: the same law for every link, drawn independently per link."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    # None: infinite bandwidth, a message of any size takes the latency only.
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    loss: float = Field(default=0.0, ge=0, le=1)
    partitions: tuple[Partition, ...] = ()

    @property
    def active(self) -> bool:
        """Whether links do anything at all (else the bus can skip the hook)."""
        return bool(
            self.latency_ms
            or self.jitter_ms
            or self.bandwidth_mbps is not None
            or self.loss
            or self.partitions
        )


class LinkDelay:
    """The `MemoryBus` delay hook implementing a `NetworkModel`.

    `node_of` maps a transport client id to its node id (None for clients that are not
    simulated nodes, e.g. an observer: their messages get the base latency and nothing else).
    `clock` returns seconds since the run started, on the event loop's time base, since the
    returned delays are handed to `loop.call_later`. `nodes` lists every node id; it is needed
    by partitions given as `split` or by node index.

    Bandwidth is per directed link: a message waits until the link has finished sending the
    earlier ones, so a model sent in many chunks takes size / bandwidth in total.

    `stats` counts deliveries and drops by reason: `delivered`, `loss`, `partition`, and
    `unknown` (deliveries involving a client that is not a node).
    """

    def __init__(
        self,
        model: NetworkModel,
        node_of: Callable[[str], str | None],
        clock: Callable[[], float],
        seed: int,
        *,
        nodes: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.node_of = node_of
        self.clock = clock
        self.seed = seed
        self.stats: dict[str, int] = {"delivered": 0, "loss": 0, "partition": 0, "unknown": 0}
        self._latency = model.latency_ms / 1000.0
        self._jitter = model.jitter_ms / 1000.0
        self._bits_per_second = (
            None if model.bandwidth_mbps is None else model.bandwidth_mbps * 1_000_000.0
        )
        if model.partitions and not nodes:
            raise ValueError("a network with partitions needs the list of node ids")
        self._partitions = [(p, resolve_groups(p, nodes)) for p in model.partitions]
        # per directed link: messages so far, when its sender is free, last arrival time
        self._count: dict[tuple[str, str], int] = {}
        self._busy_until: dict[tuple[str, str], float] = {}
        self._last_arrival: dict[tuple[str, str], float] = {}

    def __call__(self, src_client: str, dst_client: str, nbytes: int) -> float | None:
        """Seconds until `dst_client` receives `nbytes` from `src_client`, or None if lost."""
        src, dst = self.node_of(src_client), self.node_of(dst_client)
        if src is None or dst is None:
            self.stats["unknown"] += 1
            return self._latency
        if src == dst:
            self.stats["delivered"] += 1
            return 0.0  # a node hearing itself does not cross the network
        now = self.clock()
        if self._partitioned(src, dst, now):
            self.stats["partition"] += 1
            return None
        link = (src, dst)
        n = self._count.get(link, 0)
        self._count[link] = n + 1
        u_loss, u_jitter = _uniforms(self.seed, src, dst, n)
        if u_loss < self.model.loss:
            self.stats["loss"] += 1
            return None
        send_done = now
        if self._bits_per_second is not None:
            send_done = (
                max(now, self._busy_until.get(link, now)) + nbytes * 8 / self._bits_per_second
            )
            self._busy_until[link] = send_done
        propagation = max(0.0, self._latency + (2.0 * u_jitter - 1.0) * self._jitter)
        arrival = send_done + propagation
        last = self._last_arrival.get(link)
        if last is not None and last > now and arrival <= last:
            arrival = last + _FIFO_GAP
        self._last_arrival[link] = arrival
        self.stats["delivered"] += 1
        return arrival - now

    def _partitioned(self, src: str, dst: str, now: float) -> bool:
        for partition, group_of in self._partitions:
            if partition.active(now) and group_of.get(src) != group_of.get(dst):
                return True
        return False


def _uniforms(seed: int, src: str, dst: str, n: int) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) for message `n` on link src -> dst."""
    key = f"{seed}\x00{src}\x00{dst}\x00{n}".encode()
    a, b = struct.unpack("<QQ", hashlib.blake2b(key, digest_size=16).digest())
    # 53 bits: exactly representable, so u < 1 always and loss = 1 drops everything
    return (a >> 11) / 2.0**53, (b >> 11) / 2.0**53
