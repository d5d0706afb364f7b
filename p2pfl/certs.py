"""Membership certificates (``--trust ca``): a network key vouches that a key speaks for an id.

An admin makes one network key (``p2pfl keys ca init``) and, for each node, signs a certificate
binding the node's id to its public key (``p2pfl keys ca admit``). A node keeps its certificate
in its state dir (``membership.cert``, put there by ``p2pfl keys ca install``) and sends it in
its presence records; peers started with ``--ca-key`` accept any key a valid certificate names,
so hundreds of machines need one shared public key instead of N allow lists.

Bytes form: the msgpack array ``[1, id, pk, issued, expires, sig]``: ``pk`` the node's 32 raw
public key bytes, ``issued`` and ``expires`` Unix seconds (``expires`` 0: never), ``sig`` the
network key's Ed25519 signature over :data:`CERT_DOMAIN` + msgpack ``[id, pk, issued,
expires]``. Text form (files, the command line): ``p2pfl-cert <base64>`` on one line.

There is no revocation list: a certificate with ``--valid-days`` bounds how long a lost key
stays admitted, and a newer certificate for the same id replaces the key of an older one.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfl.identity import KeyFileError, first_line, public_bytes
from p2pfl.protocol.envelope import KEY_SIZE, SIG_SIZE, is_int
from p2pfl.protocol.errors import ProtocolError
from p2pfl.protocol.topics import validate_name
from p2pfl.store import atomic_write_bytes

CERT_FILE = "membership.cert"
CERT_TYPE = "p2pfl-cert"
CERT_VERSION = 1
CERT_DOMAIN = b"p2pfl-cert-v1\x00"
MAX_CERT = 512
"""Largest certificate taken, checked before unpacking (the longest id, 64 characters of up to
4 UTF-8 bytes each, makes 379 bytes; a short ASCII one about 120)."""
_MAX_TIME = 253_402_300_800  # 10000-01-01: datetime shows any time below it


@dataclass(frozen=True)
class Certificate:
    """A decoded certificate (its signature not yet checked: see :func:`verify_cert`)."""

    node_id: str
    pk: bytes
    issued: int
    expires: int  # 0: never
    sig: bytes

    def signed_part(self) -> bytes:
        """What the network key signs."""
        return CERT_DOMAIN + msgpack.packb([self.node_id, self.pk, self.issued, self.expires])

    def expired(self, now: float) -> bool:
        return self.expires != 0 and now >= self.expires

    def describe(self) -> str:
        """``id 'n1', expires 2025-01-31 12:00 UTC`` (or ``never expires``)."""
        return f"id {self.node_id!r}, " + (
            f"expires {_when(self.expires)}" if self.expires else "never expires"
        )


def issue(
    ca_private: Ed25519PrivateKey,
    node_id: str,
    node_pk: Ed25519PublicKey | bytes,
    *,
    valid_days: float | None = None,
    now: float | None = None,
) -> bytes:
    """A certificate, signed by the network key, that ``node_pk`` speaks for ``node_id``;
    valid for ``valid_days`` (None: until the network key changes)."""
    validate_name(node_id, "node id")
    pk = node_pk if isinstance(node_pk, bytes) else public_bytes(node_pk)
    if len(pk) != KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {KEY_SIZE} bytes, this one is {len(pk)}")
    if valid_days is not None and not valid_days > 0:
        raise ValueError(f"valid days must be > 0, got {valid_days}")
    issued = int(time.time() if now is None else now)
    expires = 0 if valid_days is None else issued + max(1, round(valid_days * 86400))
    if expires >= _MAX_TIME:
        raise ValueError(f"valid days: {valid_days} is beyond the year 9999")
    unsigned = Certificate(node_id, pk, issued, expires, b"")
    sig = ca_private.sign(unsigned.signed_part())
    data: bytes = msgpack.packb([CERT_VERSION, node_id, pk, issued, expires, sig])
    assert len(data) <= MAX_CERT, "the longest id fits"
    return data


def parse_cert(data: bytes, node_id: str = "?") -> Certificate:
    """Decode a certificate's bytes without checking its signature; ProtocolError (starting
    with ``untrusted``) when they are not one. ``node_id`` names the sender in the message."""
    if not isinstance(data, bytes):
        raise _untrusted(node_id, "malformed (not bytes)")
    if len(data) > MAX_CERT:
        raise _untrusted(node_id, f"{len(data)} bytes, more than {MAX_CERT}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, max_bin_len=MAX_CERT, max_str_len=MAX_CERT, max_array_len=6,
            max_map_len=0, max_ext_len=0,
        )  # fmt: skip
    except Exception:  # msgpack raises many types (ValueError, StackError, UnicodeError...)
        raise _untrusted(node_id, "malformed") from None
    if not isinstance(obj, list) or len(obj) != 6:
        raise _untrusted(node_id, "malformed")
    version, cert_id, pk, issued, expires, sig = obj
    if not is_int(version) or version != CERT_VERSION:
        raise _untrusted(node_id, f"unsupported version {version!r:.20}")
    try:
        validate_name(cert_id, "node id")
    except ValueError:
        raise _untrusted(node_id, "malformed id") from None
    if not isinstance(pk, bytes) or len(pk) != KEY_SIZE:
        raise _untrusted(node_id, "malformed key")
    for stamp in (issued, expires):
        if not is_int(stamp) or not 0 <= stamp < _MAX_TIME:
            raise _untrusted(node_id, "malformed time")
    if expires and expires <= issued:
        raise _untrusted(node_id, "expires before it was issued")
    if not isinstance(sig, bytes) or len(sig) != SIG_SIZE:
        raise _untrusted(node_id, "malformed signature")
    return Certificate(cert_id, pk, issued, expires, sig)


def verify_cert(
    data: bytes, ca_public: Ed25519PublicKey, node_id: str, pk: bytes, now: float
) -> Certificate:
    """The certificate in ``data`` if the network key ``ca_public`` signed it for ``node_id``
    and ``pk`` and it has not expired at ``now``; ProtocolError starting with ``untrusted``
    (naming the problem) otherwise, malformed bytes included."""
    cert = parse_cert(data, node_id)
    try:
        ca_public.verify(cert.sig, cert.signed_part())
    except InvalidSignature:
        raise _untrusted(node_id, "not signed by the network key") from None
    if cert.node_id != node_id:
        raise _untrusted(node_id, f"issued to {cert.node_id!r}")
    if cert.pk != pk:
        raise _untrusted(node_id, "issued for another key")
    if cert.expired(now):
        raise _untrusted(node_id, f"expired {_when(cert.expires)}")
    return cert


def cert_text(data: bytes) -> str:
    """``p2pfl-cert <base64>``: a certificate as a line of text."""
    return f"{CERT_TYPE} {base64.b64encode(data).decode()}"


def parse_cert_text(text: str) -> bytes:
    """A certificate's bytes from ``p2pfl-cert <base64>`` (or bare base64), checked to decode;
    KeyFileError naming the problem otherwise."""
    parts = text.strip().split()
    if len(parts) >= 2 and parts[0] == CERT_TYPE:
        encoded = parts[1]
    elif len(parts) == 1:
        encoded = parts[0]
    else:
        raise KeyFileError(f"expected '{CERT_TYPE} BASE64', got {text.strip()[:60]!r}")
    if len(encoded) > 2 * MAX_CERT:
        raise KeyFileError(f"certificate {encoded[:20]!r}... is too long to be one")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"certificate {encoded[:20]!r}... is not base64") from None
    try:
        parse_cert(data)
    except ProtocolError as exc:
        raise KeyFileError(f"not a p2pfl certificate: {exc.reason.split(': ', 1)[-1]}") from None
    return data


def read_cert_argument(value: str) -> bytes:
    """A certificate given on the command line: its text itself, or a file holding it."""
    path = Path(value)
    if not value.startswith(CERT_TYPE) and path.is_file():
        return _cert_file(path)
    return parse_cert_text(value)


def _cert_file(path: Path) -> bytes:
    """The certificate in a file; KeyFileError naming the file."""
    try:
        return parse_cert_text(first_line(path))
    except KeyFileError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise KeyFileError(f"{path}: {exc}") from None


def load_certificate(state_dir: Path) -> bytes | None:
    """The node's certificate from ``state_dir/membership.cert``; None when there is none.
    KeyFileError naming the file when it is not a certificate."""
    path = state_dir / CERT_FILE
    return _cert_file(path) if path.exists() else None


def own_certificate(
    state_dir: Path,
    ca_public: Ed25519PublicKey,
    node_id: str,
    pk: bytes,
    now: float | None = None,
) -> bytes:
    """The node's certificate, checked as its peers will check it (network key, id, key,
    expiry); KeyFileError saying what to do when there is none or it would be refused."""
    path = state_dir / CERT_FILE
    data = load_certificate(state_dir)
    if data is None:
        raise KeyFileError(
            f"{path}: no membership certificate, and --trust ca peers accept none without one: "
            f"give `p2pfl keys show --public` of this node to the network's admin, who runs "
            f"`p2pfl keys ca admit KEY --id {node_id} --out {node_id}.cert`; then "
            f"`p2pfl keys ca install {node_id}.cert --state-dir {state_dir}`"
        )
    try:
        verify_cert(data, ca_public, node_id, pk, time.time() if now is None else now)
    except ProtocolError as exc:
        why = exc.reason.split(": ", 1)[-1]
        raise KeyFileError(
            f"{path}: peers would refuse this certificate ({why}): ask the network's admin "
            f"for a new one (p2pfl keys ca admit KEY --id {node_id})"
        ) from None
    return data


def write_certificate(state_dir: Path, data: bytes) -> Path:
    """Install a certificate as ``state_dir/membership.cert``; its path."""
    path = state_dir / CERT_FILE
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, (cert_text(data) + "\n").encode())
    return path


def _untrusted(node_id: str, why: str) -> ProtocolError:
    return ProtocolError(f"untrusted certificate for {node_id!r}: {why}")


def _when(stamp: int) -> str:
    try:
        return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, ValueError, OSError):  # a platform with a narrower time_t
        return f"at {stamp} (Unix time)"
