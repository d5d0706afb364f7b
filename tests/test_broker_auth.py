"""The embedded broker's lock: key-based logins, the topic ACL, packet and retained limits.

Unit tests of `BrokerGate`, then a real amqtt broker with the gate and real MQTT clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.broker_auth import LOGIN_TTL, BrokerGate, login_password, read_login
from p2pfl.identity import Identity, TrustedKeys
from p2pfl.protocol import topics
from p2pfl.protocol.errors import ProtocolError
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.trust import Trust

pytestmark = pytest.mark.timeout(60)

NET = "lab"
URI = "mqtt://127.0.0.1:1883"
NOW = 1_800_000_000.0


def gate(trust: Trust | None = None, owner: Identity | None = None, **kw: object) -> BrokerGate:
    return BrokerGate(
        NET,
        trust=trust if trust is not None else Trust("tofu"),
        own={URI},
        owner=owner,
        owner_id="me" if owner is not None else None,
        max_packet=1 << 20,
        clock=lambda: NOW,
        **kw,  # type: ignore[arg-type]
    )


def login(identity: Identity, user: str, audience: str = URI, at: float = NOW) -> str:
    return login_password(identity, user, audience, now=at)


# ---- tokens -------------------------------------------------------------------------------


def test_a_token_round_trips_and_names_its_key_and_audience() -> None:
    alice = Identity.generate()
    got = read_login("alice", login(alice, "alice"), now=NOW)
    assert got.pk == alice.public_raw
    assert got.audience == URI
    assert got.certificate is None


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("hunter2", "unsigned"),
        ("p2pfl1.!!!", "malformed"),
        ("p2pfl1." + base64.urlsafe_b64encode(msgpack.packb([1, 2])).decode(), "malformed"),
        ("p2pfl1." + "A" * 4000, "oversize"),
    ],
)
def test_a_password_that_is_not_a_token_is_refused(password: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        read_login("alice", password, now=NOW)


def test_a_token_for_another_user_or_a_tampered_one_does_not_verify() -> None:
    alice = Identity.generate()
    token = login(alice, "alice")
    with pytest.raises(ProtocolError, match="bad signature"):
        read_login("mallory", token, now=NOW)
    ts, _aud, pk, sig, cert = msgpack.unpackb(base64.urlsafe_b64decode(token[7:]))
    forged = msgpack.packb([ts, "mqtt://10.0.0.9:1883", pk, sig, cert])
    with pytest.raises(ProtocolError, match="bad signature"):
        read_login("alice", "p2pfl1." + base64.urlsafe_b64encode(forged).decode(), now=NOW)


def test_an_old_token_is_refused() -> None:
    alice = Identity.generate()
    with pytest.raises(ProtocolError, match="replay"):
        read_login("alice", login(alice, "alice", at=NOW - LOGIN_TTL - 5), now=NOW)


@given(st.text(max_size=300))
def test_any_password_is_a_token_or_a_protocol_error(password: str) -> None:
    with contextlib.suppress(ProtocolError):
        read_login("alice", "p2pfl1." + password, now=NOW)


@given(st.binary(max_size=300))
def test_any_token_bytes_are_a_login_or_a_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        read_login("alice", "p2pfl1." + base64.urlsafe_b64encode(raw).decode(), now=NOW)


# ---- logins -----------------------------------------------------------------------------


def test_anonymous_and_password_clients_are_refused_and_counted() -> None:
    g = gate()
    assert not g.authenticate(None, None, "x", None)
    assert not g.authenticate("alice", "hunter2", "alice-1", None)
    assert g.refused == {"unsigned": 2}


def test_a_key_login_is_pinned_under_tofu_and_another_key_for_the_id_is_refused() -> None:
    g = gate()
    alice, mallory = Identity.generate(), Identity.generate()
    assert g.authenticate("alice", login(alice, "alice"), "alice-1", None)
    assert g.authenticate("alice", login(alice, "alice"), "alice-2", None)
    assert not g.authenticate("alice", login(mallory, "alice"), "alice-3", None)
    assert g.refused == {"untrusted": 1}


def test_a_token_made_for_another_broker_is_refused() -> None:
    alice = Identity.generate()
    g = gate()
    assert not g.authenticate("alice", login(alice, "alice", "mqtt://10.9.9.9:1883"), "alice", None)
    assert g.refused == {"untrusted": 1}


def test_allowlist_admits_only_trusted_keys(tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    TrustedKeys(tmp_path).add("alice", alice.public)
    g = gate(Trust("allowlist", state_dir=tmp_path))
    assert g.authenticate("alice", login(alice, "alice"), "alice-1", None)
    assert not g.authenticate("bob", login(bob, "bob"), "bob-1", None)


def test_the_owner_logs_in_with_its_own_key_only() -> None:
    me, other = Identity.generate(), Identity.generate()
    g = gate(Trust("allowlist"), owner=me)  # its own key is in no list, and needs none
    assert g.authenticate("me", login(me, "me"), "me-abc", None)
    assert not g.authenticate("me", login(other, "me"), "me-abd", None)


def test_a_client_id_or_a_will_of_another_node_is_refused() -> None:
    alice = Identity.generate()
    g = gate()
    assert not g.authenticate("alice", login(alice, "alice"), "bob-1", None)
    bob_presence = topics.presence(NET, "bob")
    assert not g.authenticate("alice", login(alice, "alice"), "alice-1", bob_presence)
    own = topics.presence(NET, "alice")
    assert g.authenticate("alice", login(alice, "alice"), "alice-1", own)
    assert g.refused == {"acl": 2}


def test_open_trust_lets_anyone_in() -> None:
    g = gate(Trust("open"))
    assert g.authenticate(None, None, "x", None)
    assert g.allowed(None, "anything/at/all", "publish")


# ---- ACL --------------------------------------------------------------------------------

INBOX_BOB = topics.inbox(NET, "bob")
INBOX_ALICE = topics.inbox(NET, "alice")


@pytest.mark.parametrize(
    ("topic", "action", "ok"),
    [
        (INBOX_BOB, "publish", True),  # models to another node
        (INBOX_ALICE, "publish", False),  # not to itself
        (topics.presence(NET, "alice"), "publish", True),
        (topics.telemetry(NET, "alice"), "publish", True),
        (topics.log(NET, "alice"), "publish", True),
        (topics.presence(NET, "bob"), "publish", False),  # no forged records
        (topics.telemetry(NET, "bob"), "publish", False),
        (topics.inbox("other-net", "bob"), "publish", False),
        ("something/else", "publish", False),
        (INBOX_ALICE, "subscribe", True),
        (INBOX_BOB, "subscribe", False),  # nobody reads another node's models
        (topics.presence_all(NET), "subscribe", True),
        (topics.telemetry_all(NET), "subscribe", True),
        (topics.log_all(NET), "subscribe", True),
        (f"p2pfl/v1/{NET}/#", "subscribe", False),
        (f"p2pfl/v1/{NET}/node/+/inbox", "subscribe", False),
        ("#", "subscribe", False),
        (INBOX_BOB, "receive", False),
        (topics.presence(NET, "bob"), "receive", True),
        # a sampled network: a record of one's own in a seed bucket, and reading one bucket
        (topics.seed(NET, 3, "alice"), "publish", True),
        (topics.seed(NET, 3, "bob"), "publish", False),  # no forged seeds
        (f"p2pfl/v1/{NET}/seed/+/alice", "publish", False),
        (topics.seed_bucket(NET, 3), "subscribe", True),
        (f"p2pfl/v1/{NET}/seed/+/+", "subscribe", False),  # one bucket at a time
        (f"p2pfl/v1/{NET}/seed/3/#", "subscribe", False),
        (topics.seed(NET, 3, "bob"), "receive", True),
    ],
)
def test_acl(topic: str, action: str, ok: bool) -> None:
    assert gate().allowed("alice", topic, action) is ok  # type: ignore[arg-type]


# ---- a real broker ------------------------------------------------------------------------


@pytest.fixture
async def locked() -> AsyncIterator[tuple[EmbeddedBroker, BrokerGate]]:
    g = BrokerGate(NET, trust=Trust("tofu"), max_packet=256 * 1024, max_retained=4)
    broker = EmbeddedBroker(gate=g)
    async with broker:
        g.own = {broker.uri}
        yield broker, g


def client(broker: EmbeddedBroker, user: str | None, identity: Identity | None = None,
           **kw: object) -> aiomqtt.Client:  # fmt: skip
    password = (
        None if identity is None or user is None else login_password(identity, user, broker.uri)
    )
    return aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=f"{user or 'anon'}-{id(kw)}", username=user,
        password=password, timeout=5, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_an_anonymous_client_is_refused_at_connect(locked) -> None:  # type: ignore[no-untyped-def]
    broker, g = locked
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed|[Bb]ad user"):
        async with client(broker, None):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with client(
            broker,
            "alice",
            None,
        ):
            pass
    assert g.refused["unsigned"] >= 1


async def test_a_logged_in_node_delivers_only_what_the_acl_allows(locked) -> None:  # type: ignore[no-untyped-def]
    broker, g = locked
    alice, bob = Identity.generate(), Identity.generate()
    async with client(broker, "bob", bob) as b, client(broker, "alice", alice) as a:
        await b.subscribe(topics.inbox(NET, "bob"), qos=1)
        await b.subscribe(topics.presence_all(NET), qos=1)
        await a.subscribe(topics.inbox(NET, "bob"), qos=1)  # refused: bob's models are bob's
        await a.publish(topics.presence(NET, "carol"), b"forged", qos=1)  # refused
        await a.publish(topics.inbox(NET, "bob"), b"model", qos=1)
        await a.publish(topics.presence(NET, "alice"), b"alice here", qos=1)
        got: list[tuple[str, bytes]] = []
        async with asyncio.timeout(5):
            async for message in b.messages:
                got.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]
                if len(got) == 2:
                    break
        assert got == [(topics.inbox(NET, "bob"), b"model"),
                       (topics.presence(NET, "alice"), b"alice here")]  # fmt: skip
        with pytest.raises(TimeoutError):  # alice got nothing of bob's inbox
            async with asyncio.timeout(0.5):
                async for _ in a.messages:
                    break
    assert g.refused["acl"] == 2


async def test_an_oversize_publish_is_cut_off_and_the_broker_keeps_serving(locked) -> None:  # type: ignore[no-untyped-def]
    broker, g = locked
    alice, bob = Identity.generate(), Identity.generate()
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, "alice", alice) as a:
            await a.publish(topics.inbox(NET, "bob"), b"x" * (1 << 20), qos=1, timeout=2)
    assert g.refused["oversize"] == 1
    async with client(broker, "bob", bob) as b, client(broker, "alice", alice) as a:
        await b.subscribe(topics.inbox(NET, "bob"), qos=1)
        await a.publish(topics.inbox(NET, "bob"), b"small", qos=1)
        async with asyncio.timeout(5):
            async for message in b.messages:
                assert message.payload == b"small"
                break


async def test_retained_messages_beyond_the_budget_are_not_kept(locked, wait_until) -> None:  # type: ignore[no-untyped-def]
    broker, g = locked
    for i in range(6):
        user = f"n{i}"
        async with client(broker, user, Identity.generate()) as c:
            await c.publish(topics.presence(NET, user), b"here", qos=1, retain=True)
    # the broker keeps (or refuses) a retained message after its PUBACK
    await wait_until(lambda: g.refused["retained"] >= 2)
    assert g.refused["retained"] == 2
    seen: set[str] = set()
    async with client(broker, "watcher", Identity.generate()) as w:
        await w.subscribe(topics.presence_all(NET), qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in w.messages:
                    seen.add(str(message.topic))
    assert seen == {topics.presence(NET, f"n{i}") for i in range(4)}
