"""mDNS discovery over real multicast DNS, bound to 127.0.0.1 only, plus its pure record code.

Every test uses its own network name, so parallel runs on one machine do not see each other's
peers (they may still count each other's records as ``other_network``, hence the ``>=``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from rich.console import Console
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from p2pfl.discovery.browse import PEER_FIELDS, browse, format_peers_table, peers_json
from p2pfl.discovery.mdns import Mdns
from p2pfl.discovery.mdns_record import (
    SERVICE_TYPE,
    RecordRejected,
    build_txt,
    instance_label,
    parse_txt,
)
from p2pfl.discovery.peerview import PeerInfo
from tests.conftest import WaitUntil

pytestmark = pytest.mark.timeout(20)
LOOPBACK = ["127.0.0.1"]


class Seen:
    """Records what one Mdns reported through its callbacks."""

    def __init__(self) -> None:
        self.peers: dict[str, PeerInfo] = {}
        self.all: list[PeerInfo] = []
        self.gone: list[str] = []

    def on_peer(self, peer: PeerInfo) -> None:
        self.peers[peer.id] = peer
        self.all.append(peer)

    def on_gone(self, peer_id: str) -> None:
        self.gone.append(peer_id)
        self.peers.pop(peer_id, None)


MakeNode = Callable[..., tuple[Mdns, Seen]]


@pytest.fixture
def net() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    """`make_node(net, id, port=..., **kw)` builds an unstarted Mdns on 127.0.0.1; closed after."""
    made: list[Mdns] = []

    def make(
        network: str | None, node_id: str | None, port: int = 1883, **kw: object
    ) -> tuple[Mdns, Seen]:
        seen = Seen()
        uri = f"mqtt://127.0.0.1:{port}" if node_id is not None else None
        mdns = Mdns(
            network,
            node_id,
            broker_uri=uri,
            interfaces=LOOPBACK,
            on_peer=seen.on_peer,
            on_gone=seen.on_gone,
            **kw,  # type: ignore[arg-type]
        )
        made.append(mdns)
        return mdns, seen

    yield make
    await asyncio.gather(*(m.close() for m in made))


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def test_nodes_find_each_other_and_ignore_other_networks(
    make_node: MakeNode, net: str, wait_until: WaitUntil
) -> None:
    a_id, b_id, c_id = uid("a"), uid("b"), uid("c")
    a, seen_a = make_node(net, a_id, port=1001)
    b, seen_b = make_node(net, b_id, port=1002, role="monitor", public_key="ab12cd", round=7)
    c, seen_c = make_node(f"other-{net}", c_id, port=1003)
    await asyncio.gather(a.start(), b.start(), c.start())
    await wait_until(lambda: b_id in seen_a.peers and a_id in seen_b.peers, within=5)

    got = seen_a.peers[b_id]
    assert (got.role, got.broker, got.source, got.version, got.round) == (
        "monitor",
        "mqtt://127.0.0.1:1002",
        "mdns",
        1,
        7,
    )
    assert got.meta == {"net": net, "addresses": ["127.0.0.1"], "pk": "ab12cd"}
    assert seen_b.peers[a_id].broker == "mqtt://127.0.0.1:1001"
    assert seen_b.peers[a_id].round is None
    assert a.instance_name == f"{a_id}@{net}.{SERVICE_TYPE}"

    # c sees a and b, they see c: each counts the other network and reports nothing of it.
    await wait_until(lambda: a.stats["other_network"] >= 1 and c.stats["other_network"] >= 2)
    await asyncio.sleep(0.3)  # on purpose: more records may arrive; none of c may be reported
    assert c_id not in {p.id for p in seen_a.all + seen_b.all}
    assert seen_c.all == []
    assert [p.id for p in a.peers()] == [b_id]
    assert not any(p.id == a_id for p in seen_a.all), "a node never reports itself"
    assert a.stats["duplicate_id"] == 0, "nor mistakes its own record for a duplicate"


async def test_two_networks_reusing_an_id_keep_their_peers(
    make_node: MakeNode, net: str, wait_until: WaitUntil
) -> None:
    """Both networks have a node `shared` (ids like n0, n1 repeat across networks): each
    announces under a name of its own network, so neither's record drops the other."""
    shared, watcher_id = uid("n"), uid("w")
    ours, _ = make_node(net, shared, port=3001)
    theirs, _ = make_node(f"other-{net}", shared, port=3002)
    watcher, seen = make_node(net, watcher_id, port=3003)
    await asyncio.gather(ours.start(), watcher.start())
    await wait_until(lambda: shared in seen.peers, within=5)
    await theirs.start()
    assert theirs.instance_name != ours.instance_name
    assert theirs.instance_name == f"{shared}@other-{net}.{SERVICE_TYPE}"  # not renamed
    await wait_until(lambda: watcher.stats["other_network"] >= 1, within=5)
    await asyncio.sleep(0.3)  # on purpose: a late record must not take our peer away
    assert [p.id for p in watcher.peers()] == [shared] and seen.gone == []
    assert seen.peers[shared].broker == "mqtt://127.0.0.1:3001"


