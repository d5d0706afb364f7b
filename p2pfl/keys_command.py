"""`p2pfl keys`: show this node's identity, and manage the keys it trusts for its peers.

Kept apart from the identity itself so that `p2pfl --help` imports typer only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from p2pfl.config import default_state_dir

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

EPILOG = """
Examples:

  p2pfl keys show --state-dir st/n1                  # this node's public key and fingerprint
  p2pfl keys show --state-dir st/n1 --public > n1.pub
  p2pfl keys trust n1.pub --id n1 --state-dir st/n2  # n2 accepts only this key for n1
  p2pfl keys list --state-dir st/n2
  p2pfl keys revoke n1 --state-dir st/n2
  p2pfl keys ca --help                               # admit nodes by certificate (--trust ca)

Without --state-dir, the default state dir of --network and --id is used (as p2pfl run does).
"""


def _typer(name: str, summary: str, epilog: str) -> typer.Typer:
    """A command group; its epilog is printed as written (no rich markup)."""
    return typer.Typer(
        name=name, help=summary, epilog=epilog, no_args_is_help=True, rich_markup_mode=None
    )


app = _typer("keys", "This node's signing identity and the keys it trusts (trusted_keys).", EPILOG)

StateDirOption = typer.Option(
    None, "--state-dir", help="The node's state dir. [default: that of --network and --id]"
)
NetworkOption = typer.Option("default", "--network", help="Network (to find the state dir).")
IdOption = typer.Option(None, "--id", help="Node id (to find the state dir).")


def _state_dir(state_dir: Path | None, network: str, node_id: str | None) -> Path:
    return state_dir or default_state_dir(network, node_id)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def show(
    state_dir: Path | None = StateDirOption,
    network: str = NetworkOption,
    node_id: str | None = IdOption,
    public: bool = typer.Option(False, "--public", help="Print only the public key line."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print this node's public key and fingerprint (the key is made if there is none yet)."""
    from p2pfl.identity import KeyFileError, fingerprint, key_text, load_identity

    where = _state_dir(state_dir, network, node_id)
    try:
        identity = load_identity(where)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
        return
    text, print_ = key_text(identity.public), fingerprint(identity.public)
    if public:
        typer.echo(text)
    elif json_out:
        typer.echo(json.dumps({"state_dir": str(where), "public_key": text, "fingerprint": print_}))
    else:
        typer.echo(f"public key:  {text}\nfingerprint: {print_}\nstate dir:   {where}")


