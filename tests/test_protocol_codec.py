"""Tensor codecs: exact raw round trips, bounded error for lossy codecs, defensive decoding."""

from typing import Any, Literal

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.protocol import Codec, ProtocolError, parse_codec
from p2pfl.protocol.codec import DTYPES, TensorEntry, encode_tensor

FLOATS = ["float16", "float32", "float64"]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


def finite_arrays(dtypes: list[str], max_magnitude: float = 1e4) -> st.SearchStrategy[np.ndarray]:
    def for_dtype(name: str) -> st.SearchStrategy[np.ndarray]:
        dtype = np.dtype(name)
        elements = None
        if dtype.kind == "f":
            width: Literal[16, 32] = 16 if name == "float16" else 32
            elements = st.floats(-max_magnitude, max_magnitude, width=width)
        return hnp.arrays(dtype, shapes, elements=elements)

    return st.sampled_from(dtypes).flatmap(for_dtype)


def wire_round_trip(entry: TensorEntry) -> np.ndarray:
    """Send an entry through msgpack, as a peer would receive it, and decode it."""
    received = msgpack.unpackb(msgpack.packb(entry.to_wire()))
    return TensorEntry.from_wire(received).decode()


def raw_entry(dtype: str, shape: list[int], params: Any, data: Any) -> list[Any]:
    return ["t", dtype, shape, params, data]


@pytest.mark.parametrize(
    ("spec", "codec"),
    [
        ("raw", Codec("raw")),
        ("fp16", Codec("fp16")),
        ("int8", Codec("int8")),
        ("topk:0.1", Codec("topk", 0.1)),
        ("topk:1", Codec("topk", 1.0)),
        ("topk:1e-3", Codec("topk", 0.001)),
    ],
)
def test_codec_specs_parse(spec: str, codec: Codec) -> None:
    assert parse_codec(spec) == codec
    assert parse_codec(codec.spec) == codec


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("zip", "unknown codec 'zip'"),
        ("", "unknown codec"),
        ("topk", "unknown codec"),
        ("raw:1", "unknown codec"),
        ("topk:abc", "'abc' is not a number"),
        ("topk:0", "0 < F <= 1"),
        ("topk:1.5", "0 < F <= 1"),
        ("topk:nan", "0 < F <= 1"),
        ("topk:-0.1", "0 < F <= 1"),
    ],
)
def test_bad_codec_specs_are_refused_readably(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_codec(spec)
    assert fragment in str(info.value)


@given(finite_arrays(list(DTYPES)), st.sampled_from(["raw", "fp16", "int8", "topk:0.3"]))
@settings(max_examples=150)
def test_raw_and_non_float_tensors_round_trip_exactly(array: np.ndarray, spec: str) -> None:
    entry = encode_tensor("t", array, parse_codec(spec))
    if spec == "raw" or array.dtype.kind != "f":
        assert entry.params == ["raw"]  # integer and bool tensors always go raw
    decoded = wire_round_trip(entry)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    if entry.params == ["raw"]:
        np.testing.assert_array_equal(decoded, array)


def test_raw_encode_and_decode_share_memory_instead_of_copying() -> None:
    array = np.arange(1000, dtype=np.float32).reshape(10, 100)
    entry = encode_tensor("w", array, Codec("raw"))
    assert np.shares_memory(np.frombuffer(entry.data, np.uint8), array)
    payload = bytes(entry.data)
    decoded = TensorEntry.from_wire(["w", "float32", [10, 100], ["raw"], payload]).decode()
    assert np.shares_memory(decoded, np.frombuffer(payload, np.uint8))
    assert not decoded.flags.owndata and not decoded.flags.writeable


@given(finite_arrays(FLOATS))
@settings(max_examples=100)
def test_fp16_error_is_relative(array: np.ndarray) -> None:
    decoded = wire_round_trip(encode_tensor("t", array, Codec("fp16")))
    assert decoded.dtype == array.dtype
    x = array.astype(np.float64)
    # Half precision: 11 significant bits; below 2**-14 values are subnormal (absolute step 2**-24).
    assert np.all(np.abs(decoded - x) <= np.abs(x) * 2**-11 + 2**-24)


@given(finite_arrays(FLOATS, max_magnitude=1e3))
@settings(max_examples=100)
def test_int8_error_is_at_most_half_a_step(array: np.ndarray) -> None:
    entry = encode_tensor("t", array, Codec("int8"))
    decoded = wire_round_trip(entry)
    assert decoded.dtype == array.dtype
    if entry.params[0] == "raw":  # empty, or so tiny that max/127 underflows float32
        np.testing.assert_array_equal(decoded, array)
        return
    scale = entry.params[1]
    x = array.astype(np.float64)
    peak = float(np.abs(x).max())
    # float16 outputs are rounded once more, to 11 significant bits.
    eps = peak * (2**-10 if array.dtype == np.float16 else 1e-6) + 1e-30
    assert np.all(np.abs(decoded - x) <= scale / 2 + eps)


@given(finite_arrays(FLOATS), st.floats(0.01, 1.0))
@settings(max_examples=100)
def test_topk_keeps_the_largest_entries_and_zeros_the_rest(
    array: np.ndarray, fraction: float
) -> None:
    entry = encode_tensor("t", array, Codec("topk", fraction))
    decoded = wire_round_trip(entry)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    if array.size == 0:
        assert entry.params == ["raw"]
        return
    n, k = array.size, entry.params[1]
    assert k <= n and fraction * n - 1e-6 <= k < fraction * n + 1
    flat, out = array.reshape(-1), decoded.reshape(-1)
    kept = np.frombuffer(entry.data, "<u4", count=k).astype(np.intp)
    dropped = np.setdiff1d(np.arange(n), kept)
    np.testing.assert_array_equal(out[kept], flat[kept].astype(np.float32).astype(array.dtype))
    assert not out[dropped].any()
    if k and len(dropped):
        assert np.abs(flat[kept]).min() >= np.abs(flat[dropped]).max()


def test_topk_count_is_exact_for_decimal_fractions() -> None:
    array = np.arange(1.0, 11.0)
    entry = encode_tensor("t", array, parse_codec("topk:0.3"))  # 0.3 * 10 is 3.0000000000000004
    assert entry.params == ["topk", 3]
    np.testing.assert_array_equal(wire_round_trip(entry), [0] * 7 + [8, 9, 10])


def test_lossy_codecs_fall_back_to_raw_where_the_format_cannot_hold_the_values() -> None:
    big = np.array([1e6, -3.0], dtype=np.float32)  # beyond float16's 65504
    entry = encode_tensor("t", big, Codec("fp16"))
    assert entry.params == ["raw"]
    np.testing.assert_array_equal(wire_round_trip(entry), big)
    huge = np.array([1e300, 1.0])  # beyond float32, where the int8 scale and top-k values live
    assert encode_tensor("t", huge, Codec("int8")).params == ["raw"]
    assert encode_tensor("t", huge, Codec("topk", 0.5)).params == ["raw"]


def test_int8_of_all_zeros_decodes_to_zeros() -> None:
    zeros = np.zeros((3, 3), np.float32)
    entry = encode_tensor("t", zeros, Codec("int8"))
    assert entry.params == ["int8", 0.0]
    np.testing.assert_array_equal(wire_round_trip(entry), zeros)


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "uint64", "U3", "datetime64[s]"])
def test_unsupported_dtypes_are_refused_on_encode(dtype: str) -> None:
    with pytest.raises(ValueError, match="not supported"):
        encode_tensor("t", np.zeros(2, dtype), Codec("raw"))