async def test_close_sends_goodbye(make_node: MakeNode, net: str, wait_until: WaitUntil) -> None:
    a_id, b_id = uid("a"), uid("b")
    a, seen_a = make_node(net, a_id)
    b, _ = make_node(net, b_id)
    await asyncio.gather(a.start(), b.start())
    await wait_until(lambda: b_id in seen_a.peers, within=5)

    await b.close()
    # The goodbye, not expiry (the records' TTLs are minutes long).
    await wait_until(lambda: seen_a.gone == [b_id], within=10)
    assert a.peers() == []


async def test_browse_returns_the_peers_of_one_network_or_all(
    make_node: MakeNode, net: str
) -> None:
    ids = [uid("p"), uid("q")]
    other_id = uid("r")
    nodes = [make_node(net, ids[0])[0], make_node(net, ids[1], role="monitor")[0]]
    nodes.append(make_node(f"other-{net}", other_id)[0])
    await asyncio.gather(*(n.start() for n in nodes))

    mine, everyone = await asyncio.gather(
        browse(net, interfaces=LOOPBACK, duration=1.5),
        browse(None, interfaces=LOOPBACK, duration=1.5),
    )
    assert [(p.id, p.role) for p in mine] == sorted([(ids[0], "trainer"), (ids[1], "monitor")])
    ours = {p.id: p.meta["net"] for p in everyone if p.id in {*ids, other_id}}
    assert ours == {ids[0]: net, ids[1]: net, other_id: f"other-{net}"}


def _raw_txt(*entries: bytes) -> bytes:
    return b"".join(bytes([len(e)]) + e for e in entries)


async def test_malformed_records_are_counted_and_never_reported(
    make_node: MakeNode, net: str, wait_until: WaitUntil
) -> None:
    good = build_txt(net, uid("good"), role="trainer", broker_uri="mqtt://127.0.0.1:1883")
    missing_id = {k: v for k, v in good.items() if k != "id"}
    oversize = {**good, "id": uid("big"), "mqtt": "mqtt://" + "h" * 230 + ":1883"}
    garbage = _raw_txt(b"v=1", f"net={net}".encode(), b"id=\xff\xfe", b"role=trainer") + b"\xff\x00"
    future = {**good, "v": "2", "id": uid("future")}
    records: list[dict[str, str] | bytes] = [good, missing_id, oversize, garbage, future]

    observer, seen = make_node(net, None)
    await observer.start()
    async with AsyncZeroconf(interfaces=LOOPBACK) as raw:
        infos = [
            AsyncServiceInfo(
                SERVICE_TYPE,
                f"{uid('raw')}.{SERVICE_TYPE}",
                port=1883,
                properties=props,
                parsed_addresses=["127.0.0.1"],
            )
            for props in records
        ]
        broadcasts = await asyncio.gather(*(raw.async_register_service(i) for i in infos))
        await asyncio.gather(*broadcasts)
        await wait_until(lambda: good["id"] in seen.peers, within=5)
        await wait_until(
            lambda: observer.stats["malformed"] >= 3 and observer.stats["other_version"] >= 1
        )
        assert [p.id for p in seen.all] == [good["id"]]
    await wait_until(lambda: seen.gone == [good["id"]], within=10)  # the goodbye


async def test_same_id_twice_is_renamed_and_reported_once(
    make_node: MakeNode, net: str, wait_until: WaitUntil
) -> None:
    dup = uid("dup")
    first, _ = make_node(net, dup, port=2001)
    second, _ = make_node(net, dup, port=2002)
    observer, seen = make_node(net, None)
    await asyncio.gather(first.start(), observer.start())
    await second.start()  # probes after first announced: zeroconf renames it
    assert second.instance_name == f"{dup}@{net}-2.{SERVICE_TYPE}"

    await wait_until(lambda: observer.stats["duplicate_id"] >= 1, within=5)
    assert [p.broker for p in seen.all] == ["mqtt://127.0.0.1:2001"]
    await wait_until(lambda: first.stats["duplicate_id"] >= 1)  # it hears its id elsewhere

    await first.close()  # the renamed instance takes over; the id never looked gone
    await wait_until(lambda: seen.peers.get(dup, seen.all[0]).broker.endswith(":2002"))
    assert seen.gone == []


# -- pure record code -------------------------------------------------------------------------


