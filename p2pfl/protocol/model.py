"""Model messages: a learner's weights with their round and age, in a ``model`` envelope.

Body: ``{round, age, codec, tensors, digest}`` (plus an optional ``meta`` map for the node's own
bookkeeping). ``digest`` is BLAKE2b-128 over, for each tensor in order, its msgpack-encoded header
``[name, dtype, shape, params]`` followed by its payload bytes, so corrupted metadata (an int8
scale, a shape) is caught as well as corrupted values.
"""

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from p2pfl.protocol.codec import Codec, TensorEntry, encode_tensor, parse_codec
from p2pfl.protocol.envelope import (
    DEFAULT_MAX_MESSAGE,
    MAX_ARRAY_LEN,
    BytesLike,
    Envelope,
    Signer,
    is_int,
    is_number,
    pack_envelope,
    unpack_envelope,
)
from p2pfl.protocol.errors import ProtocolError

DIGEST_SIZE = 16
MAX_MODEL_ELEMENTS = 2**28
"""Default bound on the total elements a received model may decode to, when no local model is
given to compare with."""

ExpectedSpec = Mapping[str, tuple[np.dtype[Any] | str, tuple[int, ...]]]
"""Local model layout: tensor name -> (dtype, shape)."""

_ORDER = ("round", "age", "codec", "tensors", "digest")
_REQUIRED = frozenset(_ORDER)
_OPTIONAL = frozenset({"meta"})
_MIN_CONTAINER_LEN = 64  # room for body fields, shapes, codec params and a small meta map


@dataclass
class ModelMessage:
    """A decoded model: raw tensors are read-only views into the received message."""

    round: int
    age: float
    weights: dict[str, np.ndarray]
    codec: str
    meta: dict[str, Any] = field(default_factory=dict)


def encode_model(
    weights: Mapping[str, np.ndarray],
    *,
    net: str,
    src: str,
    seq: int,
    round: int,
    age: float,
    codec: str | Codec = "raw",
    ts: float | None = None,
    meta: dict[str, Any] | None = None,
    signer: Signer | None = None,
) -> bytearray:
    """Encode ``weights`` as a ``model`` envelope (signed by ``signer`` when given); raw tensors
    are copied once, into the output.

    Raises ValueError for a bad codec spec, a negative round or age, an unsupported dtype or
    non-finite values (peers would refuse them).
    """
    parsed = parse_codec(codec) if isinstance(codec, str) else codec
    if not is_int(round) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    if not is_number(age) or not (math.isfinite(age) and age >= 0):
        raise ValueError(f"age must be a finite number >= 0, got {age!r}")
    entries = [encode_tensor(name, array, parsed) for name, array in weights.items()]
    body: dict[str, Any] = {
        "round": round,
        "age": float(age),
        "codec": parsed.spec,
        "tensors": [entry.to_wire() for entry in entries],
        "digest": model_digest(entries),
    }
    if meta:
        body["meta"] = meta
    env = Envelope.create("model", body, net=net, src=src, seq=seq, ts=ts)
    return pack_envelope(env, signer)


def decode_model(
    data: BytesLike,
    *,
    expected: ExpectedSpec | None = None,
    net: str | None = None,
    max_size: int = DEFAULT_MAX_MESSAGE,
    max_elements: int = MAX_MODEL_ELEMENTS,
) -> tuple[Envelope, ModelMessage]:
    """Parse and validate a model message; raise ProtocolError on anything unexpected.

    With ``expected`` the tensors must match the local model's names, dtypes and shapes exactly;
    with ``net`` the message must come from that network, and no array or map may be longer
    than the model's tensor list needs (see ``unpack_envelope``).
    """
    env = unpack_envelope(data, max_size=max_size, max_container_len=container_limit(expected))
    if net is not None and env.net != net:
        raise ProtocolError(f"message for network {env.net!r}, expected {net!r}")
    return env, model_from_envelope(env, expected=expected, max_elements=max_elements)


