"""Node identity: the Ed25519 key in the state dir, key text, and trusted_keys; `p2pfl keys`."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfl.identity import (
    Identity,
    KeyFileError,
    TrustedKeys,
    fingerprint,
    key_text,
    load_identity,
    parse_key,
    public_bytes,
    read_key_argument,
)


def test_identity_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = load_identity(tmp_path / "st")
    key_file = tmp_path / "st" / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = load_identity(tmp_path / "st")
    assert public_bytes(again.public) == public_bytes(first.public)
    signature = again.sign(b"round 3")
    first.public.verify(signature, b"round 3")  # raises if the keys differ


def test_a_world_readable_key_file_is_made_private(tmp_path: Path) -> None:
    load_identity(tmp_path)
    key_file = tmp_path / "identity.key"
    key_file.chmod(0o644)
    load_identity(tmp_path)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_a_damaged_key_file_is_named_not_replaced(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "identity.key").write_bytes(content)
    with pytest.raises(KeyFileError, match=r"identity\.key"):
        load_identity(tmp_path)
    assert (tmp_path / "identity.key").read_bytes() == content  # never overwritten


def test_without_create_a_missing_identity_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no identity yet"):
        load_identity(tmp_path, create=False)


def test_key_text_round_trips_and_fingerprints_are_ssh_style(tmp_path: Path) -> None:
    key = load_identity(tmp_path).public
    text = key_text(key)
    assert text.startswith("p2pfl-ed25519 ")
    assert public_bytes(parse_key(text)) == public_bytes(key)
    assert public_bytes(parse_key(text.split()[1])) == public_bytes(key)  # bare base64
    assert fingerprint(key).startswith("SHA256:") and len(fingerprint(key)) <= 128


@given(st.text(max_size=200))
def test_parse_key_refuses_anything_else_with_a_clear_error(text: str) -> None:
    try:
        key = parse_key(text)
    except KeyFileError as exc:
        assert str(exc)
    else:
        assert len(public_bytes(key)) == 32


def test_a_key_file_argument_is_read(tmp_path: Path) -> None:
    key = load_identity(tmp_path / "a").public
    (tmp_path / "a.pub").write_text(key_text(key) + "\n")
    assert public_bytes(read_key_argument(str(tmp_path / "a.pub"))) == public_bytes(key)
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA\n")
    with pytest.raises(KeyFileError, match=r"bad\.pub"):
        read_key_argument(str(tmp_path / "bad.pub"))


def test_trusted_keys_add_replace_revoke(tmp_path: Path) -> None:
    a, b = load_identity(tmp_path / "a").public, load_identity(tmp_path / "b").public
    trusted = TrustedKeys(tmp_path / "me")
    assert trusted.add("n1", a, "lab pc")
    assert not trusted.add("n1", a)  # already so
    assert trusted.add("n2", b)
    assert trusted.add("n1", b)  # a new key replaces the old one for that id
    assert [(e.node_id, public_bytes(e.key)) for e in trusted.load()] == [
        ("n2", public_bytes(b)),
        ("n1", public_bytes(b)),
    ]
    assert stat.S_IMODE(trusted.path.stat().st_mode) == 0o600
    assert trusted.remove("n2") and not trusted.remove("n2")
    found = trusted.get("n1")
    assert found is not None and public_bytes(found) == public_bytes(b)
    assert trusted.get("n2") is None


def test_a_malformed_trusted_keys_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "trusted_keys").write_text("# comment\n\nn1 p2pfl-ed25519 notbase64!\n")
    with pytest.raises(KeyFileError, match=r"trusted_keys:3"):
        TrustedKeys(tmp_path).load()


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "keys", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_commands_end_to_end(tmp_path: Path) -> None:
    n1, n2 = str(tmp_path / "n1"), str(tmp_path / "n2")
    shown = keys("show", "--state-dir", n1, "--json")
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)
    assert card["public_key"].startswith("p2pfl-ed25519 ")
    public = keys("show", "--state-dir", n1, "--public")
    assert public.stdout.strip() == card["public_key"]  # the same key every time
    (tmp_path / "n1.pub").write_text(public.stdout)

    trusted = keys("trust", str(tmp_path / "n1.pub"), "--id", "n1", "--state-dir", n2)
    assert trusted.returncode == 0, trusted.stderr
    assert "trusted: n1" in trusted.stdout
    listed = keys("list", "--state-dir", n2, "--json")
    assert json.loads(listed.stdout)[0]["fingerprint"] == card["fingerprint"]
    assert keys("revoke", "n1", "--state-dir", n2).returncode == 0
    assert json.loads(keys("list", "--state-dir", n2, "--json").stdout) == []
    assert keys("revoke", "n1", "--state-dir", n2).returncode == 1

    bad = keys("trust", "p2pfl-ed25519 !!!", "--id", "n1", "--state-dir", n2)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_revoke_also_forgets_a_key_pinned_on_first_use(tmp_path: Path) -> None:
    """After 'KEY CHANGED', the fix the log suggests must work: revoke, then the new key pins."""
    old, new = Identity.generate(), Identity.generate()
    TrustedKeys(tmp_path, "known_keys").add("n1", old.public, "pinned on first use")
    assert keys("revoke", "n1", "--state-dir", str(tmp_path)).returncode == 0
    assert TrustedKeys(tmp_path, "known_keys").get("n1") is None
    assert TrustedKeys(tmp_path, "known_keys").add("n1", new.public)
