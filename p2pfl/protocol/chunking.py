"""Chunking: a message larger than ``max_chunk`` travels as several ``chunk`` envelopes.

Chunk body: ``{id, index, count, total, digest, data}``. The payload (a packed envelope) is cut
into ``count`` slices of equal size ``ceil(total / count)`` (the last one shorter), so the
receiver can place every slice without knowing the others. ``digest`` is BLAKE2b-128 of the whole
payload. Reasons (DESIGN.md): brokers cap packet sizes, one huge publish stalls broker and event
loop, and small chunks interleave with control traffic.
"""

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pfl.protocol.envelope import BytesLike, Envelope, is_int, pack_envelope
from p2pfl.protocol.errors import ProtocolError

DEFAULT_MAX_CHUNK = 2**20
DIGEST_SIZE = 16
MAX_TRANSFER_ID = 64
_FIELDS = frozenset({"id", "index", "count", "total", "digest", "data"})
_REMEMBERED_DONE = 32  # completed transfer ids kept per sender, so late duplicates are ignored


def split(
    payload: BytesLike,
    *,
    max_chunk: int,
    transfer_id: bytes | str,
    net: str,
    src: str,
    seq: int = 0,
    ts: float | None = None,
) -> list[BytesLike]:
    """Cut ``payload`` into chunk messages of at most ``max_chunk`` bytes each, envelope included.

    A payload that already fits is returned alone and unchanged (not wrapped), so the receiver
    handles it as the message it is. All chunks share ``seq`` and ``ts``.
    """
    if not _valid_id(transfer_id):
        raise ValueError(f"transfer id must be 1-{MAX_TRANSFER_ID} bytes or characters")
    view = memoryview(payload).cast("B")
    total = view.nbytes
    if total <= max_chunk:
        return [payload]
    stamp = time.time() if ts is None else ts
    digest = hashlib.blake2b(view, digest_size=DIGEST_SIZE).digest()

    def chunk(index: int, count: int, data: BytesLike) -> bytearray:
        body: dict[str, Any] = {"id": transfer_id, "index": index, "count": count, "total": total}
        body |= {"digest": digest, "data": data}
        return pack_envelope(Envelope.create("chunk", body, net=net, src=src, seq=seq, ts=stamp))

    # Upper bound of the envelope around a slice: integers at their widest for this transfer
    # (index, count <= total), and a 5-byte bin32 header instead of the 2 bytes of b"".
    overhead = len(chunk(total, total, b"")) - 2 + 5
    room = max_chunk - overhead
    if room < 1:
        raise ValueError(f"max_chunk of {max_chunk} bytes leaves no room after {overhead} bytes")
    count = math.ceil(total / room)
    size = math.ceil(total / count)
    return [chunk(i, count, view[i * size : (i + 1) * size]) for i in range(count)]


@dataclass
class _Transfer:
    buffer: bytearray
    received: bytearray  # one flag per chunk
    missing: int
    count: int
    total: int
    size: int
    digest: bytes
    last_seen: float


