"""Pairwise-masked secure aggregation: the arithmetic (``--secure-aggregation``, sync mode).

Bonawitz et al. 2017, "Practical secure aggregation for privacy-preserving machine learning"
(CCS), simplified: one receiver per round instead of a server, no double masking, no secret
sharing. Every sender j of receiver i's round r agrees with every other sender l of that round
on a seed, from an X25519 key agreement of their keys (announced in their signed presence)
through HKDF-SHA256 with (network, receiver, round, pair) as context:
``seed(j, l; i, r)``. Sender j sends ``q(x_j) + sum_l sign(j, l) * PRG(seed(j, l; i, r))``
where ``q`` is fixed point in 64-bit integers and every sum wraps modulo 2**64; the lower id of
a pair adds the mask, the higher subtracts it, so in the sum over all senders every mask
cancels exactly and the receiver learns ``sum_j q(x_j)``, not any one of them. A masked model is
uniform modulo 2**64 whatever the model, as long as the sender has one partner.

When sender l does not deliver, the masks of its pairs stay in the sum; each surviving sender
j then reveals ``seed(j, l; i, r)``, which is only good for that receiver and round, and the
receiver takes j's mask for l out (:func:`unmask`).

The PRG is numpy's Philox4x64-10 (Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3"), keyed with 128 bits from HKDF per (seed, tensor name). It is a counter-based
generator built from a block-cipher-like bijection: fast (GB/s, so masking costs little next to
training), its stream is fixed by numpy's stability policy for bit generators (peers with
different numpy versions agree), and it needs no state beyond the key. It is not a proven
cryptographic PRG; X25519 and HKDF come from ``cryptography``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

FRACTION_BITS = 32
"""Fixed point: a value x travels as round(x * 2**32) in a 64-bit integer."""
MAX_ABS = 2.0**24
"""Largest |value| a masked model may hold: with at most MAX_SENDERS senders the sum stays
below 2**63 (2**(24 + 32 + 7)), so it never wraps into the sign bit."""
MAX_SENDERS = 2 ** (63 - FRACTION_BITS - 24)
SEED_SIZE = 32
KEY_SIZE = 32
_SCALE = float(2**FRACTION_BITS)
_INFO = b"p2pfl/secagg/v1\x00"

Weights = dict[str, np.ndarray]
Masked = dict[str, np.ndarray]
"""A quantized or masked model: int64 arrays, summed modulo 2**64."""


@dataclass(frozen=True)
class AgreementKey:
    """A node's X25519 key pair for mask agreement (fresh per process, announced in its signed
    presence: it needs no file, since a restarted node's masks only need to match this run)."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> AgreementKey:
        return cls(X25519PrivateKey.generate())

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )


def pair_seed(
    own: AgreementKey,
    peer_public: bytes,
    *,
    net: str,
    receiver: str,
    round: int,
    pair: Sequence[str],
) -> bytes:
    """``seed(j, l; i, r)``: the seed two senders share for one receiver and round.

    ``pair`` is the two senders' ids (either order). ValueError for a key that is not a valid
    X25519 public key (a low-order point gives an all-zero secret, which ``cryptography``
    refuses).
    """
    if len(peer_public) != KEY_SIZE:
        raise ValueError(f"an X25519 public key is {KEY_SIZE} bytes, got {len(peer_public)}")
    shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted(pair)
    context = "\x00".join((net, receiver, str(round), low, high)).encode()
    return HKDF(hashes.SHA256(), SEED_SIZE, salt=None, info=_INFO + context).derive(shared)


def mask_stream(seed: bytes, name: str, size: int) -> np.ndarray:
    """``size`` pseudo-random 64-bit words for one tensor, from a pair seed (as int64)."""
    key = HKDFExpand(hashes.SHA256(), 16, info=_INFO + b"tensor\x00" + name.encode()).derive(seed)
    raw = np.random.Philox(key=int.from_bytes(key, "little")).random_raw(size)
    return np.asarray(raw, dtype=np.uint64).view(np.int64)


