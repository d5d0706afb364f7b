"""PeerView: joins, refreshes, departures, TTL expiry and change notification, on a fake clock."""

from __future__ import annotations

import pytest

from p2pfl.discovery.peerview import PeerInfo, PeerView


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def peer(
    peer_id: str,
    role: str = "trainer",
    source: str = "presence",
    last_seen: float = 0.0,
    round: int | None = None,
) -> PeerInfo:
    return PeerInfo(
        id=peer_id,
        role=role,
        broker=f"mqtt://{peer_id}:1883",
        source=source,
        last_seen=last_seen,
        round=round,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def view(clock: FakeClock) -> PeerView:
    return PeerView("me", ttl=10.0, clock=clock)


def test_live_lists_trainers_sorted_without_self(view: PeerView) -> None:
    for peer_id in ["c", "a", "me", "b"]:
        view.upsert(peer(peer_id))
    view.upsert(peer("watcher", role="monitor"))
    assert view.live() == ["a", "b", "c"]
    assert view.live("monitor") == ["watcher"]
    assert view.live(None) == ["a", "b", "c", "watcher"]
    assert len(view) == 4
    assert "me" not in view
    assert "a" in view


def test_upsert_reports_new_and_changed_peers_and_bumps_the_version(view: PeerView) -> None:
    start = view.version
    assert view.upsert(peer("a")) is True
    after_join = view.version
    assert after_join > start
    assert view.upsert(peer("a")) is False
    assert view.upsert(peer("a", round=7)) is False
    assert view.version == after_join
    moved = PeerInfo(id="a", role="trainer", broker="mqtt://elsewhere:1883", source="presence")
    assert view.upsert(moved) is True
    assert view.version > after_join
    got = view.get("a")
    assert got is not None
    assert got.broker == "mqtt://elsewhere:1883"
    assert view.get("nobody") is None


def test_upsert_refreshes_last_seen_from_the_view_clock(view: PeerView, clock: FakeClock) -> None:
    view.upsert(peer("a", last_seen=5.0))
    got = view.get("a")
    assert got is not None
    assert got.last_seen == 1000.0
    clock.now = 1004.0
    view.upsert(peer("a"))
    got = view.get("a")
    assert got is not None
    assert got.last_seen == 1004.0


def test_peers_expire_after_ttl_unless_refreshed(view: PeerView, clock: FakeClock) -> None:
    view.upsert(peer("a"))
    view.upsert(peer("b"))
    clock.now += 8
    view.upsert(peer("b"))
    clock.now += 8  # a last seen 16 s ago, b 8 s ago
    version = view.version
    assert view.expire() == ["a"]
    assert view.version > version
    assert view.live() == ["b"]
    clock.now += 3
    assert view.expire() == ["b"]
    assert view.live() == []
    assert view.expire() == []


def test_silent_peer_expires_and_fresh_one_stays(view: PeerView, clock: FakeClock) -> None:
    view.upsert(peer("silent"))
    view.upsert(peer("chatty"))
    for _ in range(4):
        clock.now += 4
        view.upsert(peer("chatty"))
        view.expire()
    assert view.live() == ["chatty"]


def test_touch_keeps_a_peer_alive_and_updates_its_round(view: PeerView, clock: FakeClock) -> None:
    view.upsert(peer("a"))
    clock.now += 9
    assert view.touch("a", round=12) is True
    clock.now += 9
    assert view.expire() == []
    got = view.get("a")
    assert got is not None
    assert got.round == 12
    assert view.touch("unknown") is False


def test_static_peers_never_expire_but_can_be_removed(view: PeerView, clock: FakeClock) -> None:
    view.upsert(peer("configured", source="static"))
    # mDNS seeing the same peer must not make it expirable.
    view.upsert(peer("configured", source="mdns"))
    got = view.get("configured")
    assert got is not None
    assert got.source == "static"
    clock.now += 3600
    assert view.expire() == []
    assert view.live() == ["configured"]
    assert view.remove("configured", "bye") is True
    assert view.live() == []


def test_remove_drops_at_once_and_reports_unknown_peers(view: PeerView) -> None:
    view.upsert(peer("a"))
    version = view.version
    assert view.remove("a", "offline") is True
    assert view.version > version
    assert "a" not in view
    assert view.remove("a", "offline") is False
    assert view.version == version + 1


def test_version_only_increases(view: PeerView, clock: FakeClock) -> None:
    seen = [view.version]
    view.upsert(peer("a"))
    seen.append(view.version)
    view.upsert(peer("b", role="monitor"))
    seen.append(view.version)
    view.upsert(peer("b", role="trainer"))
    seen.append(view.version)
    view.remove("a", "bye")
    seen.append(view.version)
    clock.now += 100
    view.expire()
    seen.append(view.version)
    assert seen == sorted(set(seen))


def test_records_about_self_are_ignored(view: PeerView) -> None:
    assert view.upsert(peer("me")) is False
    assert len(view) == 0
    assert view.version == 0


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        PeerView("me", ttl=0)