def _props(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_build_and_parse_txt_round_trip() -> None:
    txt = build_txt("lab", "n1", role="trainer", broker_uri="mqtt://10.0.0.5:1883", round=4)
    assert txt == {
        "v": "1",
        "net": "lab",
        "id": "n1",
        "role": "trainer",
        "mqtt": "mqtt://10.0.0.5:1883",
        "round": "4",
    }
    peer = parse_txt(_props(txt), ["10.0.0.5", "fe80::1"], last_seen=9.0)
    assert (peer.id, peer.role, peer.broker, peer.round, peer.last_seen) == (
        "n1",
        "trainer",
        "mqtt://10.0.0.5:1883",
        4,
        9.0,
    )
    assert peer.meta == {"net": "lab", "addresses": ["10.0.0.5", "fe80::1"]}


def test_wildcard_broker_host_becomes_an_announced_address() -> None:
    txt = build_txt("lab", "n1", role="trainer", broker_uri="mqtt://0.0.0.0:1999")
    assert parse_txt(_props(txt), ["fe80::2", "192.168.1.7"]).broker == "mqtt://192.168.1.7:1999"
    with pytest.raises(RecordRejected, match="no address"):
        parse_txt(_props(txt), [])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": "2"}, "other_version"),
        ({"v": "one"}, "malformed"),
        ({"id": None}, "malformed"),
        ({"net": None}, "malformed"),
        ({"role": "boss"}, "malformed"),
        ({"mqtt": "http://x:1"}, "malformed"),
        ({"mqtt": "mqtt://" + "a" * 240}, "malformed"),
        ({"id": "a/b"}, "malformed"),
        ({"round": "-1"}, "malformed"),
        ({"round": "9" * 20}, "malformed"),
        ({"pk": "k" * 200}, "malformed"),
    ],
)
def test_parse_txt_rejects_bad_fields(change: dict[str, str | None], reason: str) -> None:
    props = _props(build_txt("lab", "n1", role="trainer", broker_uri="mqtt://10.0.0.5:1883"))
    for key, value in change.items():
        if value is None:
            del props[key.encode()]
        else:
            props[key.encode()] = value.encode()
    with pytest.raises(RecordRejected) as info:
        parse_txt(props, ["10.0.0.5"])
    assert info.value.reason == reason


def test_parse_txt_rejects_non_utf8_and_valueless_keys() -> None:
    props = _props(build_txt("lab", "n1", role="trainer", broker_uri="mqtt://h:1"))
    with pytest.raises(RecordRejected, match="UTF-8"):
        parse_txt({**props, b"id": b"\xff"}, [])
    with pytest.raises(RecordRejected, match="missing"):
        parse_txt({**props, b"role": None}, [])


def test_build_txt_refuses_what_cannot_be_announced() -> None:
    with pytest.raises(ValueError, match="role"):
        build_txt("lab", "n1", role="boss", broker_uri="mqtt://h:1")
    with pytest.raises(ValueError, match="longer"):
        build_txt("lab", "n1", role="trainer", broker_uri="mqtt://" + "h" * 250 + ":1")
    with pytest.raises(ValueError, match="node id"):
        build_txt("lab", "a/b", role="trainer", broker_uri="mqtt://h:1")


def test_instance_label_fits_one_dns_label() -> None:
    assert instance_label("node-1") == "node-1"
    dotted, long = instance_label("host.lan-1"), instance_label("é" * 64)
    assert "." not in dotted and dotted.startswith("host-lan-1-")
    assert len(long.encode()) <= 60
    assert instance_label("é" * 64) == long != instance_label("é" * 63)


def test_peers_json_and_table_have_the_cli_fields() -> None:
    peers = [
        PeerInfo("n1", "trainer", "mqtt://10.0.0.5:1883", "mdns", round=3, meta={"net": "lab"}),
        PeerInfo("n2", "monitor", "mqtt://h:1", "mdns", meta={"net": "lab", "addresses": ["::1"]}),
    ]
    rows = peers_json(peers)
    assert rows == [
        {
            "id": "n1",
            "role": "trainer",
            "network": "lab",
            "address": "10.0.0.5",
            "broker": "mqtt://10.0.0.5:1883",
            "version": 1,
            "round": 3,
            "pk": None,
            "brokers": ["mqtt://10.0.0.5:1883"],
        },
        {
            "id": "n2",
            "role": "monitor",
            "network": "lab",
            "address": "::1",
            "broker": "mqtt://h:1",
            "version": 1,
            "round": None,
            "pk": None,
            "brokers": ["mqtt://h:1"],
        },
    ]
    assert json.loads(json.dumps(rows)) == rows
    table = format_peers_table(peers)
    assert [c.header for c in table.columns] == list(PEER_FIELDS)
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "n1" in text and "10.0.0.5" in text and "monitor" in text