def sign(own: str, partner: str) -> int:
    """+1 when ``own`` adds the pair's mask (the lower id), -1 when it subtracts it."""
    if own == partner:
        raise ValueError("a sender has no pair with itself")
    return 1 if own < partner else -1


def quantize(weights: Mapping[str, np.ndarray]) -> Masked:
    """Fixed point (int64) of a model; ValueError for non-finite values or |x| > MAX_ABS."""
    out: Masked = {}
    for name, array in weights.items():
        values = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"tensor {name}: nan or infinite values cannot be masked")
        if values.size and float(np.max(np.abs(values))) > MAX_ABS:
            raise ValueError(f"tensor {name}: |values| above {MAX_ABS:g} cannot be masked")
        out[name] = np.rint(values * _SCALE).astype(np.int64)
    return out


def dequantize(total: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float64 values of a fixed-point model (or of a sum of them)."""
    return {
        name: np.asarray(a, dtype=np.int64).astype(np.float64) / _SCALE for name, a in total.items()
    }


def _wrapping(a: np.ndarray, b: np.ndarray, sign_: int) -> np.ndarray:
    """a + sign * b modulo 2**64 (numpy wraps unsigned arrays silently)."""
    ua, ub = a.view(np.uint64), b.view(np.uint64)
    return (ua + ub if sign_ > 0 else ua - ub).view(np.int64)


def mask(quantized: Mapping[str, np.ndarray], own: str, seeds: Mapping[str, bytes]) -> Masked:
    """A sender's masked model: its quantized model plus, per partner, the pair's mask with
    the pair's sign. ``seeds`` maps each partner id to ``seed(own, partner; i, r)``."""
    out: Masked = {}
    for name, q in quantized.items():
        acc = np.array(q, dtype=np.int64).reshape(-1)
        for partner, seed in sorted(seeds.items()):
            acc = _wrapping(acc, mask_stream(seed, name, acc.size), sign(own, partner))
        out[name] = acc.reshape(np.shape(q))
    return out


def total(masked: Iterable[Mapping[str, np.ndarray]]) -> Masked:
    """The sum of masked models modulo 2**64."""
    out: Masked = {}
    for model in masked:
        for name, values in model.items():
            v = np.asarray(values, dtype=np.int64)
            out[name] = _wrapping(out[name], v, 1) if name in out else v.copy()
    return out


@dataclass(frozen=True)
class Reveal:
    """A surviving sender's seed with a sender that did not deliver."""

    survivor: str
    dropped: str
    seed: bytes


def unmask(summed: Mapping[str, np.ndarray], reveals: Iterable[Reveal]) -> Masked:
    """Take out of a sum of masked models the masks survivors added for dropped senders."""
    out = {name: np.array(v, dtype=np.int64) for name, v in summed.items()}
    for r in reveals:
        s = sign(r.survivor, r.dropped)
        for name, values in out.items():
            stream = mask_stream(r.seed, name, values.size).reshape(values.shape)
            out[name] = _wrapping(values, stream, -s)
    return out


def merged_average(own: Mapping[str, np.ndarray], summed: Masked, senders: int) -> Weights:
    """(own + the senders' sum) / (senders + 1), in the dtypes of ``own``: plain averaging."""
    plain = dequantize(summed)
    out: Weights = {}
    for name, mine in own.items():
        values = (np.asarray(mine, dtype=np.float64) + plain[name]) / (senders + 1)
        out[name] = values.astype(np.asarray(mine).dtype)
    return out


def masked_layout(
    layout: Mapping[str, tuple[Any, tuple[int, ...]]],
) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """The layout of a masked model for a local model's layout: same names and shapes, int64."""
    return {name: (np.dtype("<i8"), tuple(shape)) for name, (_, shape) in layout.items()}
