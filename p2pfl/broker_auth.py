"""Who may use a node's embedded broker, and for what: key-based logins and a topic ACL.

A node's broker is reachable by anyone on its LAN, so it is locked down (DESIGN.md, Trust):

- **Login.** MQTT username = the client's node id; password = a login token signed with that
  node's key (:func:`login_password`): ``p2pfl1.`` + base64url of msgpack
  ``[ts, audience, public key, signature, certificate or nil]``. The signature covers
  :data:`LOGIN_DOMAIN`, the username, the audience (the broker URI the client dialled) and the
  time, so a token is good for a couple of minutes at one broker only: a fake broker that
  records it cannot replay it to a real one. The key must be acceptable for that id under the
  node's trust policy (tofu pins it, allowlist needs it in ``trusted_keys``, ca a
  certificate). Anonymous clients and anything else are refused at CONNECT.
- **Topic ACL.** An authenticated node publishes only to *other* nodes' inbox topics, to its
  own presence/telemetry/log topics (its will too) and as itself to a seed bucket (sampled
  networks), subscribes only to its own inbox, to presence/telemetry/log (what monitors read)
  and to seed buckets, and only within the broker's network. A message
  is delivered to a client only on topics it may subscribe to.
- **Limits** (enforced by ``p2pfl.transport.amqtt_gate``): a packet larger than the node's
  message limit is refused before it is read; retained messages are capped in count and bytes.

:class:`BrokerGate` holds these decisions and counts refusals; it is called from the broker's
own thread, and reports each refusal through ``on_refuse`` (set by the daemon to count them
with the node's other rejections).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Literal

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pfl.identity import Identity
from p2pfl.protocol import topics
from p2pfl.protocol.errors import ProtocolError
from p2pfl.trust import Trust

log = logging.getLogger(__name__)

LOGIN_DOMAIN = b"p2pfl-login-v1\0"
TOKEN_PREFIX = "p2pfl1."
LOGIN_TTL = 120.0
"""Seconds a login token is good for, either side of the broker's clock."""
MAX_TOKEN = 2048
"""Characters of a login password: a key, a signature and a certificate fit easily."""
MAX_RETAINED = 4096
MAX_RETAINED_BYTES = 64 * 1024 * 1024
"""Retained messages a broker keeps: presence and telemetry of a few thousand nodes."""

Action = Literal["publish", "subscribe", "receive"]


def login_password(
    identity: Identity,
    username: str,
    audience: str,
    *,
    now: float | None = None,
    certificate: bytes | None = None,
) -> str:
    """A login token proving ``identity`` holds the key for ``username``, for the broker the
    client dials at ``audience`` (its URI)."""
    ts = int(time.time() if now is None else now)
    signed = LOGIN_DOMAIN + msgpack.packb([username, audience, ts])
    token = msgpack.packb([ts, audience, identity.public_raw, identity.sign(signed), certificate])
    return TOKEN_PREFIX + base64.urlsafe_b64encode(token).decode()


@dataclass(frozen=True)
class Login:
    """What a valid token says."""

    ts: int
    audience: str
    pk: bytes
    certificate: bytes | None


def read_login(username: str, password: str, *, now: float, max_age: float = LOGIN_TTL) -> Login:
    """The checked content of a login token; ProtocolError with a reason label otherwise."""
    if not password.startswith(TOKEN_PREFIX):
        raise ProtocolError(f"unsigned login from {username!r}: no p2pfl login token")
    if len(password) > MAX_TOKEN:
        raise ProtocolError(f"oversize login token from {username!r}")
    try:
        raw = base64.urlsafe_b64decode(password[len(TOKEN_PREFIX) :].encode())
        fields = msgpack.unpackb(raw, max_bin_len=MAX_TOKEN, max_str_len=512, max_array_len=8)
        ts, audience, pk, sig, cert = fields
    except (binascii.Error, ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError):  # fmt: skip
        raise ProtocolError(f"malformed login token from {username!r}") from None
    if not (
        isinstance(ts, int) and isinstance(audience, str) and isinstance(pk, bytes)
        and isinstance(sig, bytes) and (cert is None or isinstance(cert, bytes))
    ):  # fmt: skip
        raise ProtocolError(f"malformed login token from {username!r}")
    if abs(ts - now) > max_age:
        raise ProtocolError(
            f"replay or clock skew: login token of {username!r} is {ts - now:+.0f} s from our clock"
        )
    try:
        key = Ed25519PublicKey.from_public_bytes(pk)
        key.verify(sig, LOGIN_DOMAIN + msgpack.packb([username, audience, ts]))
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"bad signature on the login of {username!r}") from None
    return Login(ts, audience, pk, cert)


