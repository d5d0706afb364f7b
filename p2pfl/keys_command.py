"""`p2pfl keys`: show this node's identity, and manage the keys it trusts for its peers.

Kept apart from the identity itself so that `p2pfl --help` imports typer only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from p2pfl.config import default_state_dir

EPILOG = """
Examples:

  p2pfl keys show --state-dir st/n1                  # this node's public key and fingerprint
  p2pfl keys show --state-dir st/n1 --public > n1.pub
  p2pfl keys trust n1.pub --id n1 --state-dir st/n2  # n2 accepts only this key for n1
  p2pfl keys list --state-dir st/n2
  p2pfl keys revoke n1 --state-dir st/n2

Without --state-dir, the default state dir of --network and --id is used (as p2pfl run does).
"""

app = typer.Typer(
    name="keys",
    help="This node's signing identity and the keys it trusts (trusted_keys).",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)

StateDirOption = typer.Option(
    None, "--state-dir", help="The node's state dir. [default: that of --network and --id]"
)
NetworkOption = typer.Option("default", "--network", help="Network (to find the state dir).")
IdOption = typer.Option(None, "--id", help="Node id (to find the state dir).")


def _state_dir(state_dir: Path | None, network: str, node_id: str | None) -> Path:
    return state_dir or default_state_dir(network, node_id)


def _fail(message: str) -> None:
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
