"""Tensor codecs: how one named array travels inside a model message.

A tensor is the msgpack list ``[name, dtype, shape, params, data]`` where ``params`` is
``[codec, *args]`` and ``data`` the payload bytes (little-endian):

- ``["raw"]`` — the array's own bytes, sent and received without a copy of ours;
- ``["fp16"]`` — float16 values;
- ``["int8", scale]`` — symmetric per-tensor quantisation, ``x ≈ q * scale``, scale = max|x|/127
  stored as a float32 value;
- ``["topk", k]`` — the k largest-magnitude entries: k uint32 indices (ascending), then k float32
  values; the rest decode as zero (Aji & Heafield 2017, "Sparse communication for distributed
  gradient descent").

Lossy codecs apply to float tensors only; integer and bool tensors (e.g. BatchNorm's
``num_batches_tracked``) always go raw, and so does a float tensor whose values the codec's format
cannot represent (e.g. above 65504 for fp16). Decoded tensors have the original dtype and shape.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from p2pfl.protocol.envelope import BytesLike, is_int
from p2pfl.protocol.errors import ProtocolError

CODEC_NAMES = ("raw", "fp16", "int8", "topk")
_FLOAT_NAMES = ("float16", "float32", "float64")
_EXACT_NAMES = ("int8", "int16", "int32", "int64", "uint8", "bool")
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in _FLOAT_NAMES + _EXACT_NAMES
}
MAX_NDIM = 32
MAX_NAME_LENGTH = 512
MAX_TENSOR_ELEMENTS = 2**28

_F16, _F32, _U32 = np.dtype("<f2"), np.dtype("<f4"), np.dtype("<u4")
_F16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec; ``fraction`` is used by ``topk`` only."""

    name: str
    fraction: float = 1.0

    @property
    def spec(self) -> str:
        """The spec string this codec parses from, e.g. ``"topk:0.1"``."""
        return f"topk:{self.fraction!r}" if self.name == "topk" else self.name

    def __str__(self) -> str:
        return self.spec


def parse_codec(spec: str) -> Codec:
    """Parse ``raw``, ``fp16``, ``int8`` or ``topk:F`` (0 < F <= 1); raise ValueError otherwise."""
    name, sep, arg = spec.partition(":")
    if name in ("raw", "fp16", "int8") and not sep:
        return Codec(name)
    if name == "topk" and sep:
        try:
            fraction = float(arg)
        except ValueError:
            raise ValueError(f"codec {spec!r}: {arg!r} is not a number") from None
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(f"codec {spec!r}: the kept fraction must satisfy 0 < F <= 1")
        return Codec("topk", fraction)
    raise ValueError(f"unknown codec {spec!r}; expected raw, fp16, int8 or topk:F with 0 < F <= 1")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as it travels: metadata plus payload bytes (see module docstring)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    params: list[Any]
    data: BytesLike

    @property
    def size(self) -> int:
        """Number of elements of the decoded tensor."""
        return math.prod(self.shape)

    def header(self) -> list[Any]:
        """Everything but the payload, as it appears on the wire."""
        return [self.name, self.dtype.name, list(self.shape), self.params]

    def to_wire(self) -> list[Any]:
        """The msgpack-able list ``[name, dtype, shape, params, data]``."""
        return [*self.header(), self.data]

    @classmethod
    def from_wire(cls, obj: object, *, max_elements: int = MAX_TENSOR_ELEMENTS) -> "TensorEntry":
        """Check the structure and sizes of a received tensor; raise ProtocolError if wrong."""
        if not isinstance(obj, list) or len(obj) != 5:
            raise ProtocolError("a tensor must be a list [name, dtype, shape, params, data]")
        name, dtype_name, shape, params, data = obj
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            raise ProtocolError(f"tensor name must be a string of 1-{MAX_NAME_LENGTH} characters")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise ProtocolError(f"tensor {name}: unsupported dtype {dtype_name!r:.40}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(is_int(dim) and dim >= 0 for dim in shape)
        ):
            raise ProtocolError(f"tensor {name}: shape must be a list of non-negative integers")
        if not isinstance(data, bytes):
            raise ProtocolError(f"tensor {name}: payload must be binary")
        entry = cls(name, DTYPES[dtype_name], tuple(shape), params, data)
        if entry.size > max_elements:
            raise ProtocolError(f"tensor {name}: {entry.size} elements exceed the limit")
        entry._check_params()
        return entry

    def decode(self) -> np.ndarray:
        """The array this entry carries; raw payloads come back as read-only views, no copy."""
        codec, n = self.params[0], self.size
        if codec == "raw":
            array = np.frombuffer(self.data, self.dtype)
            if self.dtype.kind == "b" and n and np.frombuffer(self.data, np.uint8).max() > 1:
                raise ProtocolError(f"tensor {self.name}: bool values other than 0 and 1")
        elif codec == "fp16":
            array = np.frombuffer(self.data, _F16).astype(self.dtype, copy=False)
        elif codec == "int8":
            work = np.float64 if self.dtype == np.float64 else np.float32
            quantised = np.frombuffer(self.data, np.int8)
            with np.errstate(over="ignore"):  # an overflow is caught as a non-finite value
                array = np.multiply(quantised, self.params[1], dtype=work).astype(
                    self.dtype, copy=False
                )
        else:  # topk, checked in _check_params
            k = self.params[1]
            indices = np.frombuffer(self.data, _U32, count=k)
            if k and (indices[-1] >= n or not (indices[1:] > indices[:-1]).all()):
                raise ProtocolError(f"tensor {self.name}: top-k indices out of range or unsorted")
            array = np.zeros(n, self.dtype)
            array[indices] = np.frombuffer(self.data, _F32, offset=4 * k)
        if self.dtype.kind == "f" and not _all_finite(array):
            raise ProtocolError(f"tensor {self.name}: NaN or infinite values")
        return array.reshape(self.shape)

    def _check_params(self) -> None:
        params, n = self.params, self.size
        codec = params[0] if isinstance(params, list) and params else None
        if codec == "raw" and len(params) == 1:
            expected = n * self.dtype.itemsize
        elif codec in ("fp16", "int8", "topk") and self.dtype.kind != "f":
            raise ProtocolError(f"tensor {self.name}: codec {codec} applies to float tensors only")
        elif codec == "fp16" and len(params) == 1:
            expected = 2 * n
        elif codec == "int8" and len(params) == 2:
            scale = params[1]
            if not isinstance(scale, float) or not (math.isfinite(scale) and scale >= 0):
                raise ProtocolError(f"tensor {self.name}: int8 scale must be finite and >= 0")
            expected = n
        elif codec == "topk" and len(params) == 2:
            k = params[1]
            if not is_int(k) or not 0 <= k <= n:
                raise ProtocolError(f"tensor {self.name}: top-k count must be in [0, {n}]")
            expected = 8 * k
        else:
            raise ProtocolError(f"tensor {self.name}: unknown codec parameters {params!r:.60}")
        if len(self.data) != expected:
            raise ProtocolError(
                f"tensor {self.name}: payload is {len(self.data)} bytes, expected {expected}"
            )


