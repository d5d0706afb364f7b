"""`p2pfl run`: build a node's parts from its `NodeConfig` and run it until done or signalled.

Order of start-up: state dir (lock, id) -> data and model -> home broker -> transport -> node.
Shutdown (SIGINT/SIGTERM) runs in reverse: the node finishes its local step, checkpoints,
publishes `bye`, closes its clients; then the home broker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from p2pfl.broker_auth import BrokerGate, login_password
from p2pfl.certs import own_certificate
from p2pfl.config import NodeConfig, default_state_dir, parse_host_port
from p2pfl.control import NodeControl, control_socket
from p2pfl.discovery.addresses import (
    OwnBroker,
    advertised_hosts,
    broker_uris,
    is_loopback,
    is_wildcard,
)
from p2pfl.discovery.mdns import Mdns
from p2pfl.eligibility import parse_when, torch_threads
from p2pfl.identity import Identity, fingerprint, load_identity, parse_key
from p2pfl.learning.datasets import load_dataset
from p2pfl.learning.partition import partition
from p2pfl.learning.torch_learner import TorchLearner, learner_from_config
from p2pfl.node import Node, NodeCounters, RoundReport
from p2pfl.sd_notify import notify
from p2pfl.store import StateDir
from p2pfl.telemetry import LogForwarder
from p2pfl.topology import node_schedule
from p2pfl.transport.address import TlsOptions, parse_broker_uri
from p2pfl.transport.embedded import EmbeddedBroker
from p2pfl.transport.mosquitto import MosquittoBroker
from p2pfl.transport.mqtt import MqttOptions, MqttTransport
from p2pfl.trust import Trust

log = logging.getLogger(__name__)
progress = logging.getLogger("p2pfl.progress")


def build_torch_learner(config: NodeConfig) -> TorchLearner:
    """Load the dataset, take this node's partition, build the model. Blocking.

    PrivacyError when DP is on and the model or data cannot be trained with DP-SGD."""
    import torch

    threads = torch_threads(parse_when(config.when).max_cpu, os.cpu_count() or 1)
    if threads is not None:  # --when max-cpu=PCT: torch uses that share of the cores
        torch.set_num_threads(threads)
    dataset = load_dataset(config.dataset, seed=config.seed)
    parts = partition(dataset.y_train, config.num_partitions, config.partition, seed=config.seed)
    return learner_from_config(config, dataset, parts[config.partition_index])


@dataclass(frozen=True)
class HomeBroker:
    """A node's home broker: where its own client connects, where peers reach it, and (when
    the node hosts it) how to recognise it under any of its addresses."""

    uri: str
    advertised: tuple[str, ...]
    own: OwnBroker | None = None


def advertised_uris(config: NodeConfig, port: int) -> list[str]:
    """The URIs peers use to reach a broker this node hosts on ``config.listen``'s host."""
    host, _ = parse_host_port(config.listen)
    advertise = [h.strip() for h in (config.advertise or "").split(",") if h.strip()]
    tls = config.tls_cert is not None
    return broker_uris(advertised_hosts(host, advertise, config.interfaces), port, tls=tls)


@contextlib.asynccontextmanager
async def home_broker(
    config: NodeConfig, gate: BrokerGate | None = None
) -> AsyncIterator[HomeBroker]:
    """Start the node's home broker (embedded or local) or pass an external URI through.

    An embedded broker is locked down by ``gate`` (logins, ACL, limits: p2pfl.broker_auth).
    A local Mosquitto cannot check key-based logins: it listens on loopback only, unless TLS
    and a password file are given (see `local_broker`).
    """
    if config.broker not in ("embedded", "local"):
        yield HomeBroker(config.broker, (config.broker,))
        return
    host, port = parse_host_port(config.listen)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = (config.tls_cert, config.tls_key)
    broker: EmbeddedBroker | MosquittoBroker
    if config.broker == "embedded":
        broker = EmbeddedBroker(host=host, port=port, gate=gate, tls=tls)
    else:
        host, broker = local_broker(config, host, port)
    async with broker:  # a local Mosquitto is spawned from this thread, to die with it
        advertised = advertised_uris(config, broker.port)
        # Our own client takes the shortest way in: loopback, when the broker listens there.
        local = "127.0.0.1" if is_wildcard(host) else host
        own = OwnBroker(host, broker.port, advertised)
        if gate is not None:
            gate.own = own
        yield HomeBroker(
            uri=broker_uris([local], broker.port, tls=tls is not None)[0],
            advertised=tuple(advertised),
            own=own,
        )


