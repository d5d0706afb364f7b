"""The DNS-SD record of a p2pfl node: instance label, TXT encoding, and defensive TXT parsing.

Pure functions, no sockets: :mod:`p2pfl.discovery.mdns` announces what :func:`build_txt` makes
and reports what :func:`parse_txt` accepts. TXT keys: ``v`` (protocol version), ``net``, ``id``,
``role``, ``mqtt`` (home broker URI), optional ``pk`` (key fingerprint) and ``round``. Each entry
is one DNS character-string, at most 255 bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence

from p2pfl.discovery.peerview import ROLES, PeerInfo
from p2pfl.protocol.envelope import PROTOCOL_VERSION
from p2pfl.protocol.topics import validate_name
from p2pfl.transport.address import BrokerAddress, parse_broker_uri

SERVICE_TYPE = "_p2pfl._tcp.local."
MAX_TXT_ENTRY = 255  # one DNS character-string: a length byte, then the bytes
MAX_BROKER_URI = 200
MAX_PUBLIC_KEY = 128
MAX_LABEL = 60  # a DNS label is 63 bytes; room for the "-2" zeroconf appends on a clash
REJECT_REASONS = ("other_network", "other_version", "malformed", "duplicate_id", "unresolved")


class RecordRejected(Exception):
    """A resolved mDNS record we do not report; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def instance_label(node_id: str) -> str:
    """The DNS-SD instance label for ``node_id``: the id itself when it fits in one DNS label.

    Dots would split the label and ids may exceed its length; such ids get a readable prefix plus
    a digest, which is fine because receivers read the id from TXT.
    """
    label = node_id.replace(".", "-")
    if label == node_id and len(label.encode()) <= MAX_LABEL:
        return label
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
    prefix = label.encode()[: MAX_LABEL - 9].decode(errors="ignore")
    return f"{prefix}-{digest}"


def build_txt(
    network: str,
    node_id: str,
    *,
    role: str,
    broker_uri: str,
    public_key: str | None = None,
    round: int | None = None,
) -> dict[str, str]:
    """The TXT record this node announces; ValueError when a field is invalid or too long."""
    validate_name(network, "network name")
    validate_name(node_id, "node id")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    parse_broker_uri(broker_uri)
    if len(broker_uri) > MAX_BROKER_URI:
        raise ValueError(f"broker URI {broker_uri[:32]!r}... is longer than {MAX_BROKER_URI}")
    txt = {"v": str(PROTOCOL_VERSION), "net": network, "id": node_id, "role": role}
    txt["mqtt"] = broker_uri
    if public_key is not None:
        if len(public_key) > MAX_PUBLIC_KEY or not public_key.isascii():
            raise ValueError(f"public key must be ASCII, at most {MAX_PUBLIC_KEY} characters")
        txt["pk"] = public_key
    if round is not None:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        txt["round"] = str(round)
    for key, value in txt.items():
        if len(key.encode()) + 1 + len(value.encode()) > MAX_TXT_ENTRY:
            raise ValueError(f"TXT entry {key!r} is longer than {MAX_TXT_ENTRY} bytes")
    return txt


def _text(props: Mapping[bytes, bytes | None], key: str, limit: int, *, required: bool) -> str:
    raw = props.get(key.encode())
    if raw is None:
        if required:
            raise RecordRejected("malformed", f"TXT {key!r} missing")
        return ""
    if len(raw) > limit:
        raise RecordRejected("malformed", f"TXT {key!r} longer than {limit} bytes")
    try:
        value = raw.decode()
    except UnicodeDecodeError:
        raise RecordRejected("malformed", f"TXT {key!r} is not UTF-8") from None
    if not value.isprintable():
        raise RecordRejected("malformed", f"TXT {key!r} has control characters")
    return value


def _small_int(text: str, key: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 12):
        raise RecordRejected("malformed", f"TXT {key!r} is not a small non-negative integer")
    return int(text)


def _broker_candidates(uri: str, addresses: Sequence[str]) -> tuple[str, ...]:
    """Every URI the announced broker may be reached at, the TXT one first.

    A broker announced at an unspecified host (a wildcard bind) is reached at the record's
    addresses; one announced at one of the record's addresses may be reached at the others of
    the same IP version too (a multi-homed host). A broker named by host name is elsewhere (an
    external broker, or a name for NAT): only that name.
    """
    try:
        broker = parse_broker_uri(uri)
    except ValueError as exc:
        raise RecordRejected("malformed", str(exc)) from None
    try:
        ip = ipaddress.ip_address(broker.host)
    except ValueError:
        return (broker.uri,)  # a host name
    if not ip.is_unspecified and broker.host not in addresses:
        return (broker.uri,)
    # an IPv4 broker (the embedded one) is not reached over IPv6, nor the other way round
    same_family = [a for a in addresses if (":" in a) == (ip.version == 6)]
    others = sorted(
        (a for a in same_family if a != broker.host),
        key=lambda a: (ipaddress.ip_address(a).is_loopback, a),
    )
    hosts = others if ip.is_unspecified else [broker.host, *others]
    if not hosts:
        raise RecordRejected("malformed", f"broker {uri!r} has no host and no address")
    return tuple(
        BrokerAddress(host=h, port=broker.port, tls=broker.tls).uri for h in dict.fromkeys(hosts)
    )


def parse_txt(
    props: Mapping[bytes, bytes | None], addresses: Sequence[str], last_seen: float = 0.0
) -> PeerInfo:
    """A peer from a resolved TXT record and its addresses; RecordRejected when unusable.

    The version is checked first, so a future protocol may change every other field. The
    network is in ``meta["net"]``, the sorted addresses in ``meta["addresses"]``, a key
    fingerprint in ``meta["pk"]``. Unknown keys are ignored.
    """
    version = _small_int(_text(props, "v", 4, required=True), "v")
    if version != PROTOCOL_VERSION:
        raise RecordRejected("other_version", f"protocol version {version}")
    net = _text(props, "net", 256, required=True)
    node_id = _text(props, "id", 256, required=True)
    for value, what in ((net, "network name"), (node_id, "node id")):
        try:
            validate_name(value, what)
        except ValueError as exc:
            raise RecordRejected("malformed", str(exc)) from None
    role = _text(props, "role", 16, required=True)
    if role not in ROLES:
        raise RecordRejected("malformed", f"unknown role {role!r}")
    brokers = _broker_candidates(_text(props, "mqtt", MAX_BROKER_URI, required=True), addresses)
    round_text = _text(props, "round", 12, required=False)
    meta: dict[str, object] = {"net": net, "addresses": sorted(addresses)}
    public_key = _text(props, "pk", MAX_PUBLIC_KEY, required=False)
    if public_key:
        meta["pk"] = public_key
    return PeerInfo(
        id=node_id,
        role=role,
        broker=brokers[0],
        brokers=brokers,
        source="mdns",
        last_seen=last_seen,
        version=version,
        round=_small_int(round_text, "round") if round_text else None,
        meta=meta,
    )