class BrokerGate:
    """The login, ACL and limit decisions of one node's broker (any thread may ask).

    ``own`` recognises this broker's URIs (a token's audience must be one of them); ``owner``
    is the node hosting it, always admitted with its own key. ``trust=None`` or an ``open``
    policy lets anonymous clients in and checks no topic (demos); the limits stay.
    """

    def __init__(
        self,
        net: str,
        *,
        trust: Trust | None,
        own: Container[str] = (),
        owner: Identity | None = None,
        owner_id: str | None = None,
        max_packet: int,
        max_retained: int = MAX_RETAINED,
        max_retained_bytes: int = MAX_RETAINED_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.net = net
        self.trust = trust
        self.open = trust is None or trust.policy == "open"
        self.own = own
        self.owner_pk = None if owner is None else owner.public_raw
        self.owner_id = owner_id
        self.max_packet = max_packet
        self.max_retained = max_retained
        self.max_retained_bytes = max_retained_bytes
        self.clock = clock
        self.on_refuse: Callable[[str, str], None] | None = None
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._base = f"{topics.PREFIX}/{net}/"

    def refuse(self, who: str, reason: str) -> None:
        """Count (and report) one refusal."""
        from p2pfl.inbox import reason_label  # one set of labels for every refusal

        with self._lock:
            self.refused[reason_label(reason)] += 1
        callback = self.on_refuse
        if callback is not None:
            callback(who, reason)

    def authenticate(
        self, username: str | None, password: str | None, client_id: str, will_topic: str | None
    ) -> bool:
        """Whether a CONNECT may go on; a refusal is counted with its reason."""
        who = username or "anonymous"
        try:
            self._authenticate(username, password, client_id, will_topic)
        except ProtocolError as exc:
            self.refuse(who, exc.reason)
            log.debug("broker refused a client user=%s reason=%s", who, exc.reason)
            return False
        return True

    def _authenticate(
        self, username: str | None, password: str | None, client_id: str, will_topic: str | None
    ) -> None:
        if self.open:
            return
        if not username or not password:
            raise ProtocolError("unsigned login: no user name or login token (anonymous client)")
        try:
            topics.validate_name(username, "node id")
        except ValueError as exc:
            raise ProtocolError(f"malformed login: {exc}") from None
        # A client id names a session: another node must not take over (or end) ours.
        if client_id != username and not client_id.startswith(username + "-"):
            raise ProtocolError(f"acl: client id {client_id[:80]!r} is not {username!r}'s")
        if will_topic is not None and will_topic != topics.presence(self.net, username):
            raise ProtocolError(f"acl: {username!r} may not leave a will on {will_topic[:120]!r}")
        login = read_login(username, password, now=self.clock())
        if login.audience not in self.own:
            raise ProtocolError(f"untrusted login of {username!r}: made for {login.audience!r}")
        if username == self.owner_id:
            if login.pk != self.owner_pk:
                raise ProtocolError(f"untrusted key for {username!r}: not this node's key")
            return
        assert self.trust is not None
        self.trust.admit_key(username, login.pk, login.certificate)

    def allowed(self, username: str | None, topic: str, action: Action) -> bool:
        """Whether ``username`` may publish to, subscribe to or receive ``topic``."""
        if self.open:
            return True
        if username is None or not self._allowed(username, topic, action):
            if action != "receive":  # a receive check is routine filtering, not an attack
                self.refuse(username or "anonymous", f"acl: {action} on {topic[:120]!r}")
            return False
        return True

    def _allowed(self, user: str, topic: str, action: Action) -> bool:
        if not topic.startswith(self._base):
            return False
        levels = topic[len(self._base) :].split("/")
        if action == "publish":
            if len(levels) == 3 and levels[0] == "node" and levels[2] == "inbox":
                return levels[1] != user and levels[1] not in ("+", "#")
            if len(levels) == 3 and levels[0] == "seed":  # a sampled network's heartbeat
                return levels[1] != "#" and levels[1] != "+" and levels[2] == user
            return (
                len(levels) == 2
                and levels[0] in ("presence", "telemetry", "log")
                and (levels[1] == user)
            )
        # subscribe (a filter) or receive (a topic): own inbox, anyone's records
        if len(levels) == 3 and levels[0] == "node" and levels[2] == "inbox":
            return levels[1] == user
        if len(levels) == 3 and levels[0] == "seed":
            return levels[1] not in ("+", "#") and levels[2] != "#"
        return (
            len(levels) == 2 and levels[0] in ("presence", "telemetry", "log") and levels[1] != "#"
        )
