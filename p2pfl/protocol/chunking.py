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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pfl.protocol.envelope import BytesLike, Envelope, Signer, is_int, pack_envelope
from p2pfl.protocol.errors import ProtocolError

DEFAULT_MAX_CHUNK = 2**20
DIGEST_SIZE = 16
MAX_TRANSFER_ID = 64
_FIELDS = frozenset({"id", "index", "count", "total", "digest", "data"})
_REMEMBERED_DONE = 1024  # finished transfer ids kept (all senders), so late chunks are ignored


def split(
    payload: BytesLike,
    *,
    max_chunk: int,
    transfer_id: bytes | str,
    net: str,
    src: str,
    seq: int = 0,
    ts: float | None = None,
    signer: Signer | None = None,
) -> list[BytesLike]:
    """Cut ``payload`` into chunk messages of at most ``max_chunk`` bytes each, envelope included
    (each chunk signed by ``signer`` when given: a receiver checks it before reassembling).

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
        env = Envelope.create("chunk", body, net=net, src=src, seq=seq, ts=stamp)
        return pack_envelope(env, signer)

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
    count: int
    total: int
    digest: bytes
    chunks: dict[int, bytes]  # index -> slice; grows with what arrived, never with `count`
    held: int  # bytes charged for this transfer (see Reassembler.cost)
    last_seen: float


@dataclass
class _Sender:
    transfers: int = 0
    held: int = 0  # bytes charged for all its pending transfers


class Reassembler:
    """Rebuilds chunked payloads per sender, within a memory budget and a timeout.

    Nothing is allocated for what a chunk header merely claims: a transfer holds the slices
    that actually arrived, and every one is charged against the budgets with its bookkeeping
    (``CHUNK_OVERHEAD`` per slice, ``TRANSFER_OVERHEAD`` per transfer) before it is stored. So a
    forged header claiming a huge ``total`` or ``count`` pins only the bytes that were sent.
    A transfer is refused outright when its ``total`` exceeds ``max_message_size`` or when,
    complete, it could not fit a sender's budget; a slice that would overflow the budget of its
    sender (``max_pending_bytes_per_sender``) or of all senders together (``max_pending_bytes``;
    sender ids are not authenticated) drops its whole transfer. A sender may have at most
    ``max_transfers_per_sender`` transfers pending. A transfer idle for ``timeout`` seconds is
    dropped by ``expire()``, which the owner runs on a timer; ``on_expire(src)`` is told of each.
    """

    CHUNK_OVERHEAD = 128
    """Bytes charged per stored slice beyond its data: the bytes object and its dict entry."""
    TRANSFER_OVERHEAD = 1024
    """Bytes charged per pending transfer: its record and its places in the indexes."""

    def __init__(
        self,
        max_pending_bytes_per_sender: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_transfers_per_sender: int = 8,
        max_pending_bytes: int | None = None,
        max_message_size: int | None = None,
        on_expire: Callable[[str], object] | None = None,
    ) -> None:
        self.max_pending_bytes_per_sender = max_pending_bytes_per_sender
        self.max_pending_bytes = (
            4 * max_pending_bytes_per_sender if max_pending_bytes is None else max_pending_bytes
        )
        self.max_message_size = (
            max_pending_bytes_per_sender if max_message_size is None else max_message_size
        )
        self.timeout = timeout
        self.max_transfers_per_sender = max_transfers_per_sender
        self._clock = clock
        self._on_expire = on_expire
        # Least recently active first, so expiry looks only at the transfers it drops.
        self._pending: OrderedDict[tuple[str, bytes | str], _Transfer] = OrderedDict()
        self._senders: dict[str, _Sender] = {}
        self._held = 0
        # Completed or abandoned transfers: their late chunks are ignored. Bounded for all
        # senders together, since sender ids cost an attacker nothing.
        self._finished: OrderedDict[tuple[str, bytes | str], None] = OrderedDict()

    @classmethod
    def cost(cls, total: int, count: int) -> int:
        """Bytes charged for a complete transfer of ``total`` bytes in ``count`` chunks."""
        return cls.TRANSFER_OVERHEAD + total + count * cls.CHUNK_OVERHEAD

    def feed(self, src: str, envelope: Envelope) -> bytearray | None:
        """Take one chunk from ``src``; return the whole payload once complete and verified.

        Duplicate chunks are ignored. Raises ProtocolError for a malformed or inconsistent
        chunk, a transfer over the size limit or the budgets, or a digest mismatch (the
        transfer is then dropped).
        """
        if envelope.kind != "chunk":
            raise ProtocolError(f"expected a chunk message, got {envelope.kind!r}")
        tid, index, count, total, digest, data = _read_chunk(envelope)
        if total > self.max_message_size:
            raise ProtocolError(
                f"chunked transfer of {total} bytes exceeds the limit of "
                f"{self.max_message_size} bytes"
            )
        # Every slice but the last has ceil(total / count) bytes, the last at least one; the
        # slice at hand must have exactly its share, so count is tied to what was sent.
        size = math.ceil(total / count) if count else 0
        if not (1 <= count <= total and (count - 1) * size < total):
            raise ProtocolError(f"inconsistent chunking: {count} chunks for {total} bytes")
        if not index < count:
            raise ProtocolError(f"chunk index {index} out of range for {count} chunks")
        length = min(size, total - index * size)
        if len(data) != length:
            raise ProtocolError(f"chunk {index} has {len(data)} bytes, expected {length}")
        key = (src, tid)
        if key in self._finished:
            return None
        transfer = self._pending.get(key)
        if transfer is None:
            transfer = self._admit(src, tid, count, total, digest)
        elif (count, total, digest) != (transfer.count, transfer.total, transfer.digest):
            raise ProtocolError(
                f"chunk {index} of transfer {tid!r:.40} disagrees with earlier ones"
            )
        if index in transfer.chunks:
            return None  # a duplicate: no progress, so it does not keep the transfer alive
        transfer.last_seen = self._clock()
        self._pending.move_to_end(key)
        self._charge(src, tid, transfer, len(data) + self.CHUNK_OVERHEAD)
        transfer.chunks[index] = data
        if len(transfer.chunks) < count:
            return None
        self._drop(src, tid, finished=True)
        return _join(transfer, tid)

    def expire(self) -> int:
        """Drop transfers idle for longer than ``timeout``; return how many were dropped."""
        deadline = self._clock() - self.timeout
        dropped = 0
        while self._pending:
            key, transfer = next(iter(self._pending.items()))
            if transfer.last_seen >= deadline:
                break
            self._drop(*key, finished=True)  # its late chunks could never complete it
            dropped += 1
            if self._on_expire is not None:
                self._on_expire(key[0])
        return dropped

    def forget(self, src: str) -> int:
        """Drop everything pending from ``src`` (a peer that left); return transfers dropped."""
        keys = [key for key in self._pending if key[0] == src]
        for key in keys:
            self._drop(*key)
        for key in [key for key in self._finished if key[0] == src]:
            del self._finished[key]
        return len(keys)

    def pending_bytes(self, src: str) -> int:
        """Bytes charged for ``src``'s incomplete transfers."""
        sender = self._senders.get(src)
        return 0 if sender is None else sender.held

    def total_pending_bytes(self) -> int:
        """Bytes charged for every sender's incomplete transfers."""
        return self._held

    def pending_transfers(self) -> int:
        """Incomplete transfers of every sender."""
        return len(self._pending)

    def _admit(
        self, src: str, tid: bytes | str, count: int, total: int, digest: bytes
    ) -> _Transfer:
        self.expire()
        need = self.cost(total, count)
        budget = min(self.max_pending_bytes_per_sender, self.max_pending_bytes)
        sender = self._senders.get(src)
        if need > budget:
            self._remember(src, tid)  # one refusal per transfer, not one per chunk
            raise ProtocolError(
                f"chunked transfer of {total} bytes in {count} chunks refused: it would need "
                f"{need} bytes, over the budget of {budget}"
            )
        if sender is not None and sender.transfers >= self.max_transfers_per_sender:
            self._remember(src, tid)
            raise ProtocolError(f"too many concurrent chunked transfers ({sender.transfers})")
        transfer = _Transfer(count, total, digest, {}, 0, self._clock())
        self._pending[(src, tid)] = transfer
        sender = self._senders.setdefault(src, _Sender())
        sender.transfers += 1
        self._charge(src, tid, transfer, self.TRANSFER_OVERHEAD)
        return transfer

    def _charge(self, src: str, tid: bytes | str, transfer: _Transfer, amount: int) -> None:
        """Count ``amount`` more bytes for ``transfer``, or drop it if a budget would overflow."""
        sender = self._senders[src]
        held, budget = sender.held, self.max_pending_bytes_per_sender
        everyone, limit = self._held, self.max_pending_bytes
        if held + amount > budget or everyone + amount > limit:
            self._drop(src, tid, finished=True)
            holder = "the peer already holds" if held + amount > budget else "all peers hold"
            used, cap = (held, budget) if held + amount > budget else (everyone, limit)
            raise ProtocolError(
                f"chunked transfer {tid!r:.40} dropped: {holder} {used} of {cap} bytes"
            )
        transfer.held += amount
        sender.held += amount
        self._held += amount

    def _drop(self, src: str, tid: bytes | str, *, finished: bool = False) -> None:
        """Free a pending transfer; a ``finished`` one has its late chunks ignored."""
        transfer = self._pending.pop((src, tid))
        sender = self._senders[src]
        sender.transfers -= 1
        sender.held -= transfer.held
        self._held -= transfer.held
        if not sender.transfers:
            del self._senders[src]
        if finished:
            self._remember(src, tid)

    def _remember(self, src: str, tid: bytes | str) -> None:
        self._finished[(src, tid)] = None
        self._finished.move_to_end((src, tid))
        while len(self._finished) > _REMEMBERED_DONE:
            self._finished.popitem(last=False)


def _join(transfer: _Transfer, tid: bytes | str) -> bytearray:
    """The payload in order, checked against its digest; each slice is freed once copied."""
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    payload = bytearray()
    for index in range(transfer.count):
        part = transfer.chunks.pop(index)
        hasher.update(part)
        payload += part
    if hasher.digest() != transfer.digest:
        raise ProtocolError(f"digest mismatch in transfer {tid!r:.40}: payload corrupted")
    return payload


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