def encode_tensor(name: str, array: np.ndarray, codec: Codec) -> TensorEntry:
    """Encode one tensor; raise ValueError for an unsupported dtype or non-finite values."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"tensor name must be a string of 1-{MAX_NAME_LENGTH} characters")
    array = np.asarray(array)
    wire_dtype = DTYPES.get(array.dtype.name)
    if wire_dtype is None:
        allowed = ", ".join(DTYPES)
        raise ValueError(f"tensor {name}: dtype {array.dtype} is not supported ({allowed})")
    if array.dtype != wire_dtype:
        array = array.astype(wire_dtype)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    shape = tuple(array.shape)

    def entry(params: list[Any], data: np.ndarray) -> TensorEntry:
        # memoryview: msgpack (and our envelope writer) take the bytes without a copy.
        return TensorEntry(name, wire_dtype, shape, params, data.reshape(-1).view(np.uint8).data)

    if array.dtype.kind != "f" or array.size == 0:
        return entry(["raw"], array)
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tensor {name}: NaN or infinite values cannot be sent")
    peak = max(-low, high)
    if codec.name == "fp16" and array.dtype != _F16 and peak <= _F16_MAX:
        return entry(["fp16"], array.astype(_F16))
    if codec.name == "int8":
        scale = np.float32(peak / 127) if peak / 127 <= _F32_MAX else np.float32(0)
        if scale > 0 or peak == 0:
            return entry(["int8", float(scale)], _quantise(array.reshape(-1), scale))
    if codec.name == "topk" and array.size < 2**32 and peak <= _F32_MAX:
        k = min(array.size, math.ceil(Fraction(repr(codec.fraction)) * array.size))
        return entry(["topk", k], _top_k(array.reshape(-1), k))
    return entry(["raw"], array)


def _quantise(array: np.ndarray, scale: np.float32) -> np.ndarray:
    if scale == 0:
        return np.zeros(array.shape, np.int8)
    work = np.float64 if array.dtype == np.float64 else np.float32
    scaled = np.divide(array, work(scale), dtype=work)
    np.rint(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return scaled.astype(np.int8)


def _top_k(flat: np.ndarray, k: int) -> np.ndarray:
    n = flat.size
    if k == 0:
        indices = np.empty(0, np.intp)
    elif k == n:
        indices = np.arange(n)
    else:
        indices = np.argpartition(np.abs(flat), n - k)[n - k :]
        indices.sort()
    out = np.empty(8 * k, np.uint8)
    out[: 4 * k].view(_U32)[:] = indices
    out[4 * k :].view(_F32)[:] = flat[indices]
    return out


def _all_finite(array: np.ndarray) -> bool:
    # min/max propagate NaN and reveal ±inf without allocating a mask as large as the tensor.
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))
