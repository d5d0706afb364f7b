"""Wire protocol v1: topic names, the message envelope, tensor codecs, model messages, chunking.

Decoding anything received from a peer raises only ``ProtocolError``.
"""

from p2pfl.protocol import topics
from p2pfl.protocol.chunking import DEFAULT_MAX_CHUNK, Reassembler, split
from p2pfl.protocol.codec import CODEC_NAMES, Codec, parse_codec
from p2pfl.protocol.envelope import (
    DEFAULT_MAX_MESSAGE,
    KINDS,
    PROTOCOL_VERSION,
    Envelope,
    pack_envelope,
    unpack_envelope,
)
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.model import (
    ExpectedSpec,
    ModelMessage,
    decode_model,
    encode_model,
    layout,
    model_from_envelope,
)
from p2pfl.protocol.topics import validate_name

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_MESSAGE",
    "KINDS",
    "PROTOCOL_VERSION",
    "Codec",
    "Envelope",
    "ExpectedSpec",
    "ModelMessage",
    "ProtocolError",
    "Reassembler",
    "decode_model",
    "encode_model",
    "layout",
    "model_from_envelope",
    "pack_envelope",
    "parse_codec",
    "split",
    "topics",
    "unpack_envelope",
    "validate_name",
]
