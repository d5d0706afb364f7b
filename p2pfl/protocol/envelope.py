"""The envelope every p2pfl v1 message travels in: a msgpack map ``{v, kind, net, src, seq, ts,
pk, sig, body}``, in that order on the wire.

Decoding is defensive: the size is checked before parsing, msgpack runs with explicit limits,
and every field is type-checked; whatever goes wrong surfaces as one ``ProtocolError``.

Signing (DESIGN.md, Trust): ``sig`` is an Ed25519 signature by the key ``pk`` (32 raw bytes)
over the SHA-256 of the envelope packed *without* its ``sig`` entry, prefixed by a domain tag.
Because ``body`` comes last, a receiver reads and checks the few header fields (:func:`peek`)
and the signature before it allocates or decodes anything of the body; the digest is computed
over slices of the message as received, without a copy. Unsigned messages carry ``pk`` and
``sig`` as nil.
"""

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import validate_name

PROTOCOL_VERSION = 1
# "will": the offline presence record a broker publishes when a node dies (signed at connect).
# "secagg": secure aggregation's seed requests and reveals (p2pfl.protocol.reveal).
# "shuffle": peer sampling's exchange of view entries (p2pfl.discovery.shuffle).
KINDS = frozenset(
    {
        "model",
        "chunk",
        "presence",
        "bye",
        "will",
        "telemetry",
        "log",
        "control",
        "secagg",
        "shuffle",
    }
)
FIELDS = ("v", "kind", "net", "src", "seq", "ts", "pk", "sig", "body")
SIG_DOMAIN = b"p2pfl/v1/envelope\x00"
KEY_SIZE = 32
SIG_SIZE = 64
HEADER_MAX = 4096
"""Every field before the body fits in this many bytes (names are at most 128 characters)."""
PEEKS_REMEMBERED = 4096
"""Headers of small messages remembered per process (with the messages: at most 16 MiB, a few
MiB of presence records): see :func:`peek`."""

DEFAULT_MAX_MESSAGE = 256 * 2**20
"""Largest message (after reassembly of chunks) a node parses by default."""

# msgpack preallocates containers from their declared length, so these bound the work a tiny
# hostile message can cause; they are far above what any p2pfl message needs.
MAX_STR_LEN = 2**20
MAX_ARRAY_LEN = 2**14
MAX_MAP_LEN = 2**14
MAX_SIG_LEN = 1024

BytesLike = bytes | bytearray | memoryview

# Binary values at least this large are copied once, straight into the output buffer, instead of
# through msgpack's buffer, which doubles as it grows and is copied again into a bytes object.
_SPLICE_MIN = 4096


class Signer(Protocol):
    """Signs envelopes: its raw public key, and a signature of a digest."""

    @property
    def public_raw(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Envelope:
    """One decoded message; ``sig`` is carried but not verified here (see :func:`peek`)."""

    v: int
    kind: str
    net: str
    src: str
    seq: int
    ts: float
    body: dict[str, Any]
    sig: bytes | None = None
    pk: bytes | None = None

    @classmethod
    def create(
        cls,
        kind: str,
        body: dict[str, Any],
        *,
        net: str,
        src: str,
        seq: int,
        ts: float | None = None,
    ) -> "Envelope":
        """An envelope of the current protocol version, stamped with the wall clock by default."""
        return cls(PROTOCOL_VERSION, kind, net, src, seq, time.time() if ts is None else ts, body)


def pack_envelope(env: Envelope, signer: Signer | None = None) -> bytearray:
    """Serialise ``env``, signed by ``signer`` when given; large binary values in the body
    (memoryviews of tensors) are copied once.

    Returns a bytearray (bytes-like, accepted wherever bytes are) to avoid a final full copy.
    """
    if env.kind not in KINDS:
        raise ValueError(f"unknown message kind {env.kind!r}")
    validate_name(env.net, "network name")
    validate_name(env.src, "node id")
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    pk = signer.public_raw if signer is not None else None
    head: list[bytes | memoryview] = []
    for name in FIELDS[:7]:  # v .. pk
        head.append(packer.pack(name))
        head.append(packer.pack(pk if name == "pk" else getattr(env, name)))
    tail: list[bytes | memoryview] = [packer.pack("body")]
    _flatten(env.body, packer, tail)
    sig = None
    if signer is not None:
        sig = signer.sign(SIG_DOMAIN + _digest([b"\x88", *head, *tail]))
    parts = [b"\x89", *head, packer.pack("sig"), packer.pack(sig), *tail]
    out = bytearray(sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts))
    with memoryview(out) as view:
        pos = 0
        for part in parts:
            size = len(part) if isinstance(part, bytes) else part.nbytes
            view[pos : pos + size] = part
            pos += size
    return out


def unpack_envelope(
    data: BytesLike, *, max_size: int = DEFAULT_MAX_MESSAGE, max_container_len: int = MAX_ARRAY_LEN
) -> Envelope:
    """Parse and type-check one message; raise ProtocolError on anything unexpected.

    ``max_container_len`` caps every array and map. msgpack preallocates a container from its
    declared length, so a few kB of nested headers claiming 2**14 items each costs ~100 ms of
    CPU before the truncation is noticed; callers that know their messages pass a tight cap.
    """
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_size} bytes")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=min(max_size, MAX_STR_LEN),
            max_array_len=min(max_size, MAX_ARRAY_LEN, max_container_len),
            max_map_len=min(max_size, MAX_MAP_LEN, max_container_len),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, UnicodeError...)
        raise ProtocolError(f"not a valid msgpack message: {str(exc)[:200]}") from None
    return _check_envelope(obj)


