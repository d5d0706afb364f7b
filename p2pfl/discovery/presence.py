"""MQTT presence: the retained join record a node publishes, and the offline record of its will.

A node publishes ``presence`` (online, with its role, home broker and round) on
``p2pfl/v1/<net>/presence/<id>``, retained, on its home broker and on the home broker of every
peer it knows, and repeats it every third of the presence TTL as a heartbeat. Each of those
connections carries a will with the ``offline`` record, so a crash is seen at once by every
broker the node was connected to; a graceful stop publishes ``bye``.

Under ``--trust ca`` every record carries the node's membership certificate (``cert``), which
is how peers admit its key; :func:`presence_certificate` reads it once the signature checked.
Under ``--secure-aggregation`` it carries ``xk``, the node's X25519 key for mask agreement
(``p2pfl.secagg``): signed with the identity key like the rest of the record.

A node that does not train now (``--when`` says it is not eligible, or it was paused by hand)
says why in ``paused`` (``window``, ``manual``, ...): peers keep it in their view but plan no
rounds with it. A record without the field is a node that trains.

``run`` is the run the node takes part in (`p2pfl.run_identity`): a run id of at most 64 of
``A-Za-z0-9._+-``; a record without it is a node of an unknown run (an older version).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from p2pfl.certs import MAX_CERT
from p2pfl.protocol.envelope import (
    PROTOCOL_VERSION,
    BytesLike,
    Envelope,
    Signer,
    pack_envelope,
    unpack_envelope,
)
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import MAX_RUN, is_run_id
from p2pfl.transport.address import parse_broker_uri

ROLES = ("trainer", "monitor")
MAX_PK = 128  # a key fingerprint, as in the mDNS TXT record
MAX_BROKERS = 16  # addresses a record may list: a host's interfaces, not a network
MAX_PRESENCE = 64 * 1024
MAX_FIELDS = 64  # a presence record is a flat map of a few fields: no long containers in it
XK_SIZE = 32  # an X25519 public key, raw
MAX_PAUSED = 32  # why a node is paused: a word such as window or manual


@dataclass(frozen=True)
class PresenceRecord:
    """What a presence message says about its sender."""

    node_id: str
    online: bool
    role: str = "trainer"
    broker: str = ""
    round: int | None = None
    graceful: bool = False  # a `bye`: the node stopped on purpose (not its will after a crash)
    brokers: tuple[str, ...] = ()  # every address of the node's broker, in its order
    pk: str = ""  # the fingerprint of the node's public key
    cert: bytes | None = None  # the node's membership certificate (--trust ca)
    xk: bytes | None = None  # the node's X25519 key for secure aggregation masks
    paused: str | None = None  # why the node does not train now; None: it trains
    run: str | None = None  # the run the node takes part in; None: unknown (older version)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The broker URIs to try, in order (``broker`` alone for older records)."""
        return self.brokers or ((self.broker,) if self.broker else ())


def encode_presence(
    net: str,
    node_id: str,
    seq: int,
    *,
    online: bool,
    graceful: bool = True,
    role: str,
    broker: str,
    brokers: Sequence[str] = (),
    round: int | None = None,
    pk: str | None = None,
    signer: Signer | None = None,
    cert: bytes | None = None,
    xk: bytes | None = None,
    paused: str | None = None,
    run: str | None = None,
) -> bytes:
    """The presence envelope of `node_id`: online, a graceful `bye`, or (``graceful=False``)
    the offline record a will carries, which says the node died rather than stopped.

    ``brokers`` lists every address of the node's broker (``broker`` is the first of them);
    ``cert`` is the node's membership certificate; ``xk`` its X25519 key for secure
    aggregation; ``paused`` why the node does not train now; ``run`` the run it is in.
    """
    body: dict[str, str | int | list[str] | bytes] = {
        "state": "online" if online else "offline",
        "role": role,
        "broker": broker,
    }
    if len(brokers) > 1:
        body["brokers"] = list(brokers)
    if round is not None:
        body["round"] = round
    if pk:
        body["pk"] = pk
    if cert is not None:
        body["cert"] = cert
    if xk is not None:
        body["xk"] = xk
    if paused is not None:
        body["paused"] = paused
    if run:
        body["run"] = run
    env = Envelope(
        v=PROTOCOL_VERSION,
        kind="presence" if online else "bye" if graceful else "will",
        net=net,
        src=node_id,
        seq=seq,
        ts=time.time(),
        body=body,
    )
    return bytes(pack_envelope(env, signer))


