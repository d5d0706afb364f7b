"""PeerView: joins, refreshes, departures, TTL expiry and change notification, on a fake clock."""

from __future__ import annotations

import pytest

from p2pfl.discovery.peerview import (
    NEW_PEER_BURST,
    NEW_PEER_RATE,
    NewPeerBucket,
    PeerInfo,
    PeerView,
)
from p2pfl.inbox import reason_label
from tests.helpers import FakeClock


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
    return FakeClock(1000.0)


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


# -- bounded joining: a cap, a rate limit for new ids, and who bypasses them -----------------


class Refusals:
    """What a view refused, by label (as a node counts them)."""

    def __init__(self) -> None:
        self.by_label: dict[str, list[str]] = {}

    def __call__(self, peer_id: str, reason: str) -> None:
        self.by_label.setdefault(reason_label(reason), []).append(peer_id)


def test_no_more_than_max_peers_join_and_the_rest_are_counted(clock: FakeClock) -> None:
    view = PeerView("me", ttl=10.0, clock=clock, max_peers=3, configured=["mine"])
    view.on_refuse = refused = Refusals()
    joined = [view.upsert(peer(f"p{i}")) for i in range(5)]
    assert joined == [True, True, True, False, False]
    assert view.live() == ["p0", "p1", "p2"]
    assert refused.by_label == {"max-peers": ["p3", "p4"]}
    assert view.upsert(peer("p1", round=4)) is False and view.get("p1") is not None  # refresh
    # The user's own peers join whatever the cap (by id, or as a static record).
    assert view.upsert(peer("mine")) is True
    assert view.upsert(peer("listed", source="static")) is True
    view.remove("p0", "bye")
    view.remove("mine", "bye")
    view.remove("listed", "bye")
    assert view.upsert(peer("p3")) is True  # room again
    assert refused.by_label == {"max-peers": ["p3", "p4"]}


def test_new_peers_join_at_the_buckets_pace_and_later_heartbeats_get_in(
    clock: FakeClock,
) -> None:
    bucket = NewPeerBucket(burst=4, rate=0.5, clock=clock)
    view = PeerView("me", ttl=60.0, clock=clock, new_peers=bucket, configured=["mine"])
    view.on_refuse = refused = Refusals()
    for i in range(10):
        view.upsert(peer(f"p{i}"))
    assert view.live() == ["p0", "p1", "p2", "p3"]
    assert refused.by_label == {"new-peer-rate": [f"p{i}" for i in range(4, 10)]}
    assert not view.has_room("p4") and view.has_room("p0") and view.has_room("mine")
    # Known peers refresh without a token; configured and static ones need none.
    assert view.upsert(peer("p0", round=3)) is False
    assert view.upsert(peer("mine")) is True
    assert view.upsert(peer("listed", source="static")) is True
    clock.now += 2.0  # one token
    assert view.has_room("p4")
    for i in range(4, 10):  # the refused ones' next heartbeats
        view.upsert(peer(f"p{i}"))
    assert "p4" in view and "p5" not in view
    clock.now += 1000.0  # the bucket holds at most `burst`
    for i in range(5, 10):
        view.upsert(peer(f"p{i}"))
    assert [f"p{i}" in view for i in range(5, 10)] == [True] * 4 + [False]


def test_a_flood_of_a_hundred_new_ids_takes_the_view_only_at_the_default_pace(
    clock: FakeClock,
) -> None:
    view = PeerView(
        "me", ttl=60.0, clock=clock, max_peers=256, new_peers=NewPeerBucket(clock=clock)
    )
    for second in range(61):  # a record from each of 100 Sybils every second, for a minute
        for i in range(100):
            view.upsert(peer(f"sybil{i}"))
        if second == 0:
            assert len(view) == NEW_PEER_BURST == 32
        clock.now += 1.0
    assert len(view) == NEW_PEER_BURST + int(60 * NEW_PEER_RATE) == 62


def test_established_peers_are_those_in_the_view_for_a_while(
    view: PeerView, clock: FakeClock
) -> None:
    view.upsert(peer("old"))
    clock.now += 4
    view.upsert(peer("new"))
    view.upsert(peer("watcher", role="monitor"))
    clock.now += 1
    assert view.established(5.0) == ["old"]
    view.upsert(peer("old"))  # a refresh keeps when it joined
    assert view.established(5.0) == ["old"]
    assert view.established(1.0, role=None) == ["new", "old", "watcher"]
    view.remove("old", "bye")
    view.upsert(peer("old"))  # rejoining starts over
    assert view.established(5.0) == []


def test_leaving_peers_are_told_to_on_leave(view: PeerView, clock: FakeClock) -> None:
    left: list[PeerInfo] = []
    view.on_leave = left.append
    view.upsert(peer("a"))
    view.upsert(peer("b"))
    view.upsert(peer("c", source="static"))
    assert view.remove("a", "bye")
    assert not view.remove("a", "bye")  # not twice, nor for unknown ids
    clock.now += 11
    assert view.expire() == ["b"]
    assert [(p.id, p.broker) for p in left] == [("a", "mqtt://a:1883"), ("b", "mqtt://b:1883")]
    assert "b" not in view  # the hook runs once the view dropped it
