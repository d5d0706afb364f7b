"""Pure parts of the transport: MQTT topic matching and broker URI parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.transport.address import BrokerAddress, TlsOptions, parse_broker_uri
from p2pfl.transport.base import topic_matches, validate_pattern, validate_topic

MATCH_TABLE = [
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/+", "a/b/c", False),
    ("a/+", "a/", True),  # '+' matches an empty level
    ("+/+", "/x", True),
    ("a/#", "a", True),  # '#' includes the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("#", "a/b", True),
    ("#", "/", True),
    ("#", "$SYS/x", False),  # wildcard-first filters skip '$' topics
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("p2pfl/v1/net/presence/+", "p2pfl/v1/net/presence/n1", True),
    ("p2pfl/v1/net/presence/+", "p2pfl/v1/net/presence/n1/x", False),
    ("p2pfl/v1/+/node/+/inbox", "p2pfl/v1/lab/node/n7/inbox", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_topic_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("pattern", ["", "a/#/b", "a#", "a/b+", "+a/b", "##"])
def test_invalid_filters_are_rejected(pattern: str) -> None:
    with pytest.raises(ValueError, match="filter"):
        topic_matches(pattern, "a/b")


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b"])
def test_invalid_topics_are_rejected(topic: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        validate_topic(topic)


level = st.text(alphabet="abc$", max_size=3).filter(lambda s: "$" not in s[1:])
topics = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)


@settings(max_examples=200)
@given(topics, st.data())
def test_wildcard_properties(topic: str, data: st.DataObject) -> None:
    levels = topic.split("/")
    dollar = topic.startswith("$")
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) is not dollar
    # Replacing any level after the first by '+' still matches; truncating and adding '#' too.
    i = data.draw(st.integers(min_value=0, max_value=len(levels) - 1))
    plus = "/".join([*levels[:i], "+", *levels[i + 1 :]])
    validate_pattern(plus)
    assert topic_matches(plus, topic) is (i > 0 or not dollar)
    prefix = "/".join([*levels[:i], "#"])
    assert topic_matches(prefix, topic) is (i > 0 or not dollar)
    # One level more or less never matches without '#'.
    assert not topic_matches(topic + "/x", topic)
    assert not topic_matches(topic, topic + "/x")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883, tls=False)),
        ("mqtt://broker.lan", BrokerAddress("broker.lan", 1883, tls=False)),
        ("mqtts://broker.lan", BrokerAddress("broker.lan", 8883, tls=True)),
        ("MQTTS://Broker.Lan:9000/", BrokerAddress("broker.lan", 9000, tls=True)),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884, tls=False)),
        ("  mqtt://h:1  ", BrokerAddress("h", 1, tls=False)),
    ],
)
def test_parse_broker_uri(uri: str, expected: BrokerAddress) -> None:
    address = parse_broker_uri(uri)
    assert address == expected
    assert parse_broker_uri(address.uri) == address  # the canonical URI round-trips


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "non-empty"),
        ("127.0.0.1:1883", "no scheme"),
        ("http://h:80", "use mqtt:// or mqtts://"),
        ("ws://h:80", "use mqtt:// or mqtts://"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:0", "invalid port"),
        ("mqtt://h:70000", "invalid port"),
        ("mqtt://h:abc", "invalid port"),
        ("mqtt://h:", "empty port"),
        ("mqtt://user:pw@h:1883", "credentials"),
        ("mqtt://h:1883/topic", "no path"),
        ("mqtt://h:1883?x=1", "no path"),
        ("mqtt://[::1:1883", "malformed"),
    ],
)
def test_parse_broker_uri_errors_are_readable(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_broker_uri(uri)


def test_tls_cert_and_key_go_together() -> None:
    assert TlsOptions(ca="ca.pem").cert is None
    with pytest.raises(ValueError, match="together"):
        TlsOptions(cert="c.pem")