def container_limit(expected: ExpectedSpec | None) -> int:
    """The longest array or map a model message for this layout can hold (default: no layout)."""
    if not expected:
        return MAX_ARRAY_LEN
    return max(_MIN_CONTAINER_LEN, 2 * len(expected))


def model_from_envelope(
    env: Envelope, *, expected: ExpectedSpec | None = None, max_elements: int = MAX_MODEL_ELEMENTS
) -> ModelMessage:
    """Validate and decode the body of an already unpacked ``model`` envelope."""
    if env.kind != "model":
        raise ProtocolError(f"expected a model message, got {env.kind!r}")
    body = env.body
    keys = set(body)
    if not _REQUIRED <= keys <= _REQUIRED | _OPTIONAL:
        raise ProtocolError(
            f"model body fields wrong: missing {sorted(_REQUIRED - keys)}, "
            f"unexpected {sorted(keys - _REQUIRED - _OPTIONAL)[:5]}"
        )
    round_, age, codec, tensors, digest = (body[key] for key in _ORDER)
    meta = body.get("meta", {})
    if not is_int(round_) or not 0 <= round_ < 2**63:
        raise ProtocolError(f"round must be a non-negative integer, got {round_!r:.40}")
    if not is_number(age) or not (math.isfinite(age) and age >= 0):
        raise ProtocolError(f"age must be a finite number >= 0, got {age!r:.40}")
    if not isinstance(codec, str):
        raise ProtocolError("codec must be a string")
    try:
        parse_codec(codec)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if not isinstance(tensors, list):
        raise ProtocolError("tensors must be a list")
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ProtocolError(f"digest must be {DIGEST_SIZE} bytes")
    if not isinstance(meta, dict):
        raise ProtocolError("meta must be a map")

    entries = _read_entries(tensors, expected, max_elements)
    if model_digest(entries) != digest:
        raise ProtocolError("digest mismatch: the model was corrupted in transit")
    weights = {entry.name: entry.decode() for entry in entries}
    return ModelMessage(round_, float(age), weights, codec, meta)


def model_digest(entries: Iterable[TensorEntry]) -> bytes:
    """BLAKE2b-128 of every tensor's header and payload, fed incrementally (no concatenation)."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for entry in entries:
        digest.update(msgpack.packb(entry.header(), use_bin_type=True))
        digest.update(entry.data)
    return digest.digest()


def layout(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """The ``expected`` mapping describing a local model."""
    return {name: (np.asarray(a).dtype, tuple(np.shape(a))) for name, a in weights.items()}


def _read_entries(
    tensors: list[Any], expected: ExpectedSpec | None, max_elements: int
) -> list[TensorEntry]:
    """Check every tensor's metadata, before any payload is hashed or decoded."""
    entries: list[TensorEntry] = []
    names: set[str] = set()
    budget = max_elements
    for obj in tensors:
        entry = TensorEntry.from_wire(obj, max_elements=budget)
        if entry.name in names:
            raise ProtocolError(f"tensor {entry.name} appears twice")
        names.add(entry.name)
        budget -= entry.size
        entries.append(entry)
    if expected is None:
        return entries
    if names != set(expected):
        missing = sorted(set(expected) - names)[:5]
        extra = sorted(names - set(expected))[:5]
        raise ProtocolError(
            f"tensor names differ from the local model: missing {missing}, unexpected {extra}"
        )
    for entry in entries:
        want_dtype, want_shape = expected[entry.name]
        if entry.dtype.name != np.dtype(want_dtype).name:
            raise ProtocolError(
                f"dtype mismatch for {entry.name}: got {entry.dtype.name}, "
                f"expected {np.dtype(want_dtype).name}"
            )
        if entry.shape != tuple(want_shape):
            raise ProtocolError(
                f"shape mismatch for {entry.name}: got {entry.shape}, expected {tuple(want_shape)}"
            )
    return entries
