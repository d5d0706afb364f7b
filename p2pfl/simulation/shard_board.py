"""Where the shards of a `p2pfl sim --shard` run meet on their broker (see
p2pfl.simulation.shard): hellos, and each shard's results of a schedule in retained parts.

Under `p2pfl/v1/<net>/sim/`:

- `shards/<I>` (retained; the will clears it): shard I is running, with its run id and a nonce.
- `<run>/<schedule>/<I>/<k>` (retained, QoS 1): part k of shard I's records of one schedule,
  zlib-compressed JSON in parts well under every broker's packet limit (Mosquitto 2.1: 2 MB,
  EMQX: 1 MB), each a msgpack map naming its run, schedule, shard, part, count and digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pfl.protocol import topics
from p2pfl.protocol.topics import PREFIX
from p2pfl.simulation.engine import Record, ScheduleRun
from p2pfl.transport.base import Message, Transport

log = logging.getLogger(__name__)

PART_BYTES = 256 * 1024
"""Compressed bytes per results message: under EMQX's 1 MB and Mosquitto 2.1's 2 MB limits."""
MAX_RESULTS_BYTES = 512 * 2**20
"""Largest decompressed results of one shard and schedule that shard 0 accepts."""
HELLO_TIMEOUT = 30.0
"""Seconds a shard waits for its own hello to come back from the broker."""
FLUSH_TIMEOUT = 120.0
"""Seconds a shard waits for the broker to acknowledge its results."""


class ShardError(Exception):
    """The shards of a run cannot go on together; the message is one line for the user."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the nodes whose index i has i % count == index."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def indices(self, nodes: int) -> list[int]:
        """This shard's node indices among `nodes`."""
        return list(range(self.index, nodes, self.count))


@dataclass
class _Parts:
    """The parts of one shard's results of one schedule received so far."""

    count: int
    sha256: str
    data: dict[int, bytes] = field(default_factory=dict)


