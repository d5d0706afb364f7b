"""A node's identity: its Ed25519 key pair, and the keys it trusts for other node ids.

The identity is a key, not a name: a node id is only what a key calls itself. Files in the
state dir (DESIGN.md, Trust):

    identity.key     the node's private key (PKCS#8 PEM, mode 0600), made on first run
    trusted_keys     one line per peer, like SSH's authorized_keys:
                     ``ID p2pfl-ed25519 KEY [comment]``

A public key travels as text, ``p2pfl-ed25519 <base64 of the 32 raw bytes>``; its fingerprint,
``SHA256:<base64 of its SHA-256>`` (first 16 characters shown as the short form), fits in an
mDNS TXT entry.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfl.protocol.topics import validate_name
from p2pfl.store import atomic_write_bytes

KEY_FILE = "identity.key"
TRUSTED_FILE = "trusted_keys"
KEY_TYPE = "p2pfl-ed25519"
MAX_KEY_FILE = 64 * 1024


class KeyFileError(ValueError):
    """A key or key file that cannot be used; the message says which and why."""


def public_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_text(key: Ed25519PublicKey) -> str:
    """``p2pfl-ed25519 <base64>``: how a public key is shown, copied and trusted."""
    return f"{KEY_TYPE} {base64.b64encode(public_bytes(key)).decode()}"


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the raw public key, as SSH shows host keys."""
    digest = hashlib.sha256(public_bytes(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def short_fingerprint(key: Ed25519PublicKey) -> str:
    """The first 16 characters of the fingerprint after ``SHA256:``: enough to compare by eye."""
    return fingerprint(key).removeprefix("SHA256:")[:16]


def parse_key(text: str) -> Ed25519PublicKey:
    """A public key from ``p2pfl-ed25519 <base64>`` (or bare base64); KeyFileError if not."""
    parts = text.strip().split()
    if len(parts) >= 2 and parts[0] == KEY_TYPE:
        encoded = parts[1]
    elif len(parts) == 1:
        encoded = parts[0]
    else:
        raise KeyFileError(f"expected '{KEY_TYPE} BASE64', got {text.strip()[:60]!r}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"key {encoded[:20]!r}... is not base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def read_key_argument(value: str) -> Ed25519PublicKey:
    """A public key given on the command line: the key text itself, or a file holding it."""
    path = Path(value)
    if not value.startswith(KEY_TYPE) and path.is_file():
        try:
            return parse_key(first_line(path))
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from None
    try:
        return parse_key(value)
    except KeyFileError:
        if value.startswith(KEY_TYPE):
            raise
        raise KeyFileError(
            f"{value[:60]!r} is neither a key ('{KEY_TYPE} BASE64') nor a file"
        ) from None


def first_line(path: Path) -> str:
    """The first non-blank line of a small text file (a key, a certificate); KeyFileError
    naming the path when it is too large, empty or unreadable."""
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise KeyFileError(f"{path}: too large to be a key file")
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a text file") from None
    if not lines:
        raise KeyFileError(f"{path}: empty")
    return lines[0]


@dataclass(frozen=True)
class Identity:
    """This node's key pair; signs envelopes (a ``p2pfl.protocol.envelope.Signer``)."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key pair kept in memory only (simulated nodes)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @functools.cached_property
    def public_raw(self) -> bytes:
        """The 32 raw bytes of the public key, as envelopes carry it."""
        return public_bytes(self.public)

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return self.private.sign(data)


def load_identity(state_dir: Path, *, create: bool = True) -> Identity:
    """The node's key from ``state_dir/identity.key``; made (mode 0600) when absent and
    ``create``. KeyFileError with the path when the file is unreadable or not an Ed25519 key."""
    path = state_dir / KEY_FILE
    if not path.exists():
        if not create:
            raise KeyFileError(f"{path}: no identity yet (p2pfl run creates it on first start)")
        return _create_identity(path)
    return Identity(load_private_key(path))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (a node's identity, a network's CA key); its
    mode is tightened to 0600. KeyFileError with the path when it cannot be used."""
    try:
        data = path.read_bytes()[: MAX_KEY_FILE + 1]
        if len(data) > MAX_KEY_FILE:
            raise KeyFileError(f"{path}: too large to be a key file")
        key = serialization.load_pem_private_key(data, password=None)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        path.chmod(0o600)  # a copied-in key file keeps others out from now on
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600, whole or not at all; FileExistsError when
    ``path`` exists and not ``overwrite`` (of two writers racing, the first wins)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if overwrite:
        atomic_write_bytes(path, pem)  # its temp file is made 0600
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # FileExistsError when there is one already
    finally:
        tmp.unlink(missing_ok=True)


def _create_identity(path: Path) -> Identity:
    key = Ed25519PrivateKey.generate()
    try:
        write_private_key(path, key)
    except FileExistsError:
        # Two processes racing on first start: the first key written wins, both use it.
        return load_identity(path.parent, create=False)
    return Identity(key)


@dataclass(frozen=True)
class TrustedKey:
    """One line of ``trusted_keys``."""

    node_id: str
    key: Ed25519PublicKey
    comment: str = ""

    def line(self) -> str:
        tail = f" {self.comment}" if self.comment else ""
        return f"{self.node_id} {key_text(self.key)}{tail}"


class TrustedKeys:
    """``trusted_keys`` of a state dir (or another file of that format, such as the keys a
    node pinned on first use): which key each peer id must sign with."""

    def __init__(self, state_dir: Path, name: str = TRUSTED_FILE) -> None:
        self.path = state_dir / name

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self.load())

    def load(self) -> list[TrustedKey]:
        """Every entry, in file order; KeyFileError naming the line when one is malformed."""
        if not self.path.exists():
            return []
        entries = []
        for number, raw in enumerate(self.path.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(maxsplit=3)
            if len(parts) < 3:
                raise KeyFileError(f"{self.path}:{number}: expected 'ID {KEY_TYPE} KEY [comment]'")
            try:
                node_id = validate_name(parts[0], "node id")
                key = parse_key(f"{parts[1]} {parts[2]}")
            except ValueError as exc:
                raise KeyFileError(f"{self.path}:{number}: {exc}") from None
            entries.append(TrustedKey(node_id, key, parts[3] if len(parts) > 3 else ""))
        return entries

    def get(self, node_id: str) -> Ed25519PublicKey | None:
        """The key trusted for ``node_id``, or None."""
        return next((e.key for e in self.load() if e.node_id == node_id), None)

    def add(self, node_id: str, key: Ed25519PublicKey, comment: str = "") -> bool:
        """Trust ``key`` for ``node_id`` (replacing its old key); False when already so."""
        validate_name(node_id, "node id")
        entries = self.load()
        if any(e.node_id == node_id and public_bytes(e.key) == public_bytes(key) for e in entries):
            return False
        kept = [e for e in entries if e.node_id != node_id]
        self._write([*kept, TrustedKey(node_id, key, comment)])
        return True

    def append(self, node_id: str, key: Ed25519PublicKey, comment: str = "") -> None:
        """Add a line for ``node_id`` without reading or rewriting the file (a later line for
        the same id wins on load): pinning keys one by one stays O(1) each. Not synced to
        disk: a pin lost in a power cut is pinned again on next use."""
        line = TrustedKey(validate_name(node_id, "node id"), key, comment).line() + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.path.open("a") as file:
            file.write(line)

    def remove(self, node_id: str) -> bool:
        """Stop trusting ``node_id``; False when it was not trusted."""
        entries = self.load()
        kept = [e for e in entries if e.node_id != node_id]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _write(self, entries: list[TrustedKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path, "".join(e.line() + "\n" for e in entries).encode())
