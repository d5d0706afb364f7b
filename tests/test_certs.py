"""Membership certificates (--trust ca): the certificate itself, presence carrying it, a node's
membership admitting by it, and `p2pfl keys ca` as a user runs it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from p2pfl.certs import (
    CERT_FILE,
    MAX_CERT,
    cert_text,
    issue,
    load_certificate,
    own_certificate,
    parse_cert_text,
    read_cert_argument,
    verify_cert,
    write_certificate,
)
from p2pfl.cli import app
from p2pfl.config import NodeConfig
from p2pfl.discovery.membership import Membership
from p2pfl.discovery.peerview import PeerView
from p2pfl.discovery.presence import encode_presence, parse_presence, presence_certificate
from p2pfl.identity import Identity, KeyFileError, key_text, load_identity, load_private_key
from p2pfl.inbox import reason_label
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.transport.base import Message
from p2pfl.transport.memory import MemoryBus, MemoryTransport
from p2pfl.trust import Trust

NOW = 1_700_000_000.0
DAY = 86400


@pytest.fixture(scope="module")
def ca() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def node() -> Identity:
    return Identity.generate()


def refusal(data: object, ca: Ed25519PrivateKey, node_id: str, pk: bytes, now: float = NOW) -> str:
    with pytest.raises(ProtocolError) as info:
        verify_cert(data, ca.public_key(), node_id, pk, now)  # type: ignore[arg-type]
    assert info.value.reason.startswith(f"untrusted certificate for {node_id!r}: ")
    return info.value.reason


# ---- the certificate ----------------------------------------------------------------------


def test_a_certificate_round_trips_through_bytes_and_text(
    ca: Ed25519PrivateKey, node: Identity
) -> None:
    data = issue(ca, "n1", node.public, valid_days=30, now=NOW)
    cert = verify_cert(data, ca.public_key(), "n1", node.public_raw, NOW + 29 * DAY)
    assert (cert.node_id, cert.pk, cert.issued) == ("n1", node.public_raw, int(NOW))
    assert cert.expires == int(NOW) + 30 * DAY
    text = cert_text(data)
    assert text.startswith("p2pfl-cert ") and "\n" not in text
    assert parse_cert_text(text) == data
    assert parse_cert_text(text.split()[1]) == data  # bare base64 too
    assert len(data) < 200
    forever = issue(ca, "n1", node.public_raw, now=NOW)  # raw key bytes work too
    assert verify_cert(forever, ca.public_key(), "n1", node.public_raw, NOW + 1e9).expires == 0


def test_a_certificate_is_refused_for_every_mismatch(ca: Ed25519PrivateKey, node: Identity) -> None:
    data = issue(ca, "n1", node.public, valid_days=1, now=NOW)
    other_ca = Ed25519PrivateKey.generate()
    assert "not signed by the network key" in refusal(data, other_ca, "n1", node.public_raw)
    assert "issued to 'n1'" in refusal(data, ca, "n2", node.public_raw)
    stranger = Identity.generate().public_raw
    assert "another key" in refusal(data, ca, "n1", stranger)
    assert "expired" in refusal(data, ca, "n1", node.public_raw, now=NOW + DAY)


def test_a_forged_signature_or_altered_field_is_refused(
    ca: Ed25519PrivateKey, node: Identity
) -> None:
    version, node_id, pk, issued, expires, sig = msgpack.unpackb(issue(ca, "n1", node.public))
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    data = msgpack.packb([version, node_id, pk, issued, expires, forged])
    assert "not signed" in refusal(data, ca, "n1", node.public_raw)
    # the admin gave one day; the holder writes "never"
    one_day = msgpack.unpackb(issue(ca, "n1", node.public, valid_days=1, now=NOW))
    one_day[4] = 0
    assert "not signed" in refusal(msgpack.packb(one_day), ca, "n1", node.public_raw)
    # another key put into a certificate breaks its signature
    mallory = Identity.generate()
    swapped = msgpack.packb([version, node_id, mallory.public_raw, issued, expires, sig])
    assert "not signed" in refusal(swapped, ca, "n1", mallory.public_raw)


def test_truncated_oversize_and_garbage_bytes_are_refused(
    ca: Ed25519PrivateKey, node: Identity
) -> None:
    data = issue(ca, "n1", node.public)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        assert "malformed" in refusal(data[:cut], ca, "n1", node.public_raw)
    assert f"more than {MAX_CERT}" in refusal(b"\x96" + b"\x00" * MAX_CERT, ca, "n1", b"")
    assert "malformed" in refusal(data + b"\x00", ca, "n1", node.public_raw)  # trailing bytes
    assert "version" in refusal(msgpack.packb([2, *msgpack.unpackb(data)[1:]]), ca, "n1", b"")
    # a claim of a huge array is refused before anything is allocated for it
    assert "malformed" in refusal(b"\xdd\xff\xff\xff\xff", ca, "n1", b"")
    assert "malformed" in refusal("text", ca, "n1", b"")


@given(st.binary(max_size=2 * MAX_CERT))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    with pytest.raises(ProtocolError, match=r"^untrusted certificate"):
        verify_cert(data, key.public_key(), "n1", b"\x00" * 32, NOW)


_FIELD = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.binary(max_size=80), st.text(max_size=40), st.none()
)


@given(st.one_of(st.lists(_FIELD, max_size=8), st.lists(_FIELD, min_size=5, max_size=5)))
def test_arbitrary_msgpack_arrays_raise_only_protocol_errors(fields: list[object]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    data = msgpack.packb([1, *fields])
    with pytest.raises(ProtocolError, match=r"^untrusted certificate"):
        verify_cert(data, key.public_key(), "n1", b"\x00" * 32, NOW)


def test_issue_refuses_what_no_peer_would_take(ca: Ed25519PrivateKey, node: Identity) -> None:
    with pytest.raises(ValueError, match="node id"):
        issue(ca, "a/b", node.public)
    with pytest.raises(ValueError, match="> 0"):
        issue(ca, "n1", node.public, valid_days=0)
    with pytest.raises(ValueError, match="32 bytes"):
        issue(ca, "n1", b"short")


def test_text_form_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not base64"):
        parse_cert_text("p2pfl-cert !!!")
    with pytest.raises(KeyFileError, match="expected 'p2pfl-cert BASE64'"):
        parse_cert_text("p2pfl-ed25519 AAAA extra words")
    with pytest.raises(KeyFileError, match="not a p2pfl certificate: malformed"):
        parse_cert_text("p2pfl-cert AAAA")
    (tmp_path / "empty.cert").write_text("\n")
    with pytest.raises(KeyFileError, match=r"empty\.cert: empty"):
        read_cert_argument(str(tmp_path / "empty.cert"))
    (tmp_path / CERT_FILE).write_text("p2pfl-cert AAAA\n")
    with pytest.raises(KeyFileError, match=f"{CERT_FILE}: not a p2pfl certificate"):
        load_certificate(tmp_path)


def test_a_node_finds_its_certificate_in_its_state_dir(
    tmp_path: Path, ca: Ed25519PrivateKey, node: Identity
) -> None:
    assert load_certificate(tmp_path) is None
    with pytest.raises(KeyFileError, match=r"no membership certificate.*keys ca admit"):
        own_certificate(tmp_path, ca.public_key(), "n1", node.public_raw)
    data = issue(ca, "n1", node.public)
    path = write_certificate(tmp_path, data)
    assert path == tmp_path / CERT_FILE and load_certificate(tmp_path) == data
    assert read_cert_argument(str(path)) == data
    assert own_certificate(tmp_path, ca.public_key(), "n1", node.public_raw) == data
    with pytest.raises(KeyFileError, match=r"peers would refuse .*issued to 'n1'"):
        own_certificate(tmp_path, ca.public_key(), "n2", node.public_raw)


# ---- presence carries it ------------------------------------------------------------------


def test_presence_carries_the_certificate(ca: Ed25519PrivateKey, node: Identity) -> None:
    data = issue(ca, "n1", node.public)
    payload = encode_presence(
        "lab", "n1", 1, online=True, role="trainer", broker="", signer=node, cert=data
    )
    assert presence_certificate(payload) == data
    assert parse_presence(unpack_envelope(payload)).cert == data
    bare = encode_presence("lab", "n1", 2, online=True, role="trainer", broker="", signer=node)
    assert presence_certificate(bare) is None
    assert parse_presence(unpack_envelope(bare)).cert is None
    huge = encode_presence(
        "lab", "n1", 3, online=True, role="trainer", broker="", signer=node,
        cert=b"x" * (MAX_CERT + 1),
    )  # fmt: skip
    with pytest.raises(ProtocolError, match="cert"):
        presence_certificate(huge)
    with pytest.raises(ProtocolError, match="cert"):
        parse_presence(unpack_envelope(huge))


class Harness:
    """One node's `Membership` under --trust ca on a memory bus, refusals counted by label."""

    def __init__(self, ca: Ed25519PrivateKey) -> None:
        self.config = NodeConfig(
            network="lab", id="me", trust="ca", ca_key=key_text(ca.public_key()),
            discovery=("static", "presence"),
        )  # fmt: skip
        self.view = PeerView("me", ttl=15.0)
        self.rejected: Counter[str] = Counter()
        self.trust = Trust("ca", ca_key=self.config.ca_key)
        self.membership = Membership(
            self.config,
            MemoryTransport(MemoryBus(), "me"),
            self.view,
            node_id="me",
            home_broker="mqtt://10.77.0.1:1883",
            next_seq=lambda: 1,
            current_round=lambda: 0,
            reject=lambda src, reason: self.rejected.update([reason_label(reason)]),
            clock=lambda: 0.0,
            trust=self.trust,
        )

    async def presence(self, peer: Identity, peer_id: str, seq: int, cert: bytes | None) -> None:
        payload = encode_presence(
            "lab", peer_id, seq, online=True, role="trainer", broker="", signer=peer, cert=cert
        )
        await self.membership.on_message(Message(topics.presence("lab", peer_id), payload, True))


