"""One config surface: every `NodeConfig` field is a `p2pfl run` flag and a TOML key, and both
ways give the same config, or the same one-line error. `p2pfl monitor` reads `MonitorConfig`
the same way (`--config FILE`).

In process (typer's runner; the daemon and the monitor are replaced by a recorder), so one
case costs milliseconds; tests/test_cli.py runs the command as a subprocess.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from p2pfl.cli import app
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity, key_text
from p2pfl.monitor.config import MonitorConfig

KEY = key_text(Identity.generate().public)
URI = "mqtt://127.0.0.1:1884"

# Flags of `p2pfl run` before its options were derived from NodeConfig: none may disappear.
_BEFORE = """
--config -c --network --id --broker --listen --advertise --ca --cert --key --username
--password --tls-cert --tls-key --password-file --peer --discovery --interface --schedule
--degree --topology-file --walkers --token-timeout --mode --rounds --duration --period
--round-timeout --min-peers --presence-ttl --dataset --partition --num-partitions
--partition-index --model --merge --secure-aggregation --optimizer --lr --local-epochs
--batch-size --mu --dp-epsilon --dp-delta --dp-max-grad-norm --codec --seed
--max-message-size --max-chunk --metrics-port --metrics-host --telemetry-interval
--telemetry-detail --run-name --tag --state-dir --trust --ca-key --max-peers --max-clock-skew
--log-format --log-level
"""
RUN_FLAGS_BEFORE = set(_BEFORE.split())

# Fields whose flag is not `--field-name`.
RUN_SPELLING = {"peers": "--peer", "interfaces": "--interface", "tags": "--tag"}


def one(key: str, text: str, toml: str | None = None) -> tuple[list[str], str]:
    """`--key TEXT` and `key = TOML` (TEXT itself when TOML is not given)."""
    return [RUN_SPELLING.get(key, "--" + key.replace("_", "-")), text], f"{key} = {toml or text}"


def both(*cases: tuple[list[str], str]) -> tuple[list[str], str]:
    return [a for c in cases for a in c[0]], "\n".join(c[1] for c in cases)


# A non-default value for every field, as flags and as TOML (with what it needs to be valid).
# `{d}` is a directory holding the files some fields need.
SETTINGS: dict[str, tuple[list[str], str]] = {
    "network": one("network", "lab", '"lab"'),
    "id": one("id", "n7", '"n7"'),
    "role": one("role", "monitor", '"monitor"'),
    "broker": one("broker", URI, f'"{URI}"'),
    "listen": one("listen", "127.0.0.1:1999", '"127.0.0.1:1999"'),
    "advertise": one("advertise", "a.lan,10.0.0.2", '"a.lan,10.0.0.2"'),
    "ca": one("ca", "{d}/ca.pem", '"{d}/ca.pem"'),
    "cert": one("cert", "{d}/cert.pem", '"{d}/cert.pem"'),
    "key": one("key", "{d}/key.pem", '"{d}/key.pem"'),
    "username": one("username", "ann", '"ann"'),
    "password": one("password", "s3cret word", '"s3cret word"'),
    "tls_cert": both(
        one("tls_cert", "{d}/tls.crt", '"{d}/tls.crt"'),
        one("tls_key", "{d}/tls.key", '"{d}/tls.key"'),
    ),
    "password_file": one("password_file", "{d}/passwd", '"{d}/passwd"'),
    "peers": (
        ["--peer", f"n1={URI}", "--peer", "n2=mqtt://127.0.0.1:1885"],
        f'peers = ["n1={URI}", {{id = "n2", broker = "mqtt://127.0.0.1:1885"}}]',
    ),
    "discovery": (["--discovery", "mdns,static"], 'discovery = ["mdns", "static"]'),
    "interfaces": (
        ["--interface", "127.0.0.1", "--interface", "::1"],
        'interfaces = ["127.0.0.1", "::1"]',
    ),
    "presence_ttl": one("presence_ttl", "6.5"),
    "view_size": one("view_size", "24"),
    "shuffle_interval": one("shuffle_interval", "0.5"),
    "min_peers": one("min_peers", "2"),
    "schedule": one("schedule", "partial-mesh", '"partial-mesh"'),
    "degree": one("degree", "3"),
    "topology_file": one("topology_file", "{d}/mesh.toml", '"{d}/mesh.toml"'),
    "walkers": one("walkers", "2"),
    "token_timeout": one("token_timeout", "12"),
    "mode": one("mode", "sync", '"sync"'),
    "period": one("period", "0.5"),
    "round_timeout": one("round_timeout", "45"),
    "rounds": one("rounds", "7"),
    "duration": one("duration", "60"),
    "dataset": one("dataset", "digits", '"digits"'),
    "partition": one("partition", "dirichlet:0.3", '"dirichlet:0.3"'),
    "num_partitions": both(one("num_partitions", "4"), one("partition_index", "3")),
    "model": one("model", "logreg", '"logreg"'),
    "merge": one("merge", "trimmed-mean:0.2", '"trimmed-mean:0.2"'),
    "secure_aggregation": (
        [
            "--secure-aggregation",
            "--mode",
            "sync",
            "--merge",
            "average",
            "--schedule",
            "partial-mesh",
        ],
        'secure_aggregation = true\nmode = "sync"\nmerge = "average"\nschedule = "partial-mesh"',
    ),
    "optimizer": one("optimizer", "adam", '"adam"'),
    "lr": one("lr", "0.01"),
    "momentum": one("momentum", "0.5"),
    "local_epochs": one("local_epochs", "2"),
    "batch_size": one("batch_size", "16"),
    "mu": one("mu", "0.01"),
    "max_grad_norm": one("max_grad_norm", "2.5"),
    "dp_epsilon": both(one("dp_epsilon", "8"), one("rounds", "10")),
    "dp_delta": one("dp_delta", "1e-6"),
    "dp_max_grad_norm": one("dp_max_grad_norm", "2.5"),
    "seed": one("seed", "42"),
    "codec": one("codec", "int8", '"int8"'),
    "max_round_lag": one("max_round_lag", "3"),
    "trust": both(one("trust", "ca", '"ca"'), one("ca_key", KEY, f'"{KEY}"')),
    "max_peers": one("max_peers", "64"),
    "max_clock_skew": one("max_clock_skew", "60"),
    "max_message_size": one("max_message_size", "2097152"),
    "max_chunk": one("max_chunk", "65536"),
    "state_dir": one("state_dir", "{d}/state", '"{d}/state"'),
    "checkpoints_keep": one("checkpoints_keep", "5"),
    "telemetry_interval": one("telemetry_interval", "0"),
    "telemetry_detail": one("telemetry_detail", "metrics", '"metrics"'),
    "metrics_port": one("metrics_port", "9100"),
    "metrics_host": one("metrics_host", "0.0.0.0", '"0.0.0.0"'),
    "run_name": one("run_name", "trial-1", '"trial-1"'),
    "tags": (["--tag", "a", "--tag", "b c"], 'tags = ["a", "b c"]'),
    "when": (["--when", "charging,window=22:00-06:00"], 'when = "charging,window=22:00-06:00"'),
    "metered_interfaces": (
        ["--metered-interfaces", "wwan0,usb0"],
        'metered_interfaces = ["wwan0", "usb0"]',
    ),
    "log_format": one("log_format", "json", '"json"'),
    "log_level": one("log_level", "debug", '"debug"'),
}
SETTINGS["tls_key"] = SETTINGS["tls_cert"]
SETTINGS["partition_index"] = SETTINGS["num_partitions"]
SETTINGS["ca_key"] = one("ca_key", KEY, f'"{KEY}"')

# An invalid value for every field that has one, as a flag and as TOML.
INVALID: dict[str, tuple[list[str], str]] = {
    "network": one("network", "a/b", '"a/b"'),
    "id": one("id", "a b", '"a b"'),
    "role": one("role", "boss", '"boss"'),
    "broker": one("broker", "http://x:1", '"http://x:1"'),
    "listen": one("listen", "nohost", '"nohost"'),
    "advertise": one("advertise", "mqtt://h:1", '"mqtt://h:1"'),
    "tls_cert": one("tls_cert", "{d}/tls.crt", '"{d}/tls.crt"'),
    "tls_key": both(
        one("tls_cert", "{d}/tls.crt", '"{d}/tls.crt"'),
        one("tls_key", "{d}/none.key", '"{d}/none.key"'),
    ),
    "password_file": one("password_file", "{d}/none", '"{d}/none"'),
    "peers": (["--peer", "n1"], 'peers = ["n1"]'),
    "discovery": (["--discovery", "pigeon"], 'discovery = ["pigeon"]'),
    "interfaces": (["--interface", "eth0"], 'interfaces = ["eth0"]'),
    "presence_ttl": one("presence_ttl", "0"),
    "view_size": one("view_size", "8"),  # too small for the ring's neighbours
    "shuffle_interval": one("shuffle_interval", "0"),
    "min_peers": one("min_peers", "-1"),
    "schedule": one("schedule", "rign", '"rign"'),
    "degree": one("degree", "0"),
    "topology_file": one("topology_file", "{d}/none.toml", '"{d}/none.toml"'),
    "walkers": both(one("walkers", "1"), one("mode", "sync", '"sync"')),
    "token_timeout": one("token_timeout", "-3"),
    "mode": one("mode", "lockstep", '"lockstep"'),
    "period": one("period", "-1"),
    "round_timeout": one("round_timeout", "0"),
    "rounds": one("rounds", "2.5"),
    "duration": one("duration", "soon", '"soon"'),
    "dataset": one("dataset", "mnist1d:abc", '"mnist1d:abc"'),
    "partition": one("partition", "dirichlet:0", '"dirichlet:0"'),
    "num_partitions": one("num_partitions", "0"),
    "partition_index": one("partition_index", "1"),
    "merge": one("merge", "mean", '"mean"'),
    "optimizer": one("optimizer", "rmsprop", '"rmsprop"'),
    "lr": one("lr", "-1"),
    "momentum": one("momentum", "1"),
    "local_epochs": one("local_epochs", "0"),
    "batch_size": one("batch_size", "many", '"many"'),
    "mu": one("mu", "-0.5"),
    "max_grad_norm": one("max_grad_norm", "-1"),
    "dp_epsilon": one("dp_epsilon", "8"),
    "dp_delta": one("dp_delta", "1.5"),
    "dp_max_grad_norm": one("dp_max_grad_norm", "inf"),
    "seed": one("seed", "abc", '"abc"'),
    "codec": one("codec", "zip", '"zip"'),
    "max_round_lag": one("max_round_lag", "-1"),
    "trust": one("trust", "nobody", '"nobody"'),
    "ca_key": one("ca_key", "p2pfl-ed25519 AAAA", '"p2pfl-ed25519 AAAA"'),
    "max_peers": one("max_peers", "0"),
    "max_clock_skew": one("max_clock_skew", "0"),
    "max_message_size": one("max_message_size", "10"),
    "max_chunk": both(one("max_chunk", "2048"), one("max_message_size", "1024")),
    "checkpoints_keep": one("checkpoints_keep", "0"),
    "telemetry_interval": one("telemetry_interval", "-5"),
    "telemetry_detail": one("telemetry_detail", "some", '"some"'),
    "metrics_port": one("metrics_port", "70000"),
    "log_format": one("log_format", "xml", '"xml"'),
    "log_level": one("log_level", "loud", '"loud"'),
    # A monitor drops a telemetry record whose tag it cannot show: refused at start instead.
    "tags": (["--tag", "x" * 65], f'tags = ["{"x" * 65}"]'),
    # A run names a directory of the state dir (runs/<run>/): no spaces, slashes, dots first.
    "run_name": one("run_name", "trial 1", '"trial 1"'),
    "when": (["--when", "idle:0"], 'when = ["idle:0"]'),
}
# Any value is a valid one: free text, a path only used later, a switch, or a name the node
# resolves when it starts (a model it cannot load, or a dataset file, is reported then).
ANY_VALUE = {
    "metered_interfaces",  # an interface that does not exist is never the default route
    "ca",
    "cert",
    "key",
    "username",
    "password",
    "state_dir",
    "metrics_host",
    "secure_aggregation",
    "model",
}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("ca.pem", "cert.pem", "key.pem", "tls.crt", "tls.key", "passwd"):
        (tmp_path / name).write_text("placeholder\n")
    (tmp_path / "mesh.toml").write_text('edges = [["n1", "n2"], ["n2", "n3"], ["n3", "n1"]]\n')
    return tmp_path


RunCommand = Callable[..., tuple[Any, int, str]]


@pytest.fixture
def run_command(monkeypatch: pytest.MonkeyPatch, files: Path) -> RunCommand:
    """`p2pfl run ARGS` (with `toml` as its --config file): (config served, exit code, stderr)."""
    served: list[NodeConfig] = []

    async def serve(config: NodeConfig) -> None:
        served.append(config)

    monkeypatch.setattr("p2pfl.daemon.serve", serve)
    monkeypatch.setattr("p2pfl.logs.setup_logging", lambda *args: None)

    def invoke(args: list[str] = [], toml: str | None = None) -> tuple[Any, int, str]:  # noqa: B006
        served.clear()
        argv = [a.replace("{d}", str(files)) for a in args]
        if toml is not None:
            (files / "node.toml").write_text(toml.replace("{d}", str(files)) + "\n")
            argv = ["--config", str(files / "node.toml"), *argv]
        result = CliRunner().invoke(app, ["run", *argv])
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        return (served[0] if served else None), result.exit_code, result.stderr

    return invoke


def test_every_field_has_a_setting_and_an_invalid_value_or_a_reason() -> None:
    fields = set(NodeConfig.model_fields)
    assert set(SETTINGS) == fields
    assert set(INVALID) | ANY_VALUE == fields and not set(INVALID) & ANY_VALUE


def option_names(help_text: str) -> set[str]:
    """The options a --help lists: each option line's leading names (`  -c, --config <path>`;
    a wrapped help line is indented further)."""
    names: set[str] = set()
    for line in help_text.splitlines():
        if not line.startswith("  -"):
            continue
        for word in line.split():
            if word == "/":  # --mdns / --no-mdns
                continue
            if not word.startswith("-"):
                break
            names.add(word.rstrip(","))
    return names


def test_run_keeps_every_flag_it_had() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    listed = option_names(result.stdout)
    assert not RUN_FLAGS_BEFORE - listed
    assert {"--momentum", "--role", "--max-round-lag", "--checkpoints-keep"} <= listed


@pytest.mark.parametrize("field", sorted(SETTINGS))
def test_every_field_is_set_alike_by_its_flag_and_its_toml_key(
    field: str, run_command: RunCommand
) -> None:
    flags, toml = SETTINGS[field]
    by_flag, code, err = run_command(flags)
    assert code == 0, err
    by_file, code, err = run_command(toml=toml)
    assert code == 0, err
    assert by_flag == by_file
    assert getattr(by_flag, field) != NodeConfig.model_fields[field].default


@pytest.mark.parametrize("field", sorted(INVALID))
def test_an_invalid_value_gets_the_same_one_line_both_ways(
    field: str, run_command: RunCommand
) -> None:
    flags, toml = INVALID[field]
    config, code, by_flag = run_command(flags)
    assert (config, code) == (None, 2)
    config, code, by_file = run_command(toml=toml)
    assert (config, code) == (None, 2)
    assert by_flag == by_file
    assert len(by_flag.strip().splitlines()) == 1, by_flag
    assert by_flag.startswith("config error: ") and field in by_flag, by_flag
    assert "Traceback" not in by_flag


def test_a_flag_overrides_the_file_and_an_absent_flag_does_not(run_command: RunCommand) -> None:
    config, code, err = run_command(
        ["--lr", "0.2", "--tag", "b"], toml='lr = 0.1\nmomentum = 0.5\ntags = ["a"]'
    )
    assert code == 0, err
    assert (config.lr, config.momentum, config.tags) == (0.2, 0.5, ("b",))


# ---- p2pfl monitor ------------------------------------------------------------------------

MONITOR_SETTINGS: dict[str, tuple[list[str], str]] = {
    "network": (["--network", "lab"], 'network = "lab"'),
    "brokers": (
        ["--broker", URI, "--broker", "mqtts://h:8883"],
        f'brokers = ["{URI}", "mqtts://h:8883"]',
    ),
    "peers": (["--peer", f"n1={URI}"], f'peers = ["n1={URI}"]'),
    "interfaces": (["--interface", "127.0.0.1"], 'interfaces = ["127.0.0.1"]'),
    "mdns": (["--no-mdns"], "mdns = false"),
    "once": (["--once"], "once = true"),
    "json": (["--json"], "json = true"),
    "wait": (["--wait", "1.5"], "wait = 1.5"),
    "export": (["--export", "{d}/snap.jsonl"], 'export = "{d}/snap.jsonl"'),
    "plot": (["--plot", "{d}/acc.png"], 'plot = "{d}/acc.png"'),
    "metrics_port": (["--metrics-port", "0"], "metrics_port = 0"),
    "metrics_host": (["--metrics-host", "0.0.0.0"], 'metrics_host = "0.0.0.0"'),
    "stale_after": (["--stale-after", "9"], "stale_after = 9"),
    "forget_after": (["--forget-after", "30"], "forget_after = 30"),
    "log_level": (["--log-level", "info"], 'log_level = "info"'),
    "trust": (["--trust", "open"], 'trust = "open"'),
    "ca_key": (["--ca-key", KEY], f'ca_key = "{KEY}"'),
    "state_dir": (["--state-dir", "{d}/mon"], 'state_dir = "{d}/mon"'),
    "web": (["--web", "127.0.0.1:8088"], 'web = "127.0.0.1:8088"'),
    "web_token": (["--web-token", "0123456789ab"], 'web_token = "0123456789ab"'),
}


MONITOR_FLAGS_BEFORE = {
    "--network", "--broker", "--peer", "--interface", "--mdns", "--no-mdns", "--once", "--json",
    "--wait", "--export", "--plot", "--metrics-port", "--metrics-host", "--stale-after",
    "--forget-after", "--log-level", "--trust", "--ca-key", "--state-dir",
}  # fmt: skip
MONITOR_FLAGS_ADDED = {"--web", "--web-token"}  # issue 16: the browser dashboard


def test_monitor_keeps_every_flag_it_had() -> None:
    result = CliRunner().invoke(app, ["monitor", "--help"], terminal_width=200)
    expected = MONITOR_FLAGS_BEFORE | MONITOR_FLAGS_ADDED | {"--config", "-c", "--help"}
    assert option_names(result.stdout) == expected


@pytest.fixture
def monitor_command(monkeypatch: pytest.MonkeyPatch, files: Path) -> RunCommand:
    """`p2pfl monitor ARGS` (with `toml` as its --config file): (what run_monitor was given,
    exit code, stderr)."""
    calls: list[dict[str, Any]] = []

    def run_monitor(*args: Any, **kwargs: Any) -> int:
        calls.append({"args": args, **kwargs})
        return 0

    monkeypatch.setattr("p2pfl.monitor.cli.run_monitor", run_monitor)
    monkeypatch.setattr("p2pfl.logs.setup_logging", lambda *args: calls.append({"log": args}))

    def invoke(args: list[str] = [], toml: str | None = None) -> tuple[Any, int, str]:  # noqa: B006
        calls.clear()
        argv = [a.replace("{d}", str(files)) for a in args]
        if toml is not None:
            (files / "monitor.toml").write_text(toml.replace("{d}", str(files)) + "\n")
            argv = ["--config", str(files / "monitor.toml"), *argv]
        result = CliRunner().invoke(app, ["monitor", *argv])
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        return (list(calls) or None), result.exit_code, result.stderr

    return invoke


def test_every_monitor_field_is_set_alike_by_its_flag_and_its_toml_key(
    monitor_command: RunCommand,
) -> None:
    keys = {f.alias or name for name, f in MonitorConfig.model_fields.items()}
    assert set(MONITOR_SETTINGS) == keys
    default, code, err = monitor_command()
    assert code == 0, err
    for key, (flags, toml) in MONITOR_SETTINGS.items():
        by_flag, code, err = monitor_command(flags)
        assert code == 0, (key, err)
        by_file, code, err = monitor_command(toml=toml)
        assert code == 0, (key, err)
        assert by_flag == by_file != default, key


@pytest.mark.parametrize(
    ("flags", "toml", "key"),
    [
        (["--wait", "-1"], "wait = -1", "wait"),
        (["--broker", "http://x:1"], 'brokers = ["http://x:1"]', "brokers"),
        (["--peer", "n1"], 'peers = ["n1"]', "peers"),
        (["--trust", "nobody"], 'trust = "nobody"', "trust"),
        (["--metrics-port", "70000"], "metrics_port = 70000", "metrics_port"),
        (["--log-level", "loud"], 'log_level = "loud"', "log_level"),
        (["--web", "host:http"], 'web = "host:http"', "web"),
        (["--web-token", "short"], 'web_token = "short"', "web_token"),
    ],
)
def test_monitor_refuses_a_bad_value_in_one_line_both_ways(
    flags: list[str], toml: str, key: str, monitor_command: RunCommand
) -> None:
    calls, code, by_flag = monitor_command(flags)
    assert (calls, code) == (None, 2)
    calls, code, by_file = monitor_command(toml=toml)
    assert (calls, code) == (None, 2)
    assert by_flag == by_file
    assert by_flag.startswith(f"config error: {key}") and by_flag.count("\n") == 1, by_flag


def test_monitor_file_rejects_an_unknown_key(monitor_command: RunCommand) -> None:
    calls, code, err = monitor_command(toml='netwrok = "lab"')
    assert (calls, code) == (None, 2)
    assert err == "config error: netwrok: unknown key (got 'lab')\n"
