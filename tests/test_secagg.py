"""Secure aggregation arithmetic: pairwise masks cancel exactly in the sum, for any set of
senders and any dropout subset once the survivors' seeds are revealed; a masked model shows
nothing of the model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl import secagg
from p2pfl.secagg import AgreementKey, Reveal

NET = "sa"
# Key generation is the slow part of a hypothesis example: a fixed pool, drawn from by index.
KEYS = {f"n{k}": AgreementKey.generate() for k in range(7)}
IDS = sorted(KEYS)


def model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.normal(size=(5, 3)) * scale).astype(np.float32),
        "b": (rng.normal(size=7) * scale).astype(np.float32),
    }


def seeds_for(sender: str, senders: list[str], receiver: str, r: int) -> dict[str, bytes]:
    return {
        other: secagg.pair_seed(
            KEYS[sender],
            KEYS[other].public_raw,
            net=NET,
            receiver=receiver,
            round=r,
            pair=(sender, other),
        )
        for other in senders
        if other != sender
    }


def masked_of(sender: str, senders: list[str], receiver: str, r: int, seed: int) -> secagg.Masked:
    q = secagg.quantize(model(seed))
    return secagg.mask(q, sender, seeds_for(sender, senders, receiver, r))


def test_both_ends_of_a_pair_derive_the_same_seed_for_one_receiver_and_round() -> None:
    a = secagg.pair_seed(KEYS["n0"], KEYS["n1"].public_raw, net=NET, receiver="r", round=3,
                         pair=("n0", "n1"))  # fmt: skip
    b = secagg.pair_seed(KEYS["n1"], KEYS["n0"].public_raw, net=NET, receiver="r", round=3,
                         pair=("n1", "n0"))  # fmt: skip
    assert a == b and len(a) == secagg.SEED_SIZE
    other_round = secagg.pair_seed(KEYS["n0"], KEYS["n1"].public_raw, net=NET, receiver="r",
                                   round=4, pair=("n0", "n1"))  # fmt: skip
    other_receiver = secagg.pair_seed(KEYS["n0"], KEYS["n1"].public_raw, net=NET, receiver="q",
                                      round=3, pair=("n0", "n1"))  # fmt: skip
    assert len({a, other_round, other_receiver}) == 3


def test_bad_public_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        secagg.pair_seed(KEYS["n0"], b"\x01" * 31, net=NET, receiver="r", round=1, pair=("a", "b"))
    with pytest.raises(ValueError):  # a low-order point: an all-zero shared secret
        secagg.pair_seed(KEYS["n0"], b"\x00" * 32, net=NET, receiver="r", round=1, pair=("a", "b"))


@settings(max_examples=40, deadline=None)
@given(
    members=st.sets(st.sampled_from(IDS), min_size=2, max_size=6),
    r=st.integers(0, 2**40),
    data=st.data(),
)
def test_masks_cancel_for_any_senders_and_any_dropout_after_reveal(
    members: set[str], r: int, data: st.DataObject
) -> None:
    senders = sorted(members)
    receiver = next(i for i in IDS if i not in members) if len(members) < len(IDS) else "rx"
    dropped = data.draw(
        st.sets(st.sampled_from(senders), max_size=len(senders) - 1), label="dropped"
    )
    survivors = [s for s in senders if s not in dropped]
    masked = [masked_of(s, senders, receiver, r, seed=k) for k, s in enumerate(senders)]
    summed = secagg.total(m for s, m in zip(senders, masked, strict=True) if s in survivors)
    reveals = [
        Reveal(j, gone, seeds_for(j, senders, receiver, r)[gone])
        for j, gone in itertools.product(survivors, sorted(dropped))
    ]
    exact = secagg.total(secagg.quantize(model(k)) for k, s in enumerate(senders) if s in survivors)
    unmasked = secagg.unmask(summed, reveals)
    for name in exact:
        np.testing.assert_array_equal(unmasked[name], exact[name])  # exact, not approximately
    if dropped:  # without the reveals, the dropped senders' masks are still in the sum
        assert any(not np.array_equal(summed[n], exact[n]) for n in exact)


def test_merged_average_equals_plain_average() -> None:
    own = model(100)
    others = [model(k, scale=3.0) for k in range(4)]
    summed = secagg.total(secagg.quantize(m) for m in others)
    merged = secagg.merged_average(own, summed, len(others))
    for name, mine in own.items():
        plain = (mine.astype(np.float64) + sum(m[name].astype(np.float64) for m in others)) / 5
        err = np.linalg.norm(merged[name] - plain) / np.linalg.norm(plain)
        assert err < 1e-6
        assert merged[name].dtype == mine.dtype


@given(
    values=st.lists(
        st.floats(-secagg.MAX_ABS, secagg.MAX_ABS, allow_nan=False, allow_infinity=False),
        min_size=1, max_size=20,
    )
)  # fmt: skip
def test_fixed_point_keeps_values_to_its_resolution(values: list[float]) -> None:
    x = {"t": np.array(values, dtype=np.float64)}
    back = secagg.dequantize(secagg.quantize(x))["t"]
    assert np.max(np.abs(back - x["t"])) <= 2.0**-secagg.FRACTION_BITS


def test_values_that_cannot_be_masked_are_refused() -> None:
    with pytest.raises(ValueError, match="nan or infinite"):
        secagg.quantize({"t": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="above"):
        secagg.quantize({"t": np.array([secagg.MAX_ABS * 2])})


def test_a_masked_model_shows_no_correlation_with_the_model() -> None:
    # A big tensor, so the correlation estimate is tight (|r| of independent data ~ 1/sqrt(n)).
    rng = np.random.default_rng(0)
    true = {"t": rng.normal(size=200_000).astype(np.float32)}
    seeds = seeds_for("n0", ["n0", "n1", "n2"], "rx", 1)
    masked = secagg.mask(secagg.quantize(true), "n0", seeds)
    as_number = masked["t"].view(np.uint64).astype(np.float64)
    r = np.corrcoef(as_number, true["t"].astype(np.float64))[0, 1]
    assert abs(r) < 0.05
    # Uniform modulo 2**64: every byte value about equally often.
    counts = np.bincount(masked["t"].view(np.uint8), minlength=256)
    assert counts.min() > 0.8 * counts.mean()


def test_one_partner_is_enough_to_hide_a_model_and_signs_are_opposite() -> None:
    assert secagg.sign("a", "b") == 1 and secagg.sign("b", "a") == -1
    with pytest.raises(ValueError):
        secagg.sign("a", "a")