async def test_membership_admits_a_certified_peer_and_refuses_the_others(
    ca: Ed25519PrivateKey,
) -> None:
    h = Harness(ca)
    good, stranger, thief = Identity.generate(), Identity.generate(), Identity.generate()
    good_cert = issue(ca, "n1", good.public)
    await h.presence(good, "n1", 1, good_cert)
    assert "n1" in h.view and h.trust.knows("n1")
    await h.presence(good, "n1", 2, None)  # later records need not carry it
    await h.presence(stranger, "n2", 1, None)
    await h.presence(stranger, "n2", 2, issue(Ed25519PrivateKey.generate(), "n2", stranger.public))
    await h.presence(thief, "n3", 1, good_cert)  # someone else's certificate
    await h.presence(thief, "n1", 3, good_cert)  # and someone else's id
    assert "n2" not in h.view and "n3" not in h.view
    assert h.rejected == {"untrusted": 4}


async def test_own_records_carry_the_certificate(ca: Ed25519PrivateKey, node: Identity) -> None:
    h = Harness(ca)
    h.membership.certificate = issue(ca, "me", node.public)
    record = h.membership.will()
    assert presence_certificate(record.payload) == h.membership.certificate


# ---- p2pfl keys ca, as a user runs it -----------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    return CliRunner()


