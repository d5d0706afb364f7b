"""Model messages: encode/decode round trips and defensive validation against the local model."""

import dataclasses
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.protocol import (
    Envelope,
    ProtocolError,
    decode_model,
    encode_model,
    layout,
    pack_envelope,
    parse_codec,
    unpack_envelope,
)


def small_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "fc.bias": rng.standard_normal(4).astype(np.float32),
        "bn.running_var": rng.random(4, dtype=np.float64) + 0.5,
        "bn.num_batches_tracked": np.array(12, np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
    }


def encode(weights: dict[str, np.ndarray], **kwargs: Any) -> bytearray:
    args: dict[str, Any] = {"net": "lab", "src": "n1", "seq": 5, "round": 3, "age": 640.0}
    return encode_model(weights, **(args | kwargs))


def reencode_body(data: bytes | bytearray, **changes: Any) -> bytearray:
    """The same message with body fields replaced (bypassing encode_model's own checks)."""
    env = unpack_envelope(data)
    return pack_envelope(dataclasses.replace(env, body=env.body | changes))


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "topk:1"])
def test_model_round_trips_with_metadata(codec: str) -> None:
    weights = small_model()
    data = encode(weights, codec=codec, meta={"token": "w1"}, ts=99.0)
    env, msg = decode_model(data, expected=layout(weights), net="lab")
    assert (env.kind, env.net, env.src, env.seq, env.ts) == ("model", "lab", "n1", 5, 99.0)
    assert (msg.round, msg.age, msg.meta) == (3, 640.0, {"token": "w1"})
    assert parse_codec(msg.codec) == parse_codec(codec)
    assert list(msg.weights) == list(weights)
    for name, array in weights.items():
        assert msg.weights[name].dtype == array.dtype and msg.weights[name].shape == array.shape
        tolerance = 0 if codec == "raw" else 0.02 * max(1.0, float(np.abs(array).max(initial=0)))
        np.testing.assert_allclose(msg.weights[name], array, atol=tolerance)


def test_raw_model_is_not_copied_beyond_the_message() -> None:
    weights = {"w": np.arange(4_000_000, dtype=np.float32)}  # 16 MB
    tracemalloc.start()
    try:
        data = encode(weights)
        encode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The output holds the one copy: no msgpack buffer doubling, no final bytes() copy.
    assert len(data) < weights["w"].nbytes + 1024
    assert encode_peak < 1.1 * weights["w"].nbytes
    _, msg = decode_model(data, expected=layout(weights))
    decoded = msg.weights["w"]
    assert not decoded.flags.owndata and not decoded.flags.writeable  # a view, not a copy
    np.testing.assert_array_equal(decoded, weights["w"])


def test_shape_mismatch_names_the_tensor() -> None:
    local = {"fc.weight": np.zeros((4, 4), np.float32)}
    data = encode({"fc.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ProtocolError) as info:
        decode_model(data, expected=layout(local))
    assert info.value.reason == "shape mismatch for fc.weight: got (3, 4), expected (4, 4)"


def test_dtype_mismatch_names_the_tensor() -> None:
    data = encode({"fc.bias": np.zeros(4, np.float64)})
    with pytest.raises(ProtocolError, match=r"dtype mismatch for fc\.bias: got float64, expected"):
        decode_model(data, expected={"fc.bias": ("float32", (4,))})


def test_missing_and_extra_tensors_are_refused() -> None:
    data = encode({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    expected = {"a": (np.dtype("float32"), (2,)), "c": (np.dtype("float32"), (2,))}
    with pytest.raises(ProtocolError, match=r"missing \['c'\], unexpected \['b'\]"):
        decode_model(data, expected=expected)


def test_decode_checks_kind_and_network() -> None:
    presence = pack_envelope(Envelope.create("presence", {}, net="lab", src="n1", seq=0))
    with pytest.raises(ProtocolError, match="expected a model message"):
        decode_model(presence)
    with pytest.raises(ProtocolError, match="network 'lab', expected 'other'"):
        decode_model(encode(small_model()), net="other")


def test_oversize_model_is_refused_before_parsing() -> None:
    data = encode(small_model())
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_model(data, max_size=len(data) - 1)


def test_corrupted_tensor_bytes_fail_the_digest() -> None:
    weights = {"w": np.arange(64, dtype=np.float32)}
    data = encode(weights)
    at = bytes(data).find(weights["w"].tobytes()) + 10
    data[at] ^= 0x01
    with pytest.raises(ProtocolError, match="digest mismatch"):
        decode_model(data, expected=layout(weights))


def test_corrupted_metadata_fails_the_digest() -> None:
    data = encode({"w": np.linspace(-1, 1, 16, dtype=np.float32)}, codec="int8")
    env = unpack_envelope(data)
    name, dtype, shape, params, payload = env.body["tensors"][0]
    tampered = [[name, dtype, shape, ["int8", params[1] * 2], payload]]
    with pytest.raises(ProtocolError, match="digest mismatch"):
        decode_model(reencode_body(data, tensors=tampered))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"round": -1}, "round"),
        ({"round": 1.5}, "round"),
        ({"age": float("nan")}, "age"),
        ({"age": -1.0}, "age"),
        ({"age": "old"}, "age"),
        ({"codec": "zip"}, "unknown codec"),
        ({"codec": 1}, "codec"),
        ({"tensors": {}}, "tensors must be a list"),
        ({"digest": b"short"}, "digest must be 16 bytes"),
        ({"meta": [1]}, "meta must be a map"),
        ({"weights": []}, "unexpected ['weights']"),
    ],
)
def test_malformed_body_fields_are_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_model(reencode_body(encode(small_model()), **changes))
    assert fragment in info.value.reason