def test_big_endian_input_is_sent_little_endian() -> None:
    array = np.arange(4, dtype=">f4")
    decoded = wire_round_trip(encode_tensor("t", array, Codec("raw")))
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", ["raw", "fp16", "int8", "topk:0.5"])
def test_non_finite_values_are_refused_on_encode(bad: float, spec: str) -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_tensor("w", np.array([1.0, bad], np.float32), parse_codec(spec))


def _topk_data(indices: list[int], values: list[float]) -> bytes:
    return np.array(indices, "<u4").tobytes() + np.array(values, "<f4").tobytes()


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ("not a list", "must be a list"),
        (["t", "float32", [2]], "must be a list"),
        (["", "float32", [1], ["raw"], b"\0" * 4], "name"),
        (raw_entry("complex64", [1], ["raw"], b"\0" * 8), "unsupported dtype"),
        (raw_entry("object", [1], ["raw"], b"\0" * 8), "unsupported dtype"),
        (raw_entry("float32", [-1], ["raw"], b""), "shape"),
        (raw_entry("float32", [True], ["raw"], b"\0" * 4), "shape"),
        (raw_entry("float32", [1] * 33, ["raw"], b"\0" * 4), "shape"),
        (raw_entry("float32", [2**20, 2**20], ["topk", 0], b""), "exceed the limit"),
        (raw_entry("float32", [2], ["raw"], "text"), "binary"),
        (raw_entry("float32", [2], ["raw"], b"\0" * 7), "7 bytes, expected 8"),
        (raw_entry("float32", [2], ["zip"], b"\0" * 8), "unknown codec"),
        (raw_entry("float32", [2], [], b"\0" * 8), "unknown codec"),
        (raw_entry("float32", [2], "raw", b"\0" * 8), "unknown codec"),
        (raw_entry("int64", [2], ["fp16"], b"\0" * 4), "float tensors only"),
        (raw_entry("float32", [2], ["int8", float("nan")], b"\0" * 2), "scale"),
        (raw_entry("float32", [2], ["int8", -1.0], b"\0" * 2), "scale"),
        (raw_entry("float32", [2], ["int8", 1], b"\0" * 2), "scale"),
        (raw_entry("float32", [2], ["topk", 3], b"\0" * 24), "top-k count"),
        (raw_entry("float32", [4], ["topk", 2], _topk_data([2, 1], [1, 1])), "unsorted"),
        (raw_entry("float32", [4], ["topk", 2], _topk_data([1, 1], [1, 1])), "unsorted"),
        (raw_entry("float32", [4], ["topk", 1], _topk_data([4], [1])), "out of range"),
        (raw_entry("float32", [4], ["topk", 1], _topk_data([0], [np.nan])), "NaN"),
        (raw_entry("float32", [2], ["raw"], np.array([1, np.nan], "<f4").tobytes()), "NaN"),
        (raw_entry("float64", [1], ["raw"], np.array([np.inf]).tobytes()), "infinite"),
        (raw_entry("float16", [1], ["fp16"], np.array([np.inf], "<f2").tobytes()), "NaN"),
        (raw_entry("float32", [1], ["int8", 3.4e38], b"\x7f"), "NaN"),  # overflows float32
        (raw_entry("bool", [2], ["raw"], b"\x01\x02"), "bool"),
    ],
)
def test_malformed_tensors_are_a_protocol_error_naming_the_problem(obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        TensorEntry.from_wire(obj).decode()
    assert fragment in info.value.reason