def _check_envelope(obj: object) -> Envelope:
    if not isinstance(obj, dict):
        raise ProtocolError(f"envelope must be a map, got {type(obj).__name__}")
    if set(obj) != set(FIELDS):
        missing = sorted(set(FIELDS) - set(obj))
        extra = sorted(map(str, set(obj) - set(FIELDS)))[:5]
        raise ProtocolError(f"envelope fields wrong: missing {missing}, unexpected {extra}")
    v, kind, net, src, seq, ts, pk, sig, body = (obj[name] for name in FIELDS)
    if not is_int(v) or v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v!r:.40}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r:.40}")
    try:
        validate_name(net, "network name")
        validate_name(src, "sender id")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if not is_int(seq) or not 0 <= seq < 2**64:
        raise ProtocolError(f"sequence number must be an unsigned integer, got {seq!r:.40}")
    if not is_number(ts) or not math.isfinite(ts):
        raise ProtocolError(f"timestamp must be a finite number, got {ts!r:.40}")
    if not isinstance(body, dict) or not all(isinstance(key, str) for key in body):
        raise ProtocolError("body must be a map with string keys")
    if sig is not None and (not isinstance(sig, bytes) or len(sig) > MAX_SIG_LEN):
        raise ProtocolError("signature must be absent or at most 1024 bytes")
    if pk is not None and (not isinstance(pk, bytes) or len(pk) != KEY_SIZE):
        raise ProtocolError(f"public key must be absent or {KEY_SIZE} bytes")
    return Envelope(v, kind, net, src, seq, float(ts), body, sig, pk)


@dataclass(frozen=True)
class Header:
    """The fields of a message before its body, read without touching the body."""

    kind: str
    net: str
    src: str
    seq: int
    ts: float
    pk: bytes | None
    sig: bytes | None
    digest: Callable[[], bytes]
    """SHA-256 of what the signature covers (computed on demand: it reads the whole message)."""


def peek(data: BytesLike) -> Header:
    """Read and type-check the header fields of a message (the first few hundred bytes) without
    parsing its body; ProtocolError when they are not a well-formed v1 header in wire order.

    The headers of the last :data:`PEEKS_REMEMBERED` small messages (`bytes` of at most
    :data:`HEADER_MAX`: presence records, shuffles) are remembered, their digests too: the
    same record is read by every node that hears it where nodes share a process (the
    simulator), and again each time a shuffle passes it on."""
    if isinstance(data, bytes) and len(data) <= HEADER_MAX:
        return _peek_small(data)
    return _peek(data)


@functools.lru_cache(maxsize=PEEKS_REMEMBERED)
def _peek_small(data: bytes) -> Header:
    header = _peek(data)
    return dataclasses.replace(header, digest=functools.cache(header.digest))


def _peek(data: BytesLike) -> Header:
    view = memoryview(data).cast("B")
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_bin_len=MAX_SIG_LEN, max_str_len=256,
        max_array_len=0, max_map_len=0, max_ext_len=0,
    )  # fmt: skip
    unpacker.feed(view[:HEADER_MAX].tobytes())
    values: dict[str, Any] = {}
    try:
        if unpacker.read_map_header() != len(FIELDS):
            raise ProtocolError(f"envelope must be a map of {len(FIELDS)} fields")
        for name in FIELDS:
            offset = unpacker.tell()
            if unpacker.unpack() != name:
                raise ProtocolError(f"envelope fields out of order: expected {name!r}")
            if name == "body":
                body_at = offset
                break
            if name == "sig":
                sig_at = offset
            values[name] = unpacker.unpack()
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack: OutOfData (header too long), limits, bad bytes
        raise ProtocolError(f"not a valid msgpack message header: {str(exc)[:120]}") from None
    env = _check_envelope({**values, "body": {}})

    def digest() -> bytes:
        return _digest([b"\x88", view[1:sig_at], view[body_at:]])

    return Header(env.kind, env.net, env.src, env.seq, env.ts, env.pk, env.sig, digest)


def _digest(parts: list[bytes | memoryview]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def is_int(value: object) -> bool:
    """True for a msgpack integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """True for a msgpack integer or float (bool is not one)."""
    return isinstance(value, float) or is_int(value)


def _flatten(obj: object, packer: msgpack.Packer, parts: list[bytes | memoryview]) -> None:
    """Append the msgpack encoding of ``obj`` to ``parts``, leaving large blobs as views."""
    if isinstance(obj, dict):
        parts.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            parts.append(packer.pack(key))
            _flatten(value, packer, parts)
    elif isinstance(obj, list | tuple):
        parts.append(packer.pack_array_header(len(obj)))
        for item in obj:
            _flatten(item, packer, parts)
    elif isinstance(obj, bytes | bytearray | memoryview):
        view = memoryview(obj)
        if view.nbytes >= _SPLICE_MIN:
            parts.append(_bin_header(view.nbytes))
            parts.append(view.cast("B"))
        else:
            parts.append(packer.pack(view.tobytes()))
    else:
        parts.append(packer.pack(obj))


def _bin_header(size: int) -> bytes:
    if size < 2**8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 2**16:
        return b"\xc5" + size.to_bytes(2, "big")
    if size < 2**32:
        return b"\xc6" + size.to_bytes(4, "big")
    raise ValueError(f"binary value of {size} bytes is too large for msgpack")