class Reassembler:
    """Rebuilds chunked payloads per sender, within a memory budget and a timeout.

    Each transfer gets one buffer of its announced ``total`` bytes, allocated on its first chunk.
    A sender's pending transfers may hold at most ``max_pending_bytes_per_sender`` bytes and
    ``max_transfers_per_sender`` transfers, and all senders together ``max_pending_bytes``
    (sender ids are not authenticated, so a per-sender budget alone does not bound memory); a
    transfer idle (no new chunk) for ``timeout`` seconds is dropped by ``expire()``, which
    ``feed`` also runs before admitting a new transfer.
    """

    def __init__(
        self,
        max_pending_bytes_per_sender: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_transfers_per_sender: int = 8,
        max_pending_bytes: int | None = None,
    ) -> None:
        self.max_pending_bytes_per_sender = max_pending_bytes_per_sender
        self.max_pending_bytes = (
            4 * max_pending_bytes_per_sender if max_pending_bytes is None else max_pending_bytes
        )
        self.timeout = timeout
        self.max_transfers_per_sender = max_transfers_per_sender
        self._clock = clock
        self._pending: dict[str, dict[bytes | str, _Transfer]] = {}
        self._done: dict[str, deque[bytes | str]] = {}

    def feed(self, src: str, envelope: Envelope) -> bytearray | None:
        """Take one chunk from ``src``; return the whole payload once complete and verified.

        Duplicate chunks are ignored. Raises ProtocolError for a malformed or inconsistent
        chunk, a transfer over budget, or a digest mismatch (the transfer is then dropped).
        """
        if envelope.kind != "chunk":
            raise ProtocolError(f"expected a chunk message, got {envelope.kind!r}")
        tid, index, count, total, digest, data = _read_chunk(envelope)
        size = math.ceil(total / count) if count else 0
        if not (1 <= count <= total and (count - 1) * size < total):
            raise ProtocolError(f"inconsistent chunking: {count} chunks for {total} bytes")
        if not index < count:
            raise ProtocolError(f"chunk index {index} out of range for {count} chunks")
        start = index * size
        length = min(size, total - start)
        if len(data) != length:
            raise ProtocolError(f"chunk {index} has {len(data)} bytes, expected {length}")
        if tid in self._done.get(src, ()):
            return None
        transfer = self._pending.get(src, {}).get(tid)
        if transfer is None:
            transfer = self._admit(src, count, total, digest)
            self._pending.setdefault(src, {})[tid] = transfer
        elif (count, total, digest) != (transfer.count, transfer.total, transfer.digest):
            raise ProtocolError(
                f"chunk {index} of transfer {tid!r:.40} disagrees with earlier ones"
            )
        transfer.last_seen = self._clock()
        if transfer.received[index]:
            return None
        transfer.buffer[start : start + length] = data
        transfer.received[index] = 1
        transfer.missing -= 1
        if transfer.missing:
            return None
        self._drop(src, tid)
        self._done.setdefault(src, deque(maxlen=_REMEMBERED_DONE)).append(tid)
        if hashlib.blake2b(transfer.buffer, digest_size=DIGEST_SIZE).digest() != digest:
            raise ProtocolError(f"digest mismatch in transfer {tid!r:.40}: payload corrupted")
        return transfer.buffer

    def expire(self) -> int:
        """Drop transfers idle for longer than ``timeout``; return how many were dropped."""
        now = self._clock()
        dropped = 0
        for src, transfers in list(self._pending.items()):
            for tid, transfer in list(transfers.items()):
                if now - transfer.last_seen > self.timeout:
                    self._drop(src, tid)
                    dropped += 1
        return dropped

    def forget(self, src: str) -> int:
        """Drop everything pending from ``src`` (a peer that left); return transfers dropped."""
        self._done.pop(src, None)
        return len(self._pending.pop(src, {}))

    def pending_bytes(self, src: str) -> int:
        """Bytes held for ``src``'s incomplete transfers."""
        return sum(t.total for t in self._pending.get(src, {}).values())

    def total_pending_bytes(self) -> int:
        """Bytes held for every sender's incomplete transfers."""
        return sum(self.pending_bytes(src) for src in self._pending)

    def _drop(self, src: str, tid: bytes | str) -> None:
        transfers = self._pending[src]
        del transfers[tid]
        if not transfers:
            del self._pending[src]

    def _admit(self, src: str, count: int, total: int, digest: bytes) -> _Transfer:
        self.expire()
        transfers = self._pending.get(src, {})
        budget = self.max_pending_bytes_per_sender
        held = self.pending_bytes(src)
        if held + total > budget:
            raise ProtocolError(
                f"transfer of {total} bytes refused: sender already holds {held} of {budget} bytes"
            )
        if len(transfers) >= self.max_transfers_per_sender:
            raise ProtocolError(f"too many concurrent transfers ({len(transfers)}) from sender")
        everyone, limit = self.total_pending_bytes(), self.max_pending_bytes
        if everyone + total > limit:
            raise ProtocolError(
                f"transfer of {total} bytes refused: all senders already hold {everyone} of "
                f"{limit} bytes"
            )
        size = math.ceil(total / count)
        now = self._clock()
        return _Transfer(bytearray(total), bytearray(count), count, count, total, size, digest, now)


def _read_chunk(env: Envelope) -> tuple[bytes | str, int, int, int, bytes, bytes]:
    body = env.body
    if set(body) != _FIELDS:
        raise ProtocolError(f"chunk fields wrong: {sorted(body)[:8]}")
    tid, index, count, total = body["id"], body["index"], body["count"], body["total"]
    digest, data = body["digest"], body["data"]
    if not _valid_id(tid):
        raise ProtocolError(f"transfer id must be 1-{MAX_TRANSFER_ID} bytes or characters")
    if not all(is_int(value) and value >= 0 for value in (index, count, total)):
        raise ProtocolError("chunk index, count and total must be non-negative integers")
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ProtocolError(f"chunk digest must be {DIGEST_SIZE} bytes")
    if not isinstance(data, bytes):
        raise ProtocolError("chunk data must be binary")
    return tid, index, count, total, digest, data


def _valid_id(tid: object) -> bool:
    return isinstance(tid, bytes | str) and 0 < len(tid) <= MAX_TRANSFER_ID
