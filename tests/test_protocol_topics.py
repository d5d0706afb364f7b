"""Topic names of wire protocol v1."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.protocol import ProtocolError, topics, validate_name

# Printable, non-space characters other than the MQTT level separator and wildcards.
names = st.text(
    st.characters(
        blacklist_categories=("C", "Z"),  # control, format, surrogate, separators (spaces)
        blacklist_characters="/+#",
    ),
    min_size=1,
    max_size=64,
)


@given(net=names, node_id=names)
def test_every_topic_parses_back_to_its_parts(net: str, node_id: str) -> None:
    assert topics.parse(topics.inbox(net, node_id)) == (net, "inbox", node_id)
    assert topics.parse(topics.presence(net, node_id)) == (net, "presence", node_id)
    assert topics.parse(topics.telemetry(net, node_id)) == (net, "telemetry", node_id)
    assert topics.parse(topics.log(net, node_id)) == (net, "log", node_id)
    # a seed bucket carries a presence record of its last level's node
    assert topics.parse(topics.seed(net, 7, node_id)) == (net, "presence", node_id)


def test_topic_layout_matches_the_design() -> None:
    assert topics.inbox("lab", "n1") == "p2pfl/v1/lab/node/n1/inbox"
    assert topics.presence("lab", "n1") == "p2pfl/v1/lab/presence/n1"
    assert topics.telemetry("lab", "n1") == "p2pfl/v1/lab/telemetry/n1"
    assert topics.log("lab", "n1") == "p2pfl/v1/lab/log/n1"
    assert topics.presence_all("lab") == "p2pfl/v1/lab/presence/+"
    assert topics.telemetry_all("lab") == "p2pfl/v1/lab/telemetry/+"
    assert topics.log_all("lab") == "p2pfl/v1/lab/log/+"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("x" * 65, "longer than 64"),
        ("a/b", "'/'"),
        ("a+", "'+'"),
        ("#", "'#'"),
        ("a b", "' '"),
        ("a\tb", "'\\t'"),
        ("a\x00", "'\\x00'"),
        ("a\u200bb", "'\\u200b'"),  # zero-width space: a format character
    ],
)
def test_bad_names_are_refused_with_a_readable_message(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="node id") as info:
        validate_name(value, "node id")
    assert fragment in str(info.value)


def test_names_at_the_limit_are_accepted() -> None:
    assert validate_name("x" * 64, "network name") == "x" * 64
    assert validate_name("nœud-1.é", "node id") == "nœud-1.é"


def test_builders_refuse_names_that_would_change_the_topic() -> None:
    with pytest.raises(ValueError, match="node id"):
        topics.inbox("lab", "+")
    with pytest.raises(ValueError, match="network name"):
        topics.presence_all("lab/#")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "foo/bar",
        "p2pfl/v2/lab/presence/n1",
        "p2pfl/v1/lab/node/n1/outbox",
        "p2pfl/v1/lab/node/n1",
        "p2pfl/v1/lab/presence/n1/extra",
        "p2pfl/v1/lab/presence/",
        "p2pfl/v1//presence/n1",
        "p2pfl/v1/lab/status/n1",
    ],
)
def test_foreign_topics_are_a_protocol_error(topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        topics.parse(topic)
    assert info.value.reason