@app.command()
def trust(
    key: str = typer.Argument(..., help="The peer's public key ('p2pfl-ed25519 ...') or a file."),
    peer_id: str = typer.Option(..., "--id", help="The peer id this key speaks for."),
    comment: str = typer.Option("", help="A note kept with the key."),
    state_dir: Path | None = StateDirOption,
    network: str = NetworkOption,
    node_id: str | None = typer.Option(None, "--node", help="This node's id (state dir)."),
) -> None:
    """Trust KEY for peer --id (replaces a key trusted for that id before)."""
    from p2pfl.identity import KeyFileError, TrustedKeys, read_key_argument, short_fingerprint

    where = _state_dir(state_dir, network, node_id)
    try:
        public = read_key_argument(key)
        added = TrustedKeys(where).add(peer_id, public, comment)
    except (KeyFileError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    state = "trusted" if added else "already trusted"
    typer.echo(f"{state}: {peer_id} {short_fingerprint(public)} in {where / 'trusted_keys'}")


@app.command(name="list")
def list_keys(
    state_dir: Path | None = StateDirOption,
    network: str = NetworkOption,
    node_id: str | None = IdOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the trusted peer keys."""
    from p2pfl.identity import KeyFileError, TrustedKeys, fingerprint, key_text

    where = _state_dir(state_dir, network, node_id)
    try:
        entries = TrustedKeys(where).load()
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
        return
    rows = [{"id": e.node_id, "public_key": key_text(e.key), "fingerprint": fingerprint(e.key),
             "comment": e.comment} for e in entries]  # fmt: skip
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no trusted keys in {where}", err=True)
    for row in rows:
        typer.echo(f"{row['id']}  {row['fingerprint']}  {row['comment']}".rstrip())


@app.command()
def revoke(
    peer_id: str = typer.Argument(..., help="The peer id whose key is no longer trusted."),
    state_dir: Path | None = StateDirOption,
    network: str = NetworkOption,
    node_id: str | None = typer.Option(None, "--node", help="This node's id (state dir)."),
) -> None:
    """Stop trusting the key of peer ID (trusted, or pinned on first use): under tofu, the
    next key it shows is pinned anew."""
    from p2pfl.identity import KeyFileError, TrustedKeys
    from p2pfl.trust import KNOWN_FILE

    where = _state_dir(state_dir, network, node_id)
    try:
        files = (TrustedKeys(where), TrustedKeys(where, KNOWN_FILE))
        removed = any([keys.remove(peer_id) for keys in files])  # a list: both files, always
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
        return
    if not removed:
        typer.echo(f"{peer_id} was not trusted in {where}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"revoked: {peer_id}")


CA_EPILOG = """
Membership certificates (p2pfl run --trust ca): one network key admits any number of nodes.

\b
  # on the admin machine, once per network (the private key stays there)
  p2pfl keys ca init --network lab
  # on each node: its public key, to send to the admin
  p2pfl keys show --network lab --id n1 --public > n1.pub
  # on the admin machine: a certificate for that key and id
  p2pfl keys ca admit n1.pub --id n1 --network lab --out n1.cert
  # on the node: install it, then run with the network's public key
  p2pfl keys ca install n1.cert --network lab --id n1
  p2pfl run --network lab --id n1 --trust ca --ca-key 'p2pfl-ed25519 ...'

Without --ca-file, the network key is kept in ~/.local/state/p2pfl/ca/NETWORK.key
($XDG_STATE_HOME/p2pfl/ca/NETWORK.key).
"""

ca_app = _typer(
    "ca", "A network key that admits nodes by certificate (p2pfl run --trust ca).", CA_EPILOG
)
app.add_typer(ca_app, name="ca")

CaFileOption = typer.Option(
    None,
    "--ca-file",
    help="The network's private key file. [default: ~/.local/state/p2pfl/ca/NETWORK.key]",
)
CaNetworkOption = typer.Option("default", "--network", help="Network the key admits nodes to.")


def _ca_file(ca_file: Path | None, network: str) -> Path:
    from p2pfl.config import default_ca_file
    from p2pfl.protocol.topics import validate_name

    try:
        validate_name(network, "network")
    except ValueError as exc:
        _fail(str(exc))
    return ca_file or default_ca_file(network)


def _load_ca(ca_file: Path | None, network: str) -> tuple[Path, Ed25519PrivateKey]:
    from p2pfl.identity import KeyFileError, load_private_key

    path = _ca_file(ca_file, network)
    if not path.exists():
        _fail(f"no network key at {path}: run p2pfl keys ca init first (or give --ca-file)")
    try:
        return path, load_private_key(path)
    except KeyFileError as exc:
        _fail(str(exc))


@ca_app.command(name="init")
def ca_init(
    ca_file: Path | None = CaFileOption,
    network: str = CaNetworkOption,
    force: bool = typer.Option(
        False, "--force", help="Replace an existing key: certificates it signed stop counting."
    ),
) -> None:
    """Make the network key (once per network, on the admin machine) and print its public
    key, which every node is given with --ca-key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pfl.identity import key_text, write_private_key

    path = _ca_file(ca_file, network)
    key = Ed25519PrivateKey.generate()
    try:
        write_private_key(path, key, overwrite=force)
    except FileExistsError:
        _fail(
            f"{path} exists already (p2pfl keys ca show prints its public key); --force "
            "replaces it, and then no certificate it signed is accepted any more"
        )
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
    text = key_text(key.public_key())
    typer.echo(text)
    typer.echo(f"network key written to {path} (keep it secret: it admits nodes)", err=True)
    typer.echo(f"start every node with: --trust ca --ca-key '{text}'", err=True)


@ca_app.command(name="show")
def ca_show(ca_file: Path | None = CaFileOption, network: str = CaNetworkOption) -> None:
    """Print the network's public key (the value of --ca-key)."""
    from p2pfl.identity import key_text

    _path, key = _load_ca(ca_file, network)
    typer.echo(key_text(key.public_key()))


@ca_app.command(name="admit")
def ca_admit(
    node_pubkey: str = typer.Argument(
        ...,
        metavar="NODE_PUBKEY",
        help="The node's public key ('p2pfl-ed25519 ...', from p2pfl keys show --public) or a "
        "file holding it.",
    ),
    peer_id: str = typer.Option(..., "--id", help="The node id this key speaks for."),
    ca_file: Path | None = CaFileOption,
    network: str = CaNetworkOption,
    valid_days: int | None = typer.Option(
        None, "--valid-days", min=1, help="Expire after N days. [default: never]"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write the certificate to this file. [default: print it]"
    ),
) -> None:
    """Issue a certificate: the network key vouches that NODE_PUBKEY speaks for node --id.
    Give it to that node: p2pfl keys ca install."""
    from p2pfl.certs import cert_text, issue, parse_cert
    from p2pfl.identity import KeyFileError, read_key_argument, short_fingerprint
    from p2pfl.store import atomic_write_bytes

    try:
        public = read_key_argument(node_pubkey)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
        return
    _path, key = _load_ca(ca_file, network)
    try:
        data = issue(key, peer_id, public, valid_days=valid_days)
    except ValueError as exc:
        _fail(str(exc))
        return
    text = cert_text(data)
    what = f"certificate for {parse_cert(data).describe()}, key {short_fingerprint(public)}"
    if out is None:
        typer.echo(text)
        typer.echo(what, err=True)
        return
    try:
        atomic_write_bytes(out, (text + "\n").encode())
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror}")
    typer.echo(f"{what} written to {out}")


@ca_app.command(name="install")
def ca_install(
    cert: str = typer.Argument(
        ..., metavar="CERT", help="The certificate ('p2pfl-cert ...', from the admin) or a file."
    ),
    state_dir: Path | None = StateDirOption,
    network: str = NetworkOption,
    node_id: str | None = IdOption,
    ca_key: str | None = typer.Option(
        None, "--ca-key", help="Also check that this network key signed it (text or file)."
    ),
) -> None:
    """Install this node's certificate (membership.cert in its state dir), after checking that
    it names this node's key."""
    import time

    from p2pfl.certs import parse_cert, read_cert_argument, verify_cert, write_certificate
    from p2pfl.identity import KeyFileError, load_identity, read_key_argument, short_fingerprint
    from p2pfl.protocol.errors import ProtocolError

    where = _state_dir(state_dir, network, node_id)
    try:
        data = read_cert_argument(cert)
        identity = load_identity(where, create=False)
        network_key = None if ca_key is None else read_key_argument(ca_key)
    except (KeyFileError, OSError) as exc:
        _fail(str(exc))
        return
    parsed = parse_cert(data)
    if parsed.pk != identity.public_raw:
        mine = short_fingerprint(identity.public)
        _fail(
            f"this certificate is for another key, not this node's {mine} (state dir {where}): "
            "the admin must admit the key that p2pfl keys show --public prints"
        )
    expected = node_id or _stored_id(where)
    if expected is not None and parsed.node_id != expected:
        _fail(f"this certificate is for id {parsed.node_id!r}, and this node is {expected!r}")
    if parsed.expired(time.time()):
        _fail(f"this certificate has expired ({parsed.describe()})")
    if network_key is not None:
        try:
            verify_cert(data, network_key, parsed.node_id, identity.public_raw, time.time())
        except ProtocolError as exc:
            _fail(exc.reason)
    try:
        path = write_certificate(where, data)
    except OSError as exc:
        _fail(f"cannot write {where}: {exc.strerror}")
        return
    typer.echo(f"installed: certificate for {parsed.describe()} in {path}")


def _stored_id(state_dir: Path) -> str | None:
    """The id a node keeps in its state dir (identity.json), if it ran before."""
    try:
        stored = json.loads((state_dir / "identity.json").read_text())
    except (OSError, ValueError):
        return None
    node_id = stored.get("id") if isinstance(stored, dict) else None
    return node_id if isinstance(node_id, str) else None