def run(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["keys", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_init_admit_install_then_the_node_is_admitted(tmp_path: Path, keys: CliRunner) -> None:
    code, out, err = run(keys, "ca", "init", "--network", "lab")
    assert code == 0, err
    network_key = out.strip()
    assert network_key.startswith("p2pfl-ed25519 ") and len(out.splitlines()) == 1
    assert f"--trust ca --ca-key '{network_key}'" in err
    ca_file = tmp_path / "xdg" / "p2pfl" / "ca" / "lab.key"
    assert ca_file.stat().st_mode & 0o777 == 0o600
    assert run(keys, "ca", "show", "--network", "lab")[1].strip() == network_key

    n1 = tmp_path / "n1"
    code, out, err = run(keys, "show", "--state-dir", str(n1), "--public")
    assert code == 0, err
    (tmp_path / "n1.pub").write_text(out)
    cert_file = tmp_path / "n1.cert"
    code, out, err = run(
        keys, "ca", "admit", str(tmp_path / "n1.pub"), "--id", "n1", "--network", "lab",
        "--valid-days", "30", "--out", str(cert_file),
    )  # fmt: skip
    assert code == 0, err
    assert "id 'n1', expires" in out
    # without --out, printed: the key given as text, the network key as a file
    node_key = (tmp_path / "n1.pub").read_text().strip()
    code, printed, err = run(keys, "ca", "admit", node_key, "--id", "n1", "--ca-file", str(ca_file))
    assert code == 0 and printed.startswith("p2pfl-cert ") and "id 'n1'" in err

    code, out, err = run(
        keys, "ca", "install", str(cert_file), "--state-dir", str(n1), "--ca-key", network_key
    )
    assert code == 0, err
    assert "installed" in out and (n1 / CERT_FILE).is_file()

    # The node is now accepted by a peer holding only the network key.
    identity = load_identity(n1, create=False)
    data = own_certificate(n1, load_private_key(ca_file).public_key(), "n1", identity.public_raw)
    peer = Trust("ca", ca_key=network_key)
    payload = encode_presence(
        "lab", "n1", 1, online=True, role="trainer", broker="", signer=identity, cert=data
    )
    assert peer.check(payload, cert=lambda: presence_certificate(payload)).src == "n1"


def test_ca_errors_are_one_line_and_exit_2(tmp_path: Path, keys: CliRunner) -> None:
    def fails(*args: str, match: str) -> None:
        code, _out, err = run(keys, *args)
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert match in err, err

    ca_file = str(tmp_path / "net.key")
    fails("ca", "show", "--ca-file", ca_file, match="keys ca init")
    fails("ca", "admit", "p2pfl-ed25519 AAAA", "--id", "n1", "--ca-file", ca_file,
          match="32 bytes")  # fmt: skip
    node_key = key_text(Identity.generate().public)
    fails("ca", "admit", node_key, "--id", "n1", "--ca-file", ca_file, match="keys ca init")
    assert run(keys, "ca", "init", "--ca-file", ca_file)[0] == 0
    fails("ca", "init", "--ca-file", ca_file, match="--force")
    assert run(keys, "ca", "init", "--ca-file", ca_file, "--force")[0] == 0
    fails("ca", "admit", node_key, "--id", "a/b", "--ca-file", ca_file, match="node id")
    Path(tmp_path / "not.key").write_text("hello\n")
    fails("ca", "show", "--ca-file", str(tmp_path / "not.key"), match="not a PEM private key")

    # install: a certificate for someone else's key, or id, or from another network key
    n1 = tmp_path / "n1"
    me = load_identity(n1)
    someone = run(keys, "ca", "admit", node_key, "--id", "n1", "--ca-file", ca_file)[1].strip()
    fails("ca", "install", someone, "--state-dir", str(n1), match="another key")
    mine = run(keys, "ca", "admit", key_text(me.public), "--id", "n1", "--ca-file", ca_file)[1]
    fails("ca", "install", mine.strip(), "--state-dir", str(n1), "--id", "n2",
          match="for id 'n1'")  # fmt: skip
    other_network = key_text(Ed25519PrivateKey.generate().public_key())
    fails("ca", "install", mine.strip(), "--state-dir", str(n1), "--ca-key", other_network,
          match="not signed by the network key")  # fmt: skip
    fails("ca", "install", "p2pfl-cert AAAA", "--state-dir", str(n1), match="not a p2pfl cert")
    fails("ca", "install", mine.strip(), "--state-dir", str(tmp_path / "nobody"),
          match="no identity yet")  # fmt: skip
    assert not (n1 / CERT_FILE).exists()
    # a node that ran before remembers its id: a certificate for another id is caught
    (n1 / "identity.json").write_text(json.dumps({"id": "n9"}))
    fails("ca", "install", mine.strip(), "--state-dir", str(n1), match="this node is 'n9'")


def test_ca_help_teaches_the_commands(keys: CliRunner) -> None:
    result = keys.invoke(app, ["keys", "ca", "--help"])
    assert result.exit_code == 0
    for text in ("init", "admit", "install", "show", "--trust ca", "keys ca admit n1.pub"):
        assert text in result.stdout
    admit = keys.invoke(app, ["keys", "ca", "admit", "--help"]).stdout
    assert "NODE_PUBKEY" in admit and "--valid-days" in admit and "--id" in admit


def test_config_takes_the_network_key_as_text_or_file(tmp_path: Path) -> None:
    text = key_text(Ed25519PrivateKey.generate().public_key())
    (tmp_path / "net.pub").write_text(text + "\n")
    from_file = NodeConfig(trust="ca", ca_key=str(tmp_path / "net.pub"))
    assert from_file.ca_key == text == NodeConfig(trust="ca", ca_key=text).ca_key
    with pytest.raises(ValueError, match="ca_key"):
        NodeConfig(trust="ca")


def test_the_longest_id_fits(ca: Ed25519PrivateKey, node: Identity) -> None:
    longest = "\U0001f600" * 64  # 64 characters of 4 UTF-8 bytes each
    data = issue(ca, longest, node.public)
    assert len(data) <= MAX_CERT
    assert verify_cert(data, ca.public_key(), longest, node.public_raw, NOW).node_id == longest
