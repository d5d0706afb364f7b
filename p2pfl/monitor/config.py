"""`MonitorConfig`: the options of `p2pfl monitor`, one immutable model, from TOML and flags.

Read by the same loader as `NodeConfig` (`p2pfl.config_file.load_model`), so `p2pfl monitor
--config FILE` takes every flag's key, and a bad value is one line naming the key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from p2pfl.config import Interfaces, NetworkName, StaticPeer, check_broker_uri

__all__ = ["Bind", "MonitorConfig", "check_exposure"]

# checked as a whole, so that an error names the key `brokers`, not one item of it
BrokerUris = Annotated[
    tuple[str, ...], AfterValidator(lambda uris: tuple(map(check_broker_uri, uris)))
]


@dataclass(frozen=True)
class Bind:
    """Where the dashboard listens: `--web HOST:PORT`, or `--web PORT` for 127.0.0.1."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Bind:
        """`PORT`, `HOST:PORT` or `[IPV6]:PORT`; ValueError saying what is wrong."""
        host, sep, port = text.strip().rpartition(":")
        if not sep:
            host = "127.0.0.1"
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected PORT or HOST:PORT (port 0-65535), got {text!r}")
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: where it resolves is not known here


def check_exposure(bind: Bind, token: str | None) -> None:
    """ValueError when the dashboard would be open to the network without a token."""
    if token is None and not bind.loopback:
        raise ValueError(
            f"--web {bind.host}:{bind.port} is not a loopback address: give --web-token TOKEN, "
            "or bind 127.0.0.1 and reach it over an SSH tunnel"
        )


def _bind(text: str) -> str:
    Bind.parse(text)
    return text


class MonitorConfig(BaseModel):
    """What `p2pfl monitor` watches and where it writes. Each field is a flag and a file key."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True
    )

    network: NetworkName = Field("default", description="Network to watch.")
    brokers: BrokerUris = Field(
        (), description="Broker to listen on, mqtt[s]://HOST:PORT (repeatable)."
    )
    peers: tuple[StaticPeer, ...] = Field(
        (), description="Static peer ID=mqtt://HOST:PORT (repeatable)."
    )
    interfaces: Interfaces = Field(
        (), description="IP of an interface mDNS uses (repeatable). [default: all]"
    )
    mdns: bool = Field(True, description="Discover nodes over mDNS.")
    once: bool = Field(False, description="Print one snapshot and exit.")
    # `json` is a method of pydantic models: the field has another name, the key is `json`
    json_out: bool = Field(False, alias="json", description="With --once: JSON instead of a table.")
    wait: float = Field(
        5.0,
        ge=0,
        description="With --once: listen at most this long for every discovered node to report.",
    )
    export: Path | None = Field(
        None, description="Append a JSON snapshot every second to this .jsonl file."
    )
    plot: Path | None = Field(
        None, description="On exit, write global accuracy and divergence over time to this PNG."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port (0 = any free port).",
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds.")
    web: Annotated[str, AfterValidator(_bind)] | None = Field(
        None,
        description="Serve the web dashboard on HOST:PORT (a PORT alone: 127.0.0.1:PORT).",
    )
    web_token: str | None = Field(
        None,
        min_length=8,
        description="With --web: every request must carry ?token=TOKEN or "
        "Authorization: Bearer TOKEN (needed to bind a non-loopback address).",
    )
    stale_after: float | None = Field(
        None,
        gt=0,
        description="Seconds of silence before a node is stale. [default: 3 telemetry periods]",
    )
    forget_after: float = Field(
        60.0, gt=0, description="Seconds of silence before a node is dropped."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    trust: Literal["tofu", "allowlist", "ca", "open"] = Field(
        "tofu",
        description="Which nodes' records to believe: tofu | allowlist | ca | open (as p2pfl run).",
    )
    ca_key: str | None = Field(
        None, description="With --trust ca: the network's public key, or a file holding it."
    )
    state_dir: Path | None = Field(
        None,
        description="The monitor's key, trusted_keys and pinned keys. "
        "[default: ~/.local/state/p2pfl/NET/monitor]",
    )