def test_duplicate_tensor_names_are_refused() -> None:
    data = encode({"w": np.zeros(2, np.float32)})
    tensors = unpack_envelope(data).body["tensors"]
    with pytest.raises(ProtocolError, match="appears twice"):
        decode_model(reencode_body(data, tensors=tensors * 2))


def test_container_cap_follows_the_local_layout() -> None:
    """A message for a 300-tensor model decodes; for a 6-tensor one, long lists are refused."""
    big = {f"layer{i}.weight": np.full(2, i, np.float32) for i in range(300)}
    _, model = decode_model(encode(big), expected=layout(big))
    assert len(model.weights) == 300
    weights = small_model()
    padded = encode(weights, meta={"history": list(range(200))})
    assert decode_model(padded)[1].meta["history"][-1] == 199  # no layout: the loose default
    with pytest.raises(ProtocolError, match="max_array_len"):
        decode_model(padded, expected=layout(weights))


def test_decoded_size_is_bounded_without_a_local_model() -> None:
    bomb = [
        ["w", "float32", [2**27], ["topk", 0], b""],
        ["v", "float32", [2**27], ["topk", 0], b""],
    ]
    data = reencode_body(encode({"w": np.zeros(1, np.float32)}), tensors=bomb)
    with pytest.raises(ProtocolError, match="exceed the limit"):
        decode_model(data, max_elements=2**27 + 10)


def test_encode_refuses_what_peers_would_refuse() -> None:
    with pytest.raises(ValueError, match="round"):
        encode(small_model(), round=-1)
    with pytest.raises(ValueError, match="age"):
        encode(small_model(), age=float("inf"))
    with pytest.raises(ValueError, match="unknown codec"):
        encode(small_model(), codec="zip")
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode({"w": np.array([np.nan], np.float32)})


def test_every_truncation_is_a_protocol_error() -> None:
    weights: dict[str, np.ndarray] = {"w": np.ones(3, np.float32), "n": np.array(1, np.int64)}
    data = bytes(encode(weights))
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_model(data[:end], expected=layout(weights))


FLIP_MODEL = small_model()
FLIP_DATA = bytes(encode(FLIP_MODEL, codec="int8"))


@given(st.integers(0, len(FLIP_DATA) - 1), st.integers(1, 255))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_a_flipped_byte_is_refused_or_still_valid(position: int, xor: int) -> None:
    data = bytearray(FLIP_DATA)
    data[position] ^= xor
    try:
        _, msg = decode_model(data, expected=layout(FLIP_MODEL))
    except ProtocolError:
        return
    # Outside the digest (e.g. seq, ts, age): the result must still match the local model.
    assert layout(msg.weights) == layout(FLIP_MODEL)
    assert all(np.isfinite(a).all() for a in msg.weights.values() if a.dtype.kind == "f")
    assert msg.round >= 0 and np.isfinite(msg.age) and msg.age >= 0


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_random_bytes_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_model(data, expected=layout(FLIP_MODEL))


def test_body_layout_matches_the_design() -> None:
    raw = msgpack.unpackb(encode({"w": np.ones(2, np.float32)}))
    assert set(raw["body"]) == {"round", "age", "codec", "tensors", "digest"}
    assert raw["body"]["tensors"][0][:4] == ["w", "float32", [2], ["raw"]]
