"""Node configuration: one immutable pydantic model, loaded from TOML and overridden by flags.

Validated once at start-up; a bad value becomes one readable line naming the key
(`format_error`), and the CLI exits with status 2.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from p2pfl.config_file import ConfigError, format_error, load_model, read_toml
from p2pfl.protocol.topics import validate_name, validate_run_name

# What a monitor accepts in a telemetry record (p2pfl.status): longer tags would void it.
MAX_TAG = 64
MAX_TAGS = 100

__all__ = [
    "ConfigError",
    "NodeConfig",
    "ScheduleName",
    "StaticPeer",
    "format_error",
    "load_config",
]

ScheduleName = Literal["ring", "random-walk", "partial-mesh"]
"""A schedule by name (`p2pfl.topology.Schedule` is the object that plans the rounds)."""
DiscoverySource = Literal["static", "presence", "mdns"]
TelemetryDetail = Literal["full", "metrics", "off"]
"""What a node's telemetry reveals: everything, metrics without the confusion matrix and the
weight projection (they reveal the label distribution and something of the weights), or none."""


def check_interfaces(value: tuple[str, ...]) -> tuple[str, ...]:
    """Interfaces are given by IP address (a name such as eth0 is refused)."""
    for ip in value:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"expected the IP address of an interface, got {ip!r}") from None
    return value


def check_broker_uri(value: str) -> str:
    """A broker given by URI, `mqtt[s]://HOST:PORT`."""
    from p2pfl.transport.address import parse_broker_uri

    parse_broker_uri(value)
    return value


NetworkName = Annotated[str, AfterValidator(lambda value: validate_name(value, "network"))]
BrokerUri = Annotated[str, AfterValidator(check_broker_uri)]
Interfaces = Annotated[tuple[str, ...], AfterValidator(check_interfaces)]


class StaticPeer(BaseModel):
    """A peer known in advance: its id and its home broker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    broker: BrokerUri

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """A peer may be written as the flag writes it, `ID=mqtt://HOST:PORT`, in files too."""
        if not isinstance(value, str):
            return value
        peer_id, sep, broker = value.partition("=")
        if not sep:
            raise ValueError("expected ID=mqtt://HOST:PORT")
        return {"id": peer_id.strip(), "broker": broker.strip()}

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return validate_name(value, "peer id")

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
    """Everything a node needs to run. Immutable once validated.

    Each field is a key of the TOML file and a flag of `p2pfl run` (`p2pfl.cli` derives the
    flags from these fields: name, type, default and the description as help).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # identity and network
    network: NetworkName = Field("default", description="Network name; nodes only talk within one.")
    id: str | None = Field(
        None, description="Node id. [default: hostname-based, kept in the state dir]"
    )
    role: Literal["trainer", "monitor"] = Field(
        "trainer",
        description="What this node announces itself as: trainer, or monitor (peers then send "
        "it no models).",
    )
    # brokers: embedded (amqtt in-process), local (private mosquitto child), or a URI
    broker: str = Field("embedded", description="embedded | local | mqtt[s]://HOST:PORT.")
    listen: str = Field(
        "0.0.0.0:0", description="HOST:PORT of the embedded/local broker; port 0 = free."
    )
    advertise: str | None = Field(
        None,
        description="Host(s) peers use to reach this node's broker, comma-separated (NAT, "
        "containers). [default: every non-loopback interface address]",
    )
    ca: Path | None = Field(None, description="CA file to verify mqtts:// brokers (peers' too).")
    cert: Path | None = Field(
        None, description="Client certificate for the --broker URI (sent to that broker only)."
    )
    key: Path | None = Field(None, description="Client key for --cert.")
    username: str | None = Field(
        None, description="User name for the --broker URI (peers' brokers get a key-based login)."
    )
    password: str | None = Field(
        None, description="Password for the --broker URI; never sent to any other broker."
    )
    # a TLS listener for the embedded/local broker (peers then dial mqtts://)
    tls_cert: Path | None = Field(
        None, description="Certificate for a TLS listener of this node's broker (mqtts://)."
    )
    tls_key: Path | None = Field(None, description="Key for --tls-cert.")
    password_file: Path | None = Field(
        None,
        description="Mosquitto password file for --broker local; with --tls-cert it may listen "
        "on the LAN (without both it listens on loopback only).",
    )
    # membership
    peers: tuple[StaticPeer, ...] = Field(
        (), description="Static peer ID=mqtt://HOST:PORT (repeatable)."
    )
    discovery: tuple[DiscoverySource, ...] = Field(
        ("static", "presence", "mdns"), description="Comma list of mdns,presence,static."
    )
    interfaces: Interfaces = Field(
        (),
        description="IP of an interface to use (repeatable): mDNS runs there and it is the "
        "address announced. [default: all interfaces]",
    )
    presence_ttl: float = Field(
        15.0, gt=0, description="Forget a silent peer after this many seconds."
    )
    # peer sampling (discovery/sampling.py): a bounded view of a large network, one shared broker
    view_size: int = Field(
        0,
        ge=0,
        description="Networks of hundreds on one shared broker: keep a partial view of this "
        "many peers, kept by shuffles, so a node's membership cost does not grow with the "
        "network (the same value on every node). 0 = every live peer.",
    )
    shuffle_interval: float = Field(
        2.0, gt=0, description="With --view-size: shuffle view entries with a peer this often, s."
    )
    # None: every static peer in sync mode, nobody in async mode.
    min_peers: int | None = Field(
        None,
        ge=0,
        description="Wait (up to --round-timeout, or until peers train without this node) for "
        "this many live peers before round 1. "
        "[default: all static peers if sync]",
    )
    # schedule
    schedule: ScheduleName = Field("ring", description="ring | random-walk | partial-mesh.")
    degree: int = Field(
        4, ge=1, description="Neighbours per node for partial-mesh (a new random graph each round)."
    )
    topology_file: Path | None = Field(
        None, description="Fixed graph (TOML edge list or GraphML) for partial-mesh."
    )
    walkers: int = Field(
        0,
        ge=0,
        description="Model tokens circulating (ring, random-walk); 0 = every node active.",
    )
    token_timeout: float = Field(
        30.0,
        gt=0,
        description="Walkers: regenerate a token after this many seconds with no sign of one "
        "(none arrived, no peer's round rose).",
    )
    mode: Literal["async", "sync"] = Field(
        "async", description="async (gossip) | sync (rounds, reproducible)."
    )
    period: float = Field(0.0, ge=0, description="Async mode: pause between local steps, seconds.")
    round_timeout: float = Field(
        30.0, gt=0, description="Sync mode: wait this long for neighbours' models."
    )
    rounds: int = Field(0, ge=0, description="Stop after N rounds; 0 = until stopped.")
    duration: float | None = Field(None, gt=0, description="Stop after this many seconds.")
    # learning
    dataset: str = Field(
        "mnist1d",
        description="mnist1d | mnist1d:N (N generated MNIST-1D samples: a fifth of them, at most "
        "1,000, the test set, the rest training data; cached) | digits | npz:PATH.",
    )
    partition: str = Field("iid", description="iid | dirichlet:ALPHA | shards:K.")
    num_partitions: int = Field(1, ge=1, description="How many shares the dataset is cut into.")
    partition_index: int = Field(0, ge=0, description="Which share this node trains on.")
    model: str = Field("cnn1d", description="logreg | mlp | cnn1d | package.module:factory.")
    # learning/merge.py: which rule defends against what
    merge: str = Field(
        "clipped",
        description="clipped[:F] (bounds any peer's pull and distrusts peers whose models keep "
        "landing far; best on partial-mesh) | average (no defence) | weighted[:C] | median | "
        "trimmed-mean:F | krum:F (several models per merge: partial-mesh only).",
    )
    # pairwise-masked secure aggregation (p2pfl/secagg.py): sync partial-mesh with average only
    secure_aggregation: bool = Field(
        False,
        description="Sync partial-mesh with --merge average: mask the models sent each round so "
        "a receiver learns only their sum (pairwise X25519 masks; one extra message when a "
        "sender drops out). Does not combine with robust merges.",
    )
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd | adam.")
    lr: float = Field(0.05, gt=0, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (--optimizer sgd).")
    local_epochs: int = Field(3, ge=1, description="Local epochs per round.")
    batch_size: int = Field(32, ge=1, description="Batch size.")
    mu: float = Field(0.0, ge=0, description="FedProx proximal term; 0 = off.")
    max_grad_norm: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="Clip each local step's gradient to this norm (0 = off; not with DP-SGD, "
        "which clips per sample): a merge that lands the model on a steep slope (a poisoned "
        "or diverged neighbour) cannot make its training blow up; honest steps rarely reach it.",
    )
    # differential privacy (learning/privacy.py): DP-SGD, off unless dp_epsilon is given
    dp_epsilon: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Differential privacy: train with DP-SGD (Opacus) so that this node's whole "
        "planned run (--rounds) spends at most this epsilon on its own samples. [default: off]",
    )
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="Delta of the DP budget.")
    dp_max_grad_norm: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="DP-SGD per-sample gradient clipping norm.",
    )
    seed: int = Field(0, description="Seed for data split, model init and schedule.")
    codec: str = Field("raw", description="raw | fp16 | int8 | topk:F.")
    max_round_lag: int = Field(
        10,
        ge=0,
        description="Merge no model more than this many rounds behind ours, and none claiming "
        "more than this beyond the round of the network (the median of peers' and ours).",
    )
    # trust (DESIGN.md, Trust): who may speak for a peer id
    trust: Literal["tofu", "allowlist", "ca", "open"] = Field(
        "tofu",
        description="Whose messages to believe: tofu (pin the first key seen per id) | "
        "allowlist (only trusted_keys: see p2pfl keys) | ca (nodes with a certificate from the "
        "network key --ca-key: see p2pfl keys ca) | open (no checks: demos).",
    )
    # trust = ca: the network's public key (its text, or a file holding it; kept as the text)
    ca_key: str | None = Field(
        None,
        description="With --trust ca: the network's public key ('p2pfl-ed25519 ...', printed by "
        "p2pfl keys ca init) or a file holding it.",
    )
    max_peers: int = Field(
        256, ge=1, description="Track at most this many peer ids (keys, replay state)."
    )
    max_clock_skew: float = Field(
        300.0, gt=0, description="Refuse messages stamped further than this from our clock, s."
    )
    # limits, state, output
    max_message_size: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Refuse incoming messages larger than this, bytes (64 MiB).",
    )
    max_chunk: int = Field(
        1024 * 1024,
        ge=1024,
        description="Split models into MQTT messages of at most this many bytes (1 MiB).",
    )
    # eligibility (eligibility.py): train only while the machine can spare it
    when: tuple[str, ...] = Field(
        (),
        description="Train only when: comma list of charging, idle[:PCT], unmetered, "
        "window=HH:MM-HH:MM (local time), max-cpu=PCT (throttle own training). An ineligible "
        "node pauses at its next round boundary. [default: always]",
    )
    metered_interfaces: tuple[str, ...] = Field(
        (),
        description="Network interfaces (names, comma list) that --when unmetered treats as "
        "metered, besides those NetworkManager flags.",
    )
    state_dir: Path | None = Field(
        None,
        description="Identity, checkpoints, metrics. [default: ~/.local/state/p2pfl/NET/ID]",
    )
    checkpoints_keep: int = Field(
        3, ge=1, description="Keep this many checkpoints in the state dir."
    )
    # telemetry for monitors: every N seconds (0 = off); a run name and tags to group runs
    telemetry_interval: float = Field(
        5.0, ge=0, description="Publish status for monitors every N seconds; 0 = off."
    )
    telemetry_detail: TelemetryDetail = Field(
        "full",
        description="What telemetry reveals: full | metrics (no confusion matrix, no weight "
        "projection: monitors leave the node out of global metrics) | off (no telemetry "
        "records; warnings are still forwarded).",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics (p2pfl_*) on this port."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")
    run_name: Annotated[str, AfterValidator(validate_run_name)] = Field(
        "",
        description="The run this node takes part in (1-64 of A-Za-z0-9._+-). [default: the "
        "run its peers announce, or a new one named NETWORK-UTCTIMESTAMP]",
    )
    tags: tuple[Annotated[str, Field(min_length=1, max_length=MAX_TAG)], ...] = Field(
        (), max_length=MAX_TAGS, description="A tag for this run (repeatable)."
    )
    log_format: Literal["text", "json"] = Field("text", description="text | json.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug | info | warning | error."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "id")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        return value if value in ("embedded", "local") else check_broker_uri(value)

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

    @field_validator("listen", "dataset", "partition", "merge", "codec")
    @classmethod
    def _check_parses(cls, value: str, info: ValidationInfo) -> str:
        """These keys stay text, which must parse as the node will parse it (the parsers are
        imported here: merge and partition pull in torch). A dataset's file is read later."""
        if info.field_name == "listen":
            parse_host_port(value)
        elif info.field_name == "dataset":
            from p2pfl.learning.datasets import parse_dataset_spec

            parse_dataset_spec(value)
        elif info.field_name == "partition":
            from p2pfl.learning.partition import parse_partition

            parse_partition(value)
        elif info.field_name == "merge":
            from p2pfl.learning.merge import parse_merge

            parse_merge(value)
        else:
            from p2pfl.protocol.codec import parse_codec

            parse_codec(value)
        return value

    @field_validator("when", "metered_interfaces", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value

    @field_validator("when")
    @classmethod
    def _check_when(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from p2pfl.eligibility import parse_when

        parse_when(value)
        return tuple(item.strip().lower() for item in value if item.strip())

    @field_validator("metered_interfaces")
    @classmethod
    def _check_metered(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(item.strip() for item in value if item.strip())

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
        if self.view_size:
            self._check_view_size()
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

    def _check_view_size(self) -> None:
        """A sampled view knows its ring neighbours and a random sample, nothing global."""
        from p2pfl.discovery.sampling import NEAR, ring_keys

        least = 2 * NEAR * len(ring_keys(self.schedule, degree=self.degree)) + 4
        if self.view_size < least:
            raise ValueError(
                f"view_size: {self.schedule} with degree {self.degree} needs a view of at "
                f"least {least} peers (got {self.view_size}), or 0 for every live peer"
            )
        if "presence" not in self.discovery:
            raise ValueError("view_size: a sampled view is kept by presence: add it to discovery")
        why = (
            "a topology file names every node"
            if self.topology_file is not None
            else "walkers are dealt over every node"
            if self.walkers
            else "a sync random walk predicts every peer's pick"
            if self.mode == "sync" and self.schedule == "random-walk"
            else None
        )
        if why is not None:
            raise ValueError(f"view_size: {why}, which a partial view cannot; use view_size = 0")

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


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> NodeConfig:
    """Read the TOML file (if any), apply flag overrides (None = not given), validate."""
    return load_model(NodeConfig, {} if path is None else read_toml(path), overrides)