def local_broker(config: NodeConfig, host: str, port: int) -> tuple[str, MosquittoBroker]:
    """A private Mosquitto for ``--broker local`` and the host it really listens on.

    Mosquitto cannot check p2pfl's key-based logins, so without TLS and a password file it
    listens on loopback only (one machine: several nodes sharing it as ``--broker URI``).
    With both, it takes the password file and a topic ACL like the embedded broker's, as far
    as Mosquitto's patterns go (a node may still publish to its own inbox).
    """
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = (str(config.tls_cert), str(config.tls_key))
    secured = tls is not None and config.password_file is not None
    if not secured and not is_loopback(host):  # a wildcard (config refuses anything else)
        host = "127.0.0.1"
        log.info(
            "--broker local listens on 127.0.0.1 only (give --tls-cert, --tls-key and "
            "--password-file to open it to the LAN)"
        )
    broker = MosquittoBroker(
        host=host,
        port=port,
        max_packet_size=config.max_message_size + 64 * 1024,
        tls=tls,
        password_file=None if config.password_file is None else str(config.password_file),
        network=config.network,
    )
    return host, broker


@contextlib.asynccontextmanager
async def mdns_discovery(config: NodeConfig, node: Node, home: HomeBroker) -> AsyncIterator[None]:
    """Announce this node and feed mDNS-found peers to it, when `mdns` is a discovery source."""
    if "mdns" not in config.discovery:
        yield
        return
    mdns = Mdns(
        config.network,
        node.node_id,
        role=config.role,
        broker_uri=home.advertised[0],
        public_key=node.membership.fingerprint,
        addresses=[h for h in map(_uri_host, home.advertised) if _is_ip(h)],
        interfaces=config.interfaces,
        round=node.round,
        on_peer=node.membership.discovered,  # on the node's loop
        on_gone=node.membership.vanished,
    )
    try:
        await mdns.start()
    except OSError as exc:
        log.warning("mDNS unavailable, continuing without it error=%s", exc)
        yield
        return
    try:
        yield
    finally:
        await mdns.close()


def _uri_host(uri: str) -> str:
    return parse_broker_uri(uri).host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _opt_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def announce_reachability(config: NodeConfig, node_id: str, home: HomeBroker) -> None:
    """One line at start: the addresses peers will use to reach this node."""
    where = ", ".join(home.advertised)
    progress.info(
        "node %s on network %s reachable at %s",
        node_id,
        config.network,
        where,
        extra={
            "fields": {"event": "reachable", "node": node_id, "network": config.network,
                       "brokers": list(home.advertised)},
            "text_fields": False,
        },
    )  # fmt: skip
    host, _ = parse_host_port(config.listen)
    lonely = all(is_loopback(_uri_host(u)) for u in home.advertised)
    if config.trust == "open" and not lonely:
        log.warning(
            "--trust open on %s: any host that reaches this node can get models merged and "
            "pose as any peer; use tofu (the default) or allowlist outside demos",
            where,
        )
    if home.own is not None and is_wildcard(host) and not config.advertise and lonely:
        log.warning(
            "no network interface besides loopback: other machines cannot reach this "
            "node at %s (give --advertise HOST if they reach it by another address)",
            where,
        )


def on_signal(node: Node, state: StateDir, sig: int) -> None:
    """First SIGINT/SIGTERM: stop gracefully. A second one: exit now, once any checkpoint being
    written is complete (the previous one stays valid either way: writes are atomic)."""
    if not node.stopping:
        log.info("stopping on %s (send it again to exit at once)", signal.Signals(sig).name)
        stop_gracefully(node)
        return
    log.warning("second %s: exiting now", signal.Signals(sig).name)
    state.quiesce(timeout=5.0)
    logging.shutdown()
    os._exit(128 + sig)


def stop_gracefully(node: Node) -> None:
    """SIGTERM's and `p2pfl stop`'s way out: the node checkpoints, says bye and closes."""
    if not node.stopping:
        notify("STOPPING=1")
    node.stop()


def report_round(report: RoundReport) -> None:
    """The per-round progress line (text) or JSON object (json)."""
    fields = report.as_dict()
    # With DP, the epsilon spent so far on this node's samples closes the line.
    privacy = "" if report.epsilon is None else f" epsilon={report.epsilon:.3f}"
    # A node that will not train next round (--when, p2pfl pause) says why.
    privacy += "" if report.paused is None else f" paused: {report.paused}"
    progress.info(
        "round %d loss=%.4f acc=%.4f peers=%d merged=%d sent=%d recv=%d rejected=%d run=%s%s",
        report.round,
        report.train_loss,
        report.accuracy,
        report.peers,
        report.merged,
        fields["models_sent"],
        fields["models_received"],
        fields["rejected"],
        report.run,
        privacy,
        extra={"fields": fields, "text_fields": False},
    )


def _trust(config: NodeConfig, state: StateDir, node_id: str, identity: Identity) -> Trust:
    """The node's trust policy; under ``ca`` with its certificate (made on first use)."""
    certificate = None
    if config.trust == "ca":
        assert config.ca_key is not None  # NodeConfig requires it under ca
        certificate = own_certificate(
            state.path, parse_key(config.ca_key), node_id, identity.public_raw
        )
    return Trust(
        config.trust,
        state_dir=state.path,
        max_peers=config.max_peers,
        max_skew=config.max_clock_skew,
        ca_key=config.ca_key,
        certificate=certificate,
    )