class ResultBoard:
    """The shards' meeting place on the broker: hellos, and results in retained parts.

    Every message it reads is checked; anything malformed or from another run is dropped and
    counted in `dropped` by reason, never raised.
    """

    def __init__(
        self, transport: Transport, net: str, run: str, shard: Shard, node_ids: list[str]
    ) -> None:
        """`node_ids`: the scenario's, by index; a shard's results hold only its own nodes."""
        self.transport = transport
        self.node_ids = node_ids
        self.run = run
        self.shard = shard
        self.base = f"{PREFIX}/{net}/sim"
        self.nonce = secrets.token_hex(8)
        self.dropped: Counter[str] = Counter()
        self.results: dict[tuple[str, int], ScheduleRun] = {}
        self.others: dict[int, str] = {}  # shard index -> run id, of shards of another run
        self._parts: dict[tuple[str, int], _Parts] = {}
        self._seen: set[str] = set()  # retained results topics, for shard 0 to clear
        self._greeted = asyncio.Event()
        self._led = asyncio.Event()  # shard 0's hello seen: its nonce is the run's
        self.lead_nonce = self.nonce if shard.index == 0 else ""
        self._changed = asyncio.Event()
        self._conflict: str | None = None

    @property
    def hello_topic(self) -> str:
        return f"{self.base}/shards/{self.shard.index}"

    async def open(self) -> None:
        """Connect, say hello, and read what the broker retained; ShardError if another run
        (or this very shard) is already running on the broker."""
        await self.transport.connect(will=Message(self.hello_topic, b"", retain=True))
        await self.transport.subscribe(f"{self.base}/shards/+")
        await self.transport.subscribe(f"{self.base}/{self.run}/#")
        hello = {"run": self.run, "shards": self.shard.count, "nonce": self.nonce}
        await self.transport.publish(self.hello_topic, json.dumps(hello).encode(), retain=True)

    async def read(self) -> None:
        """Take messages until the transport closes (a task of the shard run)."""
        async for message in self.transport.messages():
            if message.payload:  # empty: a retained message being cleared
                self._take(message)
            self._changed.set()

    async def greeted(self) -> None:
        """Wait until our own hello came back: the broker's retained messages came before it."""
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                await self._greeted.wait()
        except TimeoutError:
            raise ShardError(f"shard {self.shard}: the broker did not answer") from None
        if self._conflict is not None:
            raise ShardError(self._conflict)

    async def led(self) -> str:
        """Shard 0's nonce, once its hello is here (it may start after this shard)."""
        if not self._led.is_set():
            log.warning(
                "shard %s: waiting for shard 0/%d on the broker", self.shard, self.shard.count
            )
        await self._led.wait()
        return self.lead_nonce

    async def clear_presence(self, net: str, ids: list[str]) -> None:
        """Clear what the nodes of a finished schedule's network left retained."""
        await self._clear({topics.presence(net, node_id) for node_id in ids})

    async def clear_stale(self) -> None:
        """Clear results of this run that a crashed earlier run left retained (shard 0, before
        any node starts: no shard can have finished a schedule of this run yet)."""
        await self._clear(self._seen)
        self._seen.clear()
        self.results.clear()
        self._parts.clear()

    async def publish(self, run: ScheduleRun) -> None:
        """Publish this shard's results of one schedule, retained, in parts."""
        body = {"records": run.records, "wall_seconds": run.wall_seconds, "dropped": run.dropped}
        blob = zlib.compress(json.dumps(body, separators=(",", ":")).encode())
        digest = hashlib.sha256(blob).hexdigest()
        parts = [blob[k : k + PART_BYTES] for k in range(0, len(blob), PART_BYTES)] or [b""]
        for k, data in enumerate(parts):
            header = {"run": self.run, "schedule": run.schedule, "shard": self.shard.index,
                      "part": k, "parts": len(parts), "sha256": digest, "data": data}  # fmt: skip
            topic = f"{self.base}/{self.run}/{run.schedule}/{self.shard.index}/{k}"
            await self.transport.publish(topic, msgpack.packb(header), retain=True)
        await self._flush()

    async def gather(self, schedule: str, patience: float) -> list[ScheduleRun]:
        """Every shard's results of `schedule`, by shard index; ShardError naming the shards
        still missing after `patience` seconds."""
        wanted = [(schedule, i) for i in range(self.shard.count)]
        try:
            async with asyncio.timeout(patience):
                while not all(key in self.results for key in wanted):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            missing = [f"{i}/{self.shard.count}" for s, i in wanted if (s, i) not in self.results]
            raise ShardError(self._missing(schedule, missing, patience)) from None
        return [self.results[key] for key in wanted]

    async def close(self, *, clear: bool) -> None:
        """Take back our hello; with `clear` (shard 0, at the end), every result too."""
        await self._clear({self.hello_topic} | (self._seen if clear else set()))
        await self.transport.close()

    async def _clear(self, retained: set[str]) -> None:
        for topic in sorted(retained):
            await self.transport.publish(topic, b"", retain=True)
        await self._flush()

    async def _flush(self) -> None:
        """Wait until the broker took what we published (it may be down: not forever)."""
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self.transport.flush()
        except TimeoutError:
            raise ShardError(f"shard {self.shard}: the broker did not take our messages") from None

    def _missing(self, schedule: str, missing: list[str], timeout: float) -> str:
        text = (
            f"shard {self.shard}: no results of {schedule} from shard(s) {', '.join(missing)} "
            f"after {timeout:g} s; start every shard with the same scenario, seed and flags"
        )
        if self.others:
            seen = ", ".join(f"{i} (run {r})" for i, r in sorted(self.others.items()))
            text += f" (shards of another run on this broker: {seen}; this run is {self.run})"
        return text

    def _take(self, message: Message) -> None:
        levels = message.topic[len(self.base) + 1 :].split("/")
        if levels[0] == "shards":
            self._hello(levels, bytes(message.payload))
        else:
            self._part(levels, bytes(message.payload), message.topic)

    def _hello(self, levels: list[str], payload: bytes) -> None:
        try:
            hello = json.loads(payload)
            index, run, nonce = int(levels[1]), str(hello["run"]), str(hello["nonce"])
        except (ValueError, KeyError, TypeError, IndexError):
            self.dropped["malformed hello"] += 1
            return
        if nonce == self.nonce:
            self._greeted.set()
            if self.shard.index == 0:
                self._led.set()
        elif run != self.run:
            self.others[index] = run
            if not self._greeted.is_set():
                self._conflict = (
                    f"shard {index} of another run is on this broker (run {run}; this one "
                    f"{self.run}): start every shard with the same scenario, seed and flags"
                )
            else:
                log.warning("shard %s of another run (%s) joined the broker", index, run)
        elif index == self.shard.index and not self._greeted.is_set():
            self._conflict = f"shard {self.shard} of this run is already running on this broker"
        elif index == 0:
            self.lead_nonce = nonce
            self._led.set()

    def _part(self, levels: list[str], payload: bytes, topic: str) -> None:
        try:
            header = msgpack.unpackb(payload, max_str_len=1024, max_bin_len=2 * PART_BYTES,
                                     max_array_len=0, max_map_len=16)  # fmt: skip
            run, schedule = str(header["run"]), str(header["schedule"])
            index, k, count = int(header["shard"]), int(header["part"]), int(header["parts"])
            data, digest = header["data"], str(header["sha256"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            self.dropped["malformed results"] += 1
            return
        if run != self.run:
            self.dropped["results of another run"] += 1
            return
        if levels[1:] != [schedule, str(index), str(k)] or not isinstance(data, bytes):
            self.dropped["malformed results"] += 1  # the header disagrees with its topic
            return
        if not (0 <= index < self.shard.count and 0 <= k < count):
            self.dropped["malformed results"] += 1
            return
        if count * PART_BYTES > MAX_RESULTS_BYTES:
            self.dropped["results too large"] += 1
            return
        self._seen.add(topic)
        parts = self._parts.get((schedule, index))
        if parts is None or (parts.count, parts.sha256) != (count, digest):
            parts = self._parts[(schedule, index)] = _Parts(count, digest)
        parts.data[k] = data
        if len(parts.data) == count:
            self._complete(schedule, index, parts)

    def _complete(self, schedule: str, index: int, parts: _Parts) -> None:
        blob = b"".join(parts.data[k] for k in range(parts.count))
        if hashlib.sha256(blob).hexdigest() != parts.sha256:
            self.dropped["results digest mismatch"] += 1
            return
        try:
            owned = Shard(index, self.shard.count).indices(len(self.node_ids))
            nodes = {self.node_ids[i] for i in owned}
            inflater = zlib.decompressobj()
            text = inflater.decompress(blob, MAX_RESULTS_BYTES)
            if inflater.unconsumed_tail:
                self.dropped["results too large"] += 1
                return
            body = json.loads(text)
            run = ScheduleRun(
                schedule,
                records=[_check_record(r, schedule, nodes) for r in body["records"]],
                wall_seconds=float(body["wall_seconds"]),
                dropped={str(k): int(v) for k, v in body["dropped"].items()},
            )
        except (zlib.error, ValueError, KeyError, TypeError, AttributeError):
            self.dropped["malformed results"] += 1
            return
        self.results[(schedule, index)] = run


def _check_record(record: Any, schedule: str, nodes: set[str]) -> Record:
    """A record of `schedule` by one of `nodes`, holding only JSON scalars; else ValueError."""
    if not isinstance(record, dict) or record.get("schedule") != schedule:
        raise ValueError("not a record of this schedule")
    if record.get("node") not in nodes or not isinstance(record.get("round"), int):
        raise ValueError("a record of another shard's node, or without a round")
    if not all(v is None or isinstance(v, str | int | float) for v in record.values()):
        raise ValueError("a record holds only numbers, strings, booleans and nulls")
    return record
