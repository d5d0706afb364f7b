"""Whether a message comes from who it says it does: signature, the key for its id, replay.

Every byte from the network is hostile until a signature says otherwise, and the identity is
the key, not the ``src`` name. :meth:`Trust.check` runs, in this order and before anything of
the body is allocated or decoded (DESIGN.md, Trust): header fields, the key for ``src`` under
the trust policy, the signature, the replay window. A refusal is a ``ProtocolError`` whose text
starts with its reason label: ``unsigned``, ``untrusted``, ``bad signature``, ``replay``.

Policies (``--trust``):
- ``tofu`` (default): the first key seen for an id is pinned (``known_keys`` in the state dir,
  or in memory); a later different key for that id is refused and logged loudly.
- ``allowlist``: only the keys of ``trusted_keys``.
- ``ca``: a key the network key certified for that id (``p2pfl.certs``). The certificate
  travels in the body of a presence record (or a broker login token): it is read only once the
  message's signature proves the sender holds the key, and then remembered in memory. An
  expired certificate must be renewed by the next presence; a *newer* valid certificate for
  the same id replaces the key of an older one (a node re-admitted after losing its key), an
  older or equally old one is refused. There is no revocation list: ``--valid-days`` bounds
  how long a lost key stays admitted.
- ``open``: no checks (simulations and demos); messages are still signed.

Replays: per sender, each ``seq`` is taken once (chunks of one transfer share theirs), within a
window of :data:`REPLAY_WINDOW` below the highest seen, as IPsec does: messages may arrive out
of order. The timestamp must be within ``max_skew`` seconds of ours. A node's wills
are published by a broker long after they were signed, so kind ``will`` is exempt: replaying a
captured will drops a live node from views until its next heartbeat. An exact copy of the
message taken last from a sender is no replay but a :class:`Duplicate` (MQTT delivers at least
once): the caller drops it without counting a refusal.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pfl.certs import Certificate, verify_cert
from p2pfl.identity import TrustedKeys, parse_key, public_bytes, short_fingerprint
from p2pfl.protocol.envelope import SIG_DOMAIN, BytesLike, Header, peek
from p2pfl.protocol.errors import ProtocolError

log = logging.getLogger(__name__)

# Refusal labels (counted by nodes and monitors), found by the start of the refusal's text.
TRUST_REASONS = (
    ("unsigned", "unsigned"),
    ("bad signature", "bad-signature"),
    ("untrusted", "untrusted"),
    ("replay", "replay"),
)

Policy = Literal["tofu", "allowlist", "ca", "open"]
POLICIES: tuple[Policy, ...] = ("tofu", "allowlist", "ca", "open")
KNOWN_FILE = "known_keys"
REPLAY_WINDOW = 4096
"""Messages may arrive out of order (network jitter, several links): a seq this far below the
highest one accepted from a sender is still taken, once."""
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
KEYS_PER_PEER = 16
"""Keys pinned (and replay windows kept) per place in the view: room for churn over a long run."""
SIGNATURES_REMEMBERED = 16_384
"""Signature checks remembered per process (about 4 MB): see :func:`signature_ok`."""


@functools.lru_cache(maxsize=SIGNATURES_REMEMBERED)
def signature_ok(pk: bytes, sig: bytes, digest: bytes) -> bool:
    """Whether ``sig`` is ``pk``'s Ed25519 signature of ``digest`` (domain-separated).

    Remembered for the last :data:`SIGNATURES_REMEMBERED` checks in this process: the answer
    is a function of the three values, and the same signed message is checked many times where
    many nodes share a process (the simulator: every receiver of a presence record) or where a
    copy arrives twice (MQTT QoS 1). The digest is SHA-256 of the signed message, so another
    message matching a remembered entry would be a SHA-256 collision."""
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, SIG_DOMAIN + digest)
    except (InvalidSignature, ValueError):
        return False
    return True


class Duplicate(Exception):
    """A copy of the message last taken from its sender: the same seq and signed bytes.

    MQTT delivers at least once (a broker's retained copy and the live publish racing a new
    subscription, or one record announced on two brokers): taking it again would change
    nothing, and neither does an attacker re-sending it. Not a ``ProtocolError``: the caller
    drops it without counting a refusal.
    """


class _Window(NamedTuple):
    """What is remembered of one sender's seqs (bounded: one per sender)."""

    highest: int
    """The highest seq taken."""
    seen: int
    """Bit ``i`` set: seq ``highest - i`` was taken (for the :data:`REPLAY_WINDOW` below)."""
    last: tuple[int, bytes]
    """The seq and digest of the message taken last: a copy of it is a :class:`Duplicate`."""