def _transport(
    config: NodeConfig, uri: str, node_id: str, identity: Identity, trust: Trust, max_payload: int
) -> MqttTransport:
    """The node's MQTT client to its home broker, logging in with its key."""
    tls = None
    if config.ca or config.cert or config.key:
        tls = TlsOptions(
            ca=_opt_str(config.ca), cert=_opt_str(config.cert), key=_opt_str(config.key)
        )

    def login(broker: str) -> tuple[str, str]:
        return node_id, login_password(identity, node_id, broker, certificate=trust.certificate)

    options = MqttOptions(
        username=config.username,
        password=config.password,
        tls=tls,
        login=login,
        max_payload=max_payload,
    )
    # An unguessable client id: a broker ends a session when another connects with its id,
    # even one that then fails to log in (amqtt, Mosquitto alike).
    return MqttTransport(uri, client_id=f"{node_id}-{secrets.token_hex(8)}", options=options)


async def serve(config: NodeConfig) -> NodeCounters:
    """Run one node described by `config` until its budget is spent or it is signalled."""
    state_path = config.state_dir or default_state_dir(config.network, config.id)
    # Data first: a data file that cannot be used is reported before anything is written.
    log.info("loading data dataset=%s model=%s", config.dataset, config.model)
    learner = await asyncio.to_thread(build_torch_learner, config)
    with StateDir(state_path, keep=config.checkpoints_keep) as state:
        node_id = state.node_id(config.id)
        identity = load_identity(state.path)  # KeyFileError: a bad key file (exit 2)
        log.info("identity id=%s key=%s", node_id, fingerprint(identity.public))
        schedule = node_schedule(config)
        trust = _trust(config, state, node_id, identity)
        max_payload = max(config.max_message_size, config.max_chunk + 64 * 1024)
        gate = BrokerGate(
            config.network,
            trust=trust,
            own=(),  # the broker's addresses, once it listens
            owner=identity,
            owner_id=node_id,
            max_packet=max_payload + 64 * 1024,
        )
        async with home_broker(config, gate) as home:
            forwarder = LogForwarder()
            node = Node(
                config,
                learner,
                _transport(config, home.uri, node_id, identity, trust, max_payload),
                node_id=node_id,
                home_broker=home.uri,
                advertised=home.advertised,
                own_broker=home.own,
                identity=identity,
                trust=trust,
                schedule=schedule,
                state=state,
                on_round=report_round,
                logs=forwarder,
            )
            counters = await _run(config, node, state, home, gate, forwarder)
        _report_done(node, node_id, counters)
        return counters


async def _run(
    config: NodeConfig,
    node: Node,
    state: StateDir,
    home: HomeBroker,
    gate: BrokerGate,
    forwarder: LogForwarder,
) -> NodeCounters:
    """Run ``node`` with its metrics endpoint, signal handlers, log forwarding and mDNS."""
    metrics = None
    if config.metrics_port is not None:
        from p2pfl.monitor.prometheus import serve_node_metrics

        metrics = serve_node_metrics(node.status, config.metrics_port, host=config.metrics_host)
    loop = asyncio.get_running_loop()

    def refused(who: str, reason: str) -> None:  # on the broker's thread
        loop.call_soon_threadsafe(node.inbox.reject, who, reason)

    gate.on_refuse = refused
    logging.getLogger("p2pfl").addHandler(forwarder)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, node, state, sig)
    announce_reachability(config, node.node_id, home)
    control = NodeControl(node, trust=config.trust, stop=lambda: stop_gracefully(node))
    try:
        async with control_socket(state.path, control), mdns_discovery(config, node, home):
            notify("READY=1")  # systemd (Type=notify): up, and answering p2pfl status
            try:
                counters = await node.run()
            except Exception:
                await asyncio.to_thread(node.runs.finish, "failed")
                raise
            # Stopped before its rounds were done (a signal, p2pfl stop): resumable, running.
            await asyncio.to_thread(node.runs.finish, "running" if node.stopping else "finished")
            return counters
    finally:
        if metrics is not None:
            await asyncio.to_thread(metrics.shutdown)
        logging.getLogger("p2pfl").removeHandler(forwarder)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _report_done(node: Node, node_id: str, counters: NodeCounters) -> None:
    """The node's last line: rounds, final accuracy and its counters."""
    final = node.last_eval
    progress.info(
        "done rounds=%d accuracy=%s run=%s",
        node.round,
        "n/a" if final is None else f"{final.accuracy:.4f}",
        node.runs.id,
        extra={
            "fields": {
                "event": "done",
                "node": node_id,
                "run": node.runs.id,
                "round": node.round,
                "accuracy": None if final is None else final.accuracy,
                **counters.as_dict(),
            },
            "text_fields": False,
        },
    )
