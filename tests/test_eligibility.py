"""Eligibility (`--when`): parsing, the window's midnight wrap, and each condition's check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.eligibility import (
    DEFAULT_IDLE,
    Conditions,
    Eligibility,
    Readers,
    in_window,
    parse_when,
    parse_window,
    rest_after_fit,
    torch_threads,
)

minutes = st.integers(0, 24 * 60 - 1)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def test_parse_every_condition() -> None:
    c = parse_when("charging, idle:30,unmetered,window=22:00-06:30,max-cpu=50")
    assert c == Conditions(
        window=(22 * 60, 6 * 60 + 30), charging=True, idle=30.0, unmetered=True, max_cpu=50.0
    )
    assert c.any
    assert parse_when(["idle"]).idle == DEFAULT_IDLE
    assert parse_when("") == Conditions() and not Conditions().any
    assert not parse_when("max-cpu=10").any  # a throttle, never a reason to pause


@pytest.mark.parametrize(
    "text",
    [
        "sunny",
        "idle:0",
        "idle:101",
        "idle:abc",
        "max-cpu",
        "max-cpu=nan",
        "window=25:00-01:00",
        "window=10:00-10:00",
        "window=10:00",
        "window=1000-1100",
        "window=10:5-11:00",
        "charging,charging",
        "charging=yes",
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_when(text)


@given(minutes, minutes)
def test_window_round_trip(start: int, end: int) -> None:
    text = f"{_hhmm(start)}-{_hhmm(end)}"
    if start == end:
        with pytest.raises(ValueError):
            parse_window(text)
    else:
        assert parse_window(text) == (start, end)


@given(minutes, minutes, minutes)
def test_window_wraps_midnight(start: int, end: int, now: int) -> None:
    if start == end:
        return
    inside = in_window(now, (start, end))
    # The window is [start, end) walked forward from start on a 24 h clock.
    assert inside == ((now - start) % 1440 < (end - start) % 1440)
    assert inside != in_window(now, (end, start))  # a window and its complement split the day


def test_window_examples() -> None:
    night = parse_window("22:00-06:00")
    assert in_window(23 * 60, night) and in_window(0, night) and in_window(5 * 60 + 59, night)
    assert not in_window(6 * 60, night) and not in_window(12 * 60, night)


def _check(when: str, metered_list: tuple[str, ...] = (), **read: object) -> str | None:
    readers = Readers(
        minute=lambda: read.get("minute", 12 * 60),  # type: ignore[return-value]
        on_power=lambda: read.get("power", True),  # type: ignore[return-value]
        other_cpu=lambda: read.get("cpu", 0.0),  # type: ignore[return-value]
        interface=lambda: read.get("iface", "eth0"),  # type: ignore[return-value]
        metered=lambda _iface: read.get("nm"),  # type: ignore[return-value]
    )
    return Eligibility(parse_when(when), metered_list, readers).check()


def test_each_condition() -> None:
    assert _check("window=22:00-06:00", minute=12 * 60) == "window"
    assert _check("window=22:00-06:00", minute=23 * 60) is None
    assert _check("charging", power=False) == "charging"
    assert _check("charging", power=True) is None
    assert _check("idle:20", cpu=35.0) == "idle"
    assert _check("idle:20", cpu=5.0) is None
    assert _check("unmetered", ("wlan0",), iface="wlan0") == "unmetered"
    assert _check("unmetered", ("wlan0",), iface="eth0") is None
    assert _check("unmetered", iface="eth0", nm=True) == "unmetered"  # NetworkManager says so
    assert _check("unmetered", iface=None) is None  # no default route
    assert _check("charging,window=22:00-06:00", power=False, minute=12 * 60) == "window"


def test_max_cpu_throttle() -> None:
    assert rest_after_fit(2.0, 50) == pytest.approx(2.0)
    assert rest_after_fit(2.0, 25) == pytest.approx(6.0)
    assert rest_after_fit(2.0, None) == 0.0 and rest_after_fit(2.0, 100) == 0.0
    assert torch_threads(50, 8) == 4 and torch_threads(5, 8) == 1 and torch_threads(None, 8) is None
