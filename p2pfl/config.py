"""Node configuration: one immutable pydantic model, loaded from TOML and overridden by flags.

Validated once at start-up; a bad value becomes one readable line naming the key
(`format_error`), and the CLI exits with status 2.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2pfl.protocol.topics import validate_name

Schedule = Literal["ring", "random-walk", "partial-mesh"]
DiscoverySource = Literal["static", "presence", "mdns"]
TelemetryDetail = Literal["full", "metrics", "off"]
"""What a node's telemetry reveals: everything, metrics without the confusion matrix and the
weight projection (they reveal the label distribution and something of the weights), or none."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class StaticPeer(BaseModel):
    """A peer known in advance: its id and its home broker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    broker: str

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return validate_name(value, "peer id")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        from p2pfl.transport.mqtt import parse_broker_uri

        parse_broker_uri(value)
        return value

    @classmethod
    def parse(cls, text: str) -> StaticPeer:
        """Parse the `--peer ID=mqtt://HOST:PORT` form."""
        peer_id, sep, broker = text.partition("=")
        if not sep:
            raise ValueError(f"expected ID=mqtt://HOST:PORT, got {text!r}")
        try:
            return cls(id=peer_id.strip(), broker=broker.strip())
        except ValidationError as exc:  # one line, naming the part that is wrong
            err = exc.errors()[0]
            what = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{what}: {err['msg'].removeprefix('Value error, ')}") from None


class NodeConfig(BaseModel):
    """Everything a node needs to run. Immutable once validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # identity and network
    network: str = "default"
    id: str | None = None
    role: Literal["trainer", "monitor"] = "trainer"
    # brokers: embedded (amqtt in-process), local (private mosquitto child), or a URI
    broker: str = "embedded"
    listen: str = "0.0.0.0:0"
    advertise: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    # a TLS listener for the embedded/local broker (peers then dial mqtts://)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Mosquitto password file for --broker local (with TLS it may then listen on the LAN)
    password_file: Path | None = None
    # membership
    peers: tuple[StaticPeer, ...] = ()
    discovery: tuple[DiscoverySource, ...] = ("static", "presence", "mdns")
    interfaces: tuple[str, ...] = ()
    presence_ttl: float = Field(15.0, gt=0)
    # Before the first round, wait (up to round_timeout) until this many peers are live.
    # None: every static peer in sync mode, nobody in async mode.
    min_peers: int | None = Field(None, ge=0)
    # schedule
    schedule: Schedule = "ring"
    degree: int = Field(4, ge=1)
    topology_file: Path | None = None
    walkers: int = Field(0, ge=0)
    token_timeout: float = Field(30.0, gt=0)
    mode: Literal["async", "sync"] = "async"
    period: float = Field(0.0, ge=0)
    round_timeout: float = Field(30.0, gt=0)
    rounds: int = Field(0, ge=0)
    duration: float | None = Field(None, gt=0)
    # learning
    dataset: str = "mnist1d"
    partition: str = "iid"
    num_partitions: int = Field(1, ge=1)
    partition_index: int = Field(0, ge=0)
    model: str = "cnn1d"
    merge: str = "clipped"  # learning/merge.py: which rule defends against what
    # pairwise-masked secure aggregation (p2pfl/secagg.py): sync partial-mesh with average only
    secure_aggregation: bool = False
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    local_epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    mu: float = Field(0.0, ge=0)
    # differential privacy (learning/privacy.py): DP-SGD, off unless dp_epsilon is given
    dp_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)
    seed: int = 0
    codec: str = "raw"
    max_round_lag: int = Field(10, ge=0)
    # trust (DESIGN.md, Trust): who may speak for a peer id
    trust: Literal["tofu", "allowlist", "ca", "open"] = "tofu"
    # trust = ca: the network's public key (its text, or a file holding it; kept as the text)
    ca_key: str | None = None
    max_peers: int = Field(256, ge=1)
    max_clock_skew: float = Field(300.0, gt=0)
    # limits, state, output
    max_message_size: int = Field(64 * 1024 * 1024, ge=1024)
    max_chunk: int = Field(1024 * 1024, ge=1024)
    state_dir: Path | None = None
    checkpoints_keep: int = Field(3, ge=1)
    # telemetry for monitors: every N seconds (0 = off); a run name and tags to group runs
    telemetry_interval: float = Field(5.0, ge=0)
    telemetry_detail: TelemetryDetail = "full"
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    run_name: str = ""
    tags: tuple[str, ...] = ()
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("network")
    @classmethod
    def _check_network(cls, value: str) -> str:
        return validate_name(value, "network")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "id")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value in ("embedded", "local"):
            return value
        from p2pfl.transport.mqtt import parse_broker_uri

        parse_broker_uri(value)
        return value

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        hosts = [h.strip() for h in value.split(",")]
        for host in hosts:
            if not host or "://" in host or "/" in host or any(c.isspace() for c in host):
                raise ValueError(
                    f"expected HOST or HOST,HOST (names or IPs, no scheme or port), got {value!r}"
                )
        return ",".join(hosts)

    @field_validator("ca_key")
    @classmethod
    def _check_ca_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from p2pfl.identity import key_text, read_key_argument

        return key_text(read_key_argument(value))

    @field_validator("interfaces")
    @classmethod
    def _check_interfaces(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for ip in value:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"expected the IP address of an interface, got {ip!r}") from None
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str) -> str:
        from p2pfl.learning.partition import parse_partition

        parse_partition(value)
        return value

    @field_validator("merge")
    @classmethod
    def _check_merge(cls, value: str) -> str:
        from p2pfl.learning.merge import parse_merge

        parse_merge(value)
        return value

    @field_validator("codec")
    @classmethod
    def _check_codec(cls, value: str) -> str:
        from p2pfl.protocol.codec import parse_codec

        parse_codec(value)
        return value

    @field_validator("discovery")
    @classmethod
    def _check_discovery(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("choose at least one of static, presence, mdns")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _check_cross_fields(self) -> NodeConfig:
        if self.partition_index >= self.num_partitions:
            raise ValueError(
                f"partition_index ({self.partition_index}) must be below "
                f"num_partitions ({self.num_partitions})"
            )
        if self.max_chunk > self.max_message_size:
            raise ValueError(
                f"max_chunk ({self.max_chunk}) must not exceed max_message_size "
                f"({self.max_message_size})"
            )
        if self.walkers and self.mode != "async":
            raise ValueError("walkers: token mode runs in async mode only (use --mode async)")
        if self.walkers and self.schedule == "partial-mesh":
            raise ValueError("walkers: token mode applies to ring and random-walk only")
        if self.dp_epsilon is not None:
            if self.rounds == 0:
                raise ValueError(
                    "dp_epsilon: a privacy budget needs a planned run: set rounds (the noise "
                    "is calibrated so that rounds x local_epochs epochs spend at most epsilon)"
                )
            if self.mu > 0:
                raise ValueError(
                    "dp_epsilon: FedProx (mu > 0) cannot be trained with DP-SGD: its proximal "
                    "term is not a per-sample gradient; set mu = 0"
                )
        if self.trust == "ca" and self.ca_key is None:
            raise ValueError(
                "ca_key: trust = ca needs the network's public key (p2pfl keys ca show prints "
                "it; give it, or a file holding it, as --ca-key)"
            )
        if self.broker == "local" and (self.tls_cert is None or self.password_file is None):
            host = parse_host_port(self.listen)[0]
            if host not in ("0.0.0.0", "::", "") and not _is_loopback(host):
                raise ValueError(
                    f"listen: --broker local listens on loopback only unless --tls-cert, "
                    f"--tls-key and --password-file are given (got {host})"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (the broker's certificate and key)")
        for name in ("tls_cert", "tls_key", "password_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file {path}")
        if self.topology_file is not None and not self.topology_file.is_file():
            raise ValueError(f"topology_file: no such file {self.topology_file}")
        if self.secure_aggregation:
            self._check_secure_aggregation()
        return self

    def _check_secure_aggregation(self) -> None:
        """Masked models only add up: the receiver must merge by their plain sum, in rounds
        that all senders agree on, from at least two senders (one alone would be revealed)."""
        need = "secure_aggregation: needs"
        if self.mode != "sync":
            raise ValueError(f"{need} mode = sync (got {self.mode})")
        if self.merge.strip().lower() != "average":
            raise ValueError(
                f"{need} merge = average (got {self.merge}): a receiver cannot clip or rank "
                "models it cannot see"
            )
        if "presence" not in self.discovery:
            raise ValueError(
                f"{need} presence in discovery: peers' agreement keys travel in their presence"
            )
        if self.schedule != "partial-mesh":
            raise ValueError(
                f"{need} schedule = partial-mesh (got {self.schedule}): at least two senders "
                "per round"
            )
        if self.topology_file is None:
            if self.degree < 2:
                raise ValueError(f"{need} degree >= 2 (got {self.degree}): two senders per round")
            return
        from p2pfl.topology import load_graph

        graph = load_graph(self.topology_file)
        lonely = sorted(str(n) for n, d in graph.degree() if d < 2)
        if lonely:
            raise ValueError(
                f"{need} every node of topology_file to have two neighbours or more "
                f"({', '.join(lonely[:5])} has fewer)"
            )


def state_root() -> Path:
    """`$XDG_STATE_HOME/p2pfl` (default `~/.local/state/p2pfl`): where p2pfl keeps its files."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "p2pfl"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_state_dir(network: str, node_id: str | None) -> Path:
    """`$XDG_STATE_HOME/p2pfl/<network>/<id or 'node'>`."""
    return state_root() / network / (node_id or "node")


def default_ca_file(network: str) -> Path:
    """`$XDG_STATE_HOME/p2pfl/ca/<network>.key`: the network key `p2pfl keys ca init` makes."""
    return state_root() / "ca" / f"{network}.key"


def parse_host_port(value: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 as `[::1]:PORT`); port 0 means a free port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return host, port


def format_error(exc: ValidationError) -> str:
    """One readable line per problem, naming the key and the bad value."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = (
            "" if isinstance(value, Mapping) or err["type"] == "missing" else f" (got {value!r})"
        )
        lines.append(f"config error: {key}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> NodeConfig:
    """Read the TOML file (if any), apply flag overrides (None = not given), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path} is not valid TOML: {exc}") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
    for key, value in overrides.items():
        if value is None or value == ():
            continue
        data[key] = value
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_error(exc)) from None