class Trust:
    """One node's (or monitor's) trust decisions and the per-sender state they need.

    ``state_dir`` holds ``trusted_keys`` and ``known_keys``; None keeps pins in memory (the
    simulator, a monitor without a state dir). At most :data:`KEYS_PER_PEER` x ``max_peers``
    keys are pinned and as many senders' replay windows kept (the least recently heard is
    dropped first): a Sybil flood fills them slowly (the view admits new peers at a bounded
    rate), and a departed peer's window stays, so its captured records cannot be replayed.
    Under ``ca``, ``ca_key`` is the network's public key (a key, its 32 raw bytes or its text)
    and ``certificate`` this node's own certificate, which it shows its peers. Under
    ``allowlist``, ``keys`` (id -> raw public key) are trusted besides those of
    ``trusted_keys`` (the simulator's nodes trust the run's own nodes).
    """

    def __init__(
        self,
        policy: Policy = "tofu",
        *,
        state_dir: Path | None = None,
        max_peers: int = 256,
        max_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
        ca_key: Ed25519PublicKey | bytes | str | None = None,
        certificate: bytes | None = None,
        keys: Mapping[str, bytes] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"trust policy must be one of {POLICIES}, got {policy!r}")
        self._ca: Ed25519PublicKey | None = None
        if policy == "ca":
            if ca_key is None:
                raise ValueError("trust policy 'ca' needs ca_key, the network's public key")
            self._ca = _public_key(ca_key)
        self.certificate = certificate
        self.policy = policy
        self.max_peers = max_peers
        self.max_keys = KEYS_PER_PEER * max_peers
        self.max_skew = max_skew
        self._clock = clock
        self._keys: dict[str, bytes] = {}  # id -> raw public key (trusted, pinned, certified)
        self._certs: dict[str, Certificate] = {}  # ca: id -> what certified its key
        self._known: TrustedKeys | None = None
        if state_dir is not None:
            source = TrustedKeys(state_dir) if policy == "allowlist" else None
            if policy == "tofu":
                source = self._known = TrustedKeys(state_dir, KNOWN_FILE)
            if source is not None:
                self._keys = {e.node_id: public_bytes(e.key) for e in source.load()}
        if keys is not None and policy == "allowlist":
            self._keys.update(keys)
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._warned: set[str] = set()
        # An embedded broker's auth plugin asks from its own thread (admit_key).
        self._lock = threading.Lock()

    def check(
        self,
        data: BytesLike,
        *,
        replay: bool = True,
        cert: Callable[[], bytes | None] | None = None,
    ) -> Header:
        """The header of a message that verifies; ProtocolError with the reason otherwise.

        ``replay=False``: order and duplicates are the caller's business (a monitor hears one
        record through several brokers, and retained ones replay old news). ``cert``: under
        ``ca``, reads the sender's certificate from the message (see :meth:`verify`).
        """
        return self.verify(peek(data), replay=replay, cert=cert)

    def verify(
        self,
        header: Header,
        *,
        replay: bool = True,
        cert: Callable[[], bytes | None] | None = None,
    ) -> Header:
        """:meth:`check` of a header already read (hashes the whole message: big ones off the
        event loop).

        Under ``ca``, a key not yet certified for ``header.src`` needs a certificate: once the
        signature has verified, and only then, ``cert()`` is called to read it from the
        message's body (None or no ``cert``: refused). Raises :class:`Duplicate` for a copy of
        the message taken last from ``header.src`` (``replay=True`` only).
        """
        if self.policy == "open":
            return header
        if header.sig is None or header.pk is None:
            raise ProtocolError(f"unsigned message from {header.src!r}")
        with self._lock:
            pending = self._check_key(header.src, header.pk)
        digest = header.digest()
        if not signature_ok(header.pk, header.sig, digest):
            raise ProtocolError(f"bad signature on a message from {header.src!r}")
        if pending:
            self._certify(header.src, header.pk, None if cert is None else cert())
        with self._lock:
            self._pin(header.src, header.pk)
            if replay and header.kind != "will":
                self._check_fresh(header, digest)
        return header

    def admit_key(self, node_id: str, pk: bytes, cert: bytes | None = None) -> None:
        """Whether ``pk`` may speak for ``node_id`` under the policy (ProtocolError if not);
        pins it under tofu; under ``ca``, a key not yet certified needs ``cert``, a certificate
        for it. The caller has checked that the holder of ``pk`` signed something fresh (a
        broker's auth plugin: a login token). Safe to call from any thread."""
        if self.policy == "open":
            return
        with self._lock:
            pending = self._check_key(node_id, pk)
            if not pending:
                self._pin(node_id, pk)
        if pending:
            self._certify(node_id, pk, cert)

    def own(self, node_id: str, pk: bytes) -> None:
        """Our own id speaks with our own key only (never pinned to another, never persisted)."""
        with self._lock:
            self._keys[node_id] = pk

    def knows(self, node_id: str) -> bool:
        """Whether a key is trusted or pinned for ``node_id``."""
        return node_id in self._keys

    def _check_key(self, src: str, pk: bytes) -> bool:
        """ProtocolError when ``pk`` may not speak for ``src``; True when it may if a
        certificate says so (``ca``: a key not yet certified, or whose certificate expired)."""
        known = self._keys.get(src)
        if self.policy == "ca":
            held = self._certs.get(src)  # None for a key of our own (see `own`)
            if known == pk and (held is None or not held.expired(self._clock())):
                return False
            if known is None and len(self._keys) >= self.max_keys:
                raise ProtocolError(f"untrusted key for {src!r}: already {self.max_keys} keys")
            return True
        if known == pk:
            return False
        if known is not None:
            if src not in self._warned:
                self._warned.add(src)
                log.error(
                    "KEY CHANGED for id=%s: refusing key %s (trusted: %s); if the peer really "
                    "has a new key: p2pfl keys revoke %s, then trust the new one",
                    src,
                    _short(pk),
                    _short(known),
                    src,
                )
            raise ProtocolError(f"untrusted key for {src!r}: not the key known for that id")
        if self.policy == "allowlist":
            raise ProtocolError(f"untrusted key for {src!r}: not in trusted_keys")
        if len(self._keys) >= self.max_keys:
            raise ProtocolError(f"untrusted key for {src!r}: already {self.max_keys} keys")
        return False

    def _certify(self, src: str, pk: bytes, data: bytes | None) -> None:
        """Admit ``pk`` for ``src`` (``ca``) if ``data`` is a valid certificate for them."""
        if data is None:
            raise ProtocolError(f"untrusted key for {src!r}: no certificate from the network key")
        assert self._ca is not None
        now = self._clock()
        cert = verify_cert(data, self._ca, src, pk, now)
        with self._lock:
            known, held = self._keys.get(src), self._certs.get(src)
            if known == pk:
                if held is not None and (cert.issued >= held.issued or held.expired(now)):
                    self._certs[src] = cert  # renewed
                return
            # Our own id (no certificate held) is never handed to another key.
            newer = held is not None and (held.expired(now) or cert.issued > held.issued)
            if known is not None and not newer:
                if src not in self._warned:
                    self._warned.add(src)
                    log.error(
                        "KEY CHANGED for id=%s: refusing key %s (certified: %s, by a "
                        "certificate at least as new as the one shown)",
                        src,
                        _short(pk),
                        _short(known),
                    )
                raise ProtocolError(
                    f"untrusted key for {src!r}: another key has a certificate as new for that id"
                )
            if known is None and len(self._keys) >= self.max_keys:
                raise ProtocolError(f"untrusted key for {src!r}: already {self.max_keys} keys")
            if known is None:
                log.info("admitted id=%s key=%s: %s", src, _short(pk), cert.describe())
            else:
                self._warned.discard(src)
                log.warning(
                    "key replaced id=%s key=%s (was %s) by a newer certificate: %s",
                    src,
                    _short(pk),
                    _short(known),
                    cert.describe(),
                )
            self._keys[src] = pk
            self._certs[src] = cert

    def _pin(self, src: str, pk: bytes) -> None:
        if src in self._keys:
            return
        self._keys[src] = pk
        log.info("pinned key id=%s key=%s", src, _short(pk))
        if self._known is not None:
            # appended (no rewrite, no fsync): a node pins each peer once, on its loop
            self._known.append(src, Ed25519PublicKey.from_public_bytes(pk), "pinned on first use")

    def _check_fresh(self, header: Header, digest: bytes) -> None:
        skew = header.ts - self._clock()
        if abs(skew) > self.max_skew:
            raise ProtocolError(
                f"replay or clock skew: message from {header.src!r} is {skew:+.0f} s from our "
                f"clock (more than {self.max_skew:g} s)"
            )
        window = self._windows.get(header.src)
        last = (header.seq, digest)
        if window is None:
            if len(self._windows) >= self.max_keys:
                self._windows.popitem(last=False)
            self._windows[header.src] = _Window(header.seq, 1, last)
            return
        self._windows.move_to_end(header.src)
        highest, seen, previous = window
        if header.seq > highest:
            shift = header.seq - highest
            seen = ((seen << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            self._windows[header.src] = _Window(header.seq, seen, last)
            return
        age = highest - header.seq
        if age >= REPLAY_WINDOW:
            raise ProtocolError(f"replay: {header.src!r} sent seq {header.seq}, long after")
        bit = 1 << age
        if seen & bit and header.kind != "chunk":  # chunks of one transfer share their seq
            if last == previous:
                log.debug("duplicate dropped id=%s seq=%d", header.src, header.seq)
                raise Duplicate(f"{header.src!r} sent seq {header.seq} twice")
            raise ProtocolError(f"replay: {header.src!r} sent seq {header.seq} again")
        self._windows[header.src] = _Window(highest, seen | bit, last)


def trust_label(reason: str) -> str | None:
    """The label of a trust refusal (``unsigned``, ``bad-signature``, ...), else None."""
    return next((label for start, label in TRUST_REASONS if reason.startswith(start)), None)


def _short(raw: bytes) -> str:
    return short_fingerprint(Ed25519PublicKey.from_public_bytes(raw))


def _public_key(value: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes):
        return Ed25519PublicKey.from_public_bytes(value)  # ValueError unless 32 bytes
    return parse_key(value)  # KeyFileError, a ValueError, naming the problem