def parse_presence(env: Envelope) -> PresenceRecord:
    """Validate a presence/bye envelope; ProtocolError when it is not one."""
    if env.kind not in ("presence", "bye", "will"):
        raise ProtocolError(f"expected a presence record, got kind {env.kind!r}")
    body = env.body
    if not isinstance(body, dict):
        raise ProtocolError("presence body must be a map")
    state = body.get("state", "offline" if env.kind != "presence" else None)
    if state not in ("online", "offline"):
        raise ProtocolError(f"presence state must be online or offline, got {state!r}")
    role = body.get("role", "trainer")
    if role not in ROLES:
        raise ProtocolError(f"unknown role {role!r}")
    broker = body.get("broker", "")
    _check_broker(broker)
    brokers = body.get("brokers", [])
    if not isinstance(brokers, list) or len(brokers) > MAX_BROKERS:
        raise ProtocolError(f"presence brokers must be a list of at most {MAX_BROKERS}")
    for uri in brokers:
        _check_broker(uri)
    rnd = body.get("round")
    if rnd is not None and (not isinstance(rnd, int) or rnd < 0 or not math.isfinite(rnd)):
        raise ProtocolError(f"presence round must be a non-negative integer, got {rnd!r}")
    pk = body.get("pk", "")
    if not isinstance(pk, str) or len(pk) > MAX_PK or not pk.isascii() or not pk.isprintable():
        raise ProtocolError("presence pk must be a short printable ASCII string")
    cert = body.get("cert")
    if cert is not None and (not isinstance(cert, bytes) or len(cert) > MAX_CERT):
        raise ProtocolError(f"presence cert must be at most {MAX_CERT} bytes")
    xk = body.get("xk")
    if xk is not None and (not isinstance(xk, bytes) or len(xk) != XK_SIZE):
        raise ProtocolError(f"presence xk must be {XK_SIZE} bytes")
    paused = body.get("paused")
    if paused is not None and not _is_reason(paused):
        raise ProtocolError(f"presence paused must be a printable word of at most {MAX_PAUSED}")
    run = body.get("run")
    if run is not None and not is_run_id(run):
        raise ProtocolError(f"presence run must be a run id of at most {MAX_RUN} characters")
    online = env.kind == "presence" and state == "online"
    return PresenceRecord(
        node_id=env.src,
        online=online,
        role=role,
        broker=broker,
        round=rnd,
        graceful=env.kind == "bye",
        brokers=tuple(b for b in brokers if b),
        pk=pk,
        cert=cert,
        xk=xk,
        paused=paused,
        run=run,
    )


def _is_reason(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_PAUSED
        and value.isascii()
        and value.isprintable()
    )


def presence_certificate(data: BytesLike, *, max_size: int = MAX_PRESENCE) -> bytes | None:
    """The certificate a presence message carries (None: none); ProtocolError when the message
    cannot be decoded. For ``Trust.check(cert=...)``: call it only once the signature checked."""
    env = unpack_envelope(data, max_size=max_size, max_container_len=MAX_FIELDS)
    cert = env.body.get("cert")
    if cert is not None and (not isinstance(cert, bytes) or len(cert) > MAX_CERT):
        raise ProtocolError(f"presence cert must be at most {MAX_CERT} bytes")
    return cert


def _check_broker(uri: object) -> None:
    if not isinstance(uri, str) or len(uri) > 512:
        raise ProtocolError("presence broker must be a short string")
    if uri and not uri.startswith("memory://"):
        try:
            parse_broker_uri(uri)
        except ValueError as exc:
            raise ProtocolError(f"presence broker: {exc}") from None
