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
- ``open``: no checks (simulations and demos); messages are still signed.

Replays: per sender, each ``seq`` is taken once (chunks of one transfer share theirs), within a
window of :data:`REPLAY_WINDOW` below the highest seen, as IPsec does: messages may arrive out
of order. The timestamp must be within ``max_skew`` seconds of ours. A node's wills
are published by a broker long after they were signed, so kind ``will`` is exempt: replaying a
captured will drops a live node from views until its next heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pfl.identity import TrustedKeys, public_bytes, short_fingerprint
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


class Trust:
    """One node's (or monitor's) trust decisions and the per-sender state they need.

    ``state_dir`` holds ``trusted_keys`` and ``known_keys``; None keeps pins in memory (the
    simulator, a monitor without a state dir). At most ``max_peers`` ids are tracked.
    """

    def __init__(
        self,
        policy: Policy = "tofu",
        *,
        state_dir: Path | None = None,
        max_peers: int = 256,
        max_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"trust policy must be one of {POLICIES}, got {policy!r}")
        if policy == "ca":
            raise ValueError("trust policy 'ca' is not available yet: use tofu or allowlist")
        self.policy = policy
        self.max_peers = max_peers
        self.max_skew = max_skew
        self._clock = clock
        self._keys: dict[str, bytes] = {}  # id -> raw public key (trusted or pinned)
        self._known: TrustedKeys | None = None
        if state_dir is not None:
            source = TrustedKeys(state_dir) if policy == "allowlist" else None
            if policy == "tofu":
                source = self._known = TrustedKeys(state_dir, KNOWN_FILE)
            if source is not None:
                self._keys = {e.node_id: public_bytes(e.key) for e in source.load()}
        # per sender: the highest seq accepted, and a bitmask of the REPLAY_WINDOW before it
        self._windows: dict[str, tuple[int, int]] = {}
        self._warned: set[str] = set()
        # An embedded broker's auth plugin asks from its own thread (admit_key).
        self._lock = threading.Lock()

    def check(self, data: BytesLike, *, replay: bool = True) -> Header:
        """The header of a message that verifies; ProtocolError with the reason otherwise.

        ``replay=False``: order and duplicates are the caller's business (a monitor hears one
        record through several brokers, and retained ones replay old news).
        """
        return self.verify(peek(data), replay=replay)

    def verify(self, header: Header, *, replay: bool = True) -> Header:
        """:meth:`check` of a header already read (hashes the whole message: big ones off the
        event loop)."""
        if self.policy == "open":
            return header
        if header.sig is None or header.pk is None:
            raise ProtocolError(f"unsigned message from {header.src!r}")
        with self._lock:
            self._check_key(header.src, header.pk)
        try:
            key = Ed25519PublicKey.from_public_bytes(header.pk)
            key.verify(header.sig, SIG_DOMAIN + header.digest())
        except (InvalidSignature, ValueError):
            raise ProtocolError(f"bad signature on a message from {header.src!r}") from None
        with self._lock:
            self._pin(header.src, header.pk)
            if replay and header.kind != "will":
                self._check_fresh(header)
        return header

    def admit_key(self, node_id: str, pk: bytes) -> None:
        """Whether ``pk`` may speak for ``node_id`` under the policy (ProtocolError if not);
        pins it under tofu. The caller has checked that the holder of ``pk`` signed something
        fresh (a broker's auth plugin: a login token). Safe to call from any thread."""
        if self.policy == "open":
            return
        with self._lock:
            self._check_key(node_id, pk)
            self._pin(node_id, pk)

    def knows(self, node_id: str) -> bool:
        """Whether a key is trusted or pinned for ``node_id``."""
        return node_id in self._keys

    def forget(self, node_id: str) -> None:
        """Drop the replay state of a peer that left (its pinned key stays)."""
        with self._lock:
            self._windows.pop(node_id, None)

    def _check_key(self, src: str, pk: bytes) -> None:
        known = self._keys.get(src)
        if known == pk:
            return
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
        if len(self._keys) >= self.max_peers:
            raise ProtocolError(f"untrusted key for {src!r}: already {self.max_peers} peers")

    def _pin(self, src: str, pk: bytes) -> None:
        if src in self._keys:
            return
        self._keys[src] = pk
        log.info("pinned key id=%s key=%s", src, _short(pk))
        if self._known is not None:
            self._known.add(src, Ed25519PublicKey.from_public_bytes(pk), "pinned on first use")

    def _check_fresh(self, header: Header) -> None:
        skew = header.ts - self._clock()
        if abs(skew) > self.max_skew:
            raise ProtocolError(
                f"replay or clock skew: message from {header.src!r} is {skew:+.0f} s from our "
                f"clock (more than {self.max_skew:g} s)"
            )
        window = self._windows.get(header.src)
        if window is None:
            if len(self._windows) >= self.max_peers:
                raise ProtocolError(f"untrusted: already tracking {self.max_peers} peers")
            self._windows[header.src] = (header.seq, 1)
            return
        highest, seen = window
        if header.seq > highest:
            shift = header.seq - highest
            seen = ((seen << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            self._windows[header.src] = (header.seq, seen)
            return
        age = highest - header.seq
        if age >= REPLAY_WINDOW:
            raise ProtocolError(f"replay: {header.src!r} sent seq {header.seq}, long after")
        bit = 1 << age
        if seen & bit and header.kind != "chunk":  # chunks of one transfer share their seq
            raise ProtocolError(f"replay: {header.src!r} sent seq {header.seq} again")
        self._windows[header.src] = (highest, seen | bit)


def trust_label(reason: str) -> str | None:
    """The label of a trust refusal (``unsigned``, ``bad-signature``, ...), else None."""
    return next((label for start, label in TRUST_REASONS if reason.startswith(start)), None)


def _short(raw: bytes) -> str:
    return short_fingerprint(Ed25519PublicKey.from_public_bytes(raw))
