"""A node's side of membership: announcing itself and keeping its `PeerView` up to date.

The node announces a retained presence record on its home broker and on the home broker of
every peer it learns of (static config, mDNS, or a presence record heard on its own broker),
each connection carrying the offline will; it repeats the record every third of the TTL as a
heartbeat and says `bye` on a graceful stop. Peers join the view when their presence is heard
and leave at once on their will or bye, or after the TTL without news. With presence off,
static and mDNS peers are taken as live.

In a sampled network (``view_size`` > 0; DESIGN.md, Membership at scale) a node keeps only a
bounded view, kept by shuffles with its members (:mod:`p2pfl.discovery.shuffle`): it listens
to the presence of the view members its schedule talks to only (ring neighbours; every member
on a random walk), the rest being kept alive by the records shuffles bring, and finds its first
contacts on one seed bucket
(every node also sends its heartbeat to a random one), or on every node's presence when the
bucket stays quiet (a small network). Its membership cost is then bounded by the view size.

A peer's broker may be announced at several addresses (a multi-homed host): they are tried in
the peer's order and the first that accepts a connection is kept (`p2pfl.discovery.dial`). An
address that is this node's own broker is never dialled: a peer naming it announces an address
it cannot be reached at (typically a loopback one), and is refused with that reason. When no
peer turns up, `diagnose` says why in words a user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import replace

from p2pfl.config import NodeConfig
from p2pfl.discovery import sampling
from p2pfl.discovery.addresses import is_loopback
from p2pfl.discovery.dial import first_reachable, probe
from p2pfl.discovery.peerview import PeerInfo, PeerView
from p2pfl.discovery.presence import (
    MAX_PRESENCE,
    PresenceRecord,
    encode_presence,
    parse_presence,
    presence_certificate,
)
from p2pfl.discovery.shuffle import SEEDS, Sampler, encode_shuffle, parse_shuffle
from p2pfl.identity import Identity, fingerprint
from p2pfl.protocol import topics
from p2pfl.protocol.envelope import Envelope, peek, unpack_envelope
from p2pfl.protocol.errors import ProtocolError
from p2pfl.transport.address import parse_broker_uri
from p2pfl.transport.base import Message, Transport, TransportError
from p2pfl.trust import Duplicate, Trust

log = logging.getLogger(__name__)

# Per-peer notes kept for diagnosis; a bound, whatever the network sends.
_MAX_NOTES = 256
# Presence records waiting for a probe of their addresses: each probe takes up to seconds, so a
# burst of records beyond this waits for its peer's next heartbeat rather than in a long queue.
_MAX_DIALLING = 64
_MAX_PRESENCE = MAX_PRESENCE


class _Repeat(Exception):
    """A presence record a sampled node has taken already, an older one, or a stale one."""


def _host_port(uri: str) -> tuple[str, str]:
    try:
        address = parse_broker_uri(uri)
    except ValueError:
        return uri, ""
    return address.host, str(address.port)


class Membership:
    """Presence for one node: who is live, and making sure they know we are.

    ``advertised`` are the URIs peers reach our broker at (default: ``home_broker``);
    ``own_broker`` recognises any address of the broker we host (None: we host none).
    """

    def __init__(
        self,
        config: NodeConfig,
        transport: Transport,
        view: PeerView,
        *,
        node_id: str,
        home_broker: str,
        next_seq: Callable[[], int],
        current_round: Callable[[], int],
        reject: Callable[[str, str], None],
        clock: Callable[[], float],
        advertised: Sequence[str] = (),
        own_broker: Container[str] | None = None,
        signer: Identity | None = None,
        trust: Trust | None = None,
        certificate: bytes | None = None,
        agreement_key: bytes | None = None,
        paused: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.view = view
        self.node_id = node_id
        self.home_broker = home_broker
        self.advertised = tuple(advertised) or (home_broker,)
        self.signer = signer
        self.fingerprint = None if signer is None else fingerprint(signer.public)
        self.trust = trust
        self.certificate = certificate  # ours (--trust ca), sent in every presence record
        self.agreement_key = agreement_key  # ours (--secure-aggregation), likewise
        self.net = config.network
        self.presence_on = "presence" in config.discovery
        self._own: Container[str] = own_broker if own_broker is not None else ()
        self._hosting = own_broker is not None
        self._next_seq = next_seq
        self._round = current_round
        self._paused = paused  # why we do not train now, said in our presence
        self.run: Callable[[], str | None] = lambda: None  # our run, said likewise
        self._runs: dict[str, str] = {}  # the run each peer announced, for peers of the view
        self._reject = reject
        self._clock = clock
        # Brokers our presence goes to every heartbeat: those of the configured peers, and of
        # peers in the view (dropped when they leave), at most one per peer the view may hold.
        self._announced: set[str] = set()
        self._configured_brokers: set[str] = set()
        self._max_announced = config.max_peers + len(config.peers)
        self._discovered: asyncio.Queue[PeerInfo] = asyncio.Queue()
        self._routes: dict[tuple[str, ...], str] = {}  # a peer's addresses -> the one that works
        self._dialling: set[tuple[str, ...]] = set()
        self._pending: set[str] = set()  # ids of verified presence records being dialled
        self._introduced: dict[str, tuple[str, ...]] = {}  # every peer heard of, its addresses
        self._own_named: dict[str, str] = {}  # peers that announced our own broker as theirs
        self.unreachable: dict[str, str] = {}  # broker URI -> why a probe failed
        # Peers of the view that said bye after finishing a round (sync rounds up to it keep
        # their shape); the oldest go first beyond max_peers.
        self.finished: dict[str, int] = {}
        # A sampled network: the sampler, what this node listens to for contacts (a seed
        # bucket or every node's presence; None once it has some), and the view members whose
        # presence it subscribed to.
        self.sampler = Sampler(config, node_id) if config.view_size and self.presence_on else None
        self._listening: tuple[str, ...] = ()
        self._hinted = asyncio.Event()
        self._listening_since = 0.0
        self._watched: set[str] = set()

    def route(self, broker: str) -> str | None:
        """The transport's `broker` argument for a peer's broker URI (None: our home broker)."""
        return None if broker in ("", self.home_broker) else broker

    @property
    def sampled(self) -> bool:
        """Whether this node keeps a sampled partial view (``view_size``)."""
        return self.sampler is not None

    def will(self) -> Message:
        """The offline record the broker publishes if this node dies."""
        return self._record(online=False, graceful=False)

    async def start(self) -> None:
        """Listen for presence, introduce ourselves to the static peers, announce."""
        if self.sampler is not None:
            await self._listen((topics.seed_bucket(self.net, self.sampler.listen),))
        elif self.presence_on:
            await self.transport.subscribe(topics.presence_all(self.net))
        for peer in self.config.peers:
            if peer.id != self.node_id:
                info = PeerInfo(
                    id=peer.id, role="trainer", broker=peer.broker, source="static",
                    last_seen=self._clock(),
                )  # fmt: skip
                await self._introduce(info)
        await self._publish(online=True)

    async def announce(self) -> None:
        """Publish our presence now (our round changed and peers wait on it)."""
        await self._publish(online=True)

    async def say_bye(self) -> None:
        """Tell every broker we announced on that we stop on purpose."""
        await self._publish(online=False)

    async def on_message(self, message: Message) -> None:
        """A message on a presence topic (others are ignored)."""
        try:
            _net, kind, peer_id = topics.parse(message.topic)
        except ProtocolError:
            return
        if kind != "presence" or peer_id == self.node_id or not message.payload:
            return
        if self.sampler is not None and not self._listening and peer_id not in self.view:
            return  # left over from a subscription dropped since: not read at all
        try:
            # A sampled node re-subscribes to members' retained records as its view changes:
            # it orders records itself (Sampler.newer), and a repeat is dropped unremarked.
            # Others drop a record delivered twice (a Duplicate) likewise: no refusal, no news.
            record = self._verified(peer_id, message.payload, replay=self.sampler is None)
        except (_Repeat, Duplicate):
            return
        except ProtocolError as exc:
            self._reject(peer_id, exc.reason)
            return
        if not record.online:
            self._left(peer_id, record)
            return
        if self.sampler is not None:
            await self._sampled(peer_id, record, message.payload)
            return
        await self._heard(peer_id, record)

    async def _heard(self, peer_id: str, record: PresenceRecord) -> None:
        """A verified online record of ``peer_id``: it joins the view (or is refreshed), once
        one of its broker's addresses is known to work."""
        self.finished.pop(peer_id, None)
        self._note_run(peer_id, record.run)
        usable = self._usable(peer_id, record.candidates)
        if usable is None:
            return
        info = PeerInfo(
            id=peer_id, role=record.role, broker=usable[0] if usable else "", brokers=usable,
            source="presence", last_seen=self._clock(), round=record.round,
            meta={
                **({"pk": record.pk} if record.pk else {}),
                **({"xk": record.xk} if record.xk else {}),
                **({"paused": record.paused} if record.paused else {}),
            },
        )  # fmt: skip
        self._note(peer_id, usable)
        if len(usable) > 1:
            route = self._routes.get(usable)
            if route is None:
                # Probing takes up to seconds: the discovery loop does it, not the receiver.
                # Until it is done, the peer's models count as a peer's (`pending`): its first
                # one would otherwise race its admission. Only as many as the view would take.
                if (
                    usable not in self._dialling
                    and len(self._dialling) < _MAX_DIALLING
                    and self.view.has_room(peer_id)
                ):
                    self._dialling.add(usable)
                    self._pending.add(peer_id)
                    self._discovered.put_nowait(info)
                return
            info = replace(info, broker=route)
        await self._admit(info)

    def _verified(
        self, peer_id: str, payload: bytes | bytearray, *, replay: bool = True
    ) -> PresenceRecord:
        """The presence record in ``payload``, signed by ``peer_id`` for this network.

        Raises ProtocolError (its reason counted by the caller) for anything else.
        ``replay=False``: instead of the replay window, a record must be younger than the TTL
        and (a sampled view) newer than the last one taken from ``peer_id`` (else _Repeat).
        """
        if len(payload) > _MAX_PRESENCE:
            raise ProtocolError(f"oversize presence record: {len(payload)} bytes")
        if self.trust is not None:
            # Before anything is decoded; under --trust ca the body is read for the sender's
            # certificate only once the signature checked.
            self.trust.check(
                payload,
                replay=replay,
                cert=lambda: presence_certificate(payload, max_size=_MAX_PRESENCE),
            )
        # a presence record is a flat map of a few fields: no long containers in it
        env = unpack_envelope(payload, max_size=_MAX_PRESENCE, max_container_len=64)
        record = parse_presence(env)
        if env.src != peer_id or env.net != self.net:
            raise ProtocolError("presence record does not match its topic")
        if not replay:
            # a retained record older than the TTL is old news (a bye long ago), not an attack
            stale = abs(time.time() - env.ts) > self.config.presence_ttl and env.kind != "will"
            if stale or (self.sampler is not None and not self.sampler.newer(peer_id, env.seq)):
                raise _Repeat
        return record

    def _left(self, peer_id: str, record: PresenceRecord) -> None:
        """``peer_id`` said it is offline (a bye, or its will)."""
        # Only a peer of the view shaped our rounds: a bye from anyone else changes none.
        if record.graceful and record.round is not None and peer_id in self.view:
            self.finished.pop(peer_id, None)
            self.finished[peer_id] = record.round
            while len(self.finished) > self.config.max_peers:
                del self.finished[next(iter(self.finished))]
        if self.view.remove(peer_id, "offline"):
            log.info("peer left id=%s", peer_id)

    def heard_runs(self) -> list[str]:
        """The runs the peers of the view announce (p2pfl.run_identity)."""
        return [run for peer, run in self._runs.items() if peer in self.view]

    def _note_run(self, peer_id: str, run: str | None) -> None:
        """Remember the run ``peer_id`` announces: at most one per peer the view may hold."""
        if run is None:
            self._runs.pop(peer_id, None)
            return
        if peer_id not in self._runs and len(self._runs) >= self.config.max_peers:
            self._runs = {p: r for p, r in self._runs.items() if p in self.view}
            if len(self._runs) >= self.config.max_peers:
                return
        self._runs[peer_id] = run

    def pending(self, peer_id: str) -> bool:
        """Whether a verified presence record of ``peer_id`` waits for a probe of its
        addresses before the peer joins the view."""
        return peer_id in self._pending

    def forget(self, info: PeerInfo) -> None:
        """A peer left the view: stop announcing to its broker, unless a configured peer or
        another peer of the view is reached there."""
        broker = info.broker
        if broker in self._configured_brokers or broker == self.home_broker:
            return
        if any(p.broker == broker for p in self.view.peers()):
            return
        self._announced.discard(broker)

    def discovered(self, info: PeerInfo) -> None:
        """A discovery source (mDNS) found a peer; call it on the node's loop."""
        if info.id != self.node_id:
            self._discovered.put_nowait(info)

    def vanished(self, peer_id: str) -> None:
        """A discovery source saw a peer leave (e.g. an mDNS goodbye)."""
        if self.view.remove(peer_id, "gone"):
            log.info("peer left id=%s", peer_id)

    async def discovery_loop(self) -> None:
        """Introduce ourselves to each peer a discovery source reports; dial presence records
        whose broker has several addresses."""
        while True:
            info = await self._discovered.get()
            if info.source != "presence":
                await self._introduce(info)
                continue
            route = await self._dial(info.id, info.candidates)
            self._dialling.discard(info.candidates)
            if route is not None:
                await self._admit(replace(info, broker=route))
            self._pending.discard(info.id)  # in the view now, or refused

    async def heartbeat_loop(self) -> None:
        """Repeat our presence every third of the TTL; forget peers silent for the TTL."""
        interval = self.config.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            for gone in self.view.expire():
                log.info("peer expired id=%s", gone)
            await self._publish(online=True)
            await self._watch()

    # -- a sampled view --------------------------------------------------------------------------

    async def shuffle_loop(self) -> None:
        """A sampled network: shuffle view entries with one member every ``shuffle_interval``
        (jittered, so a network started together does not shuffle in lockstep)."""
        sampler = self.sampler
        if sampler is None:
            return
        interval = self.config.shuffle_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sampler.interval(interval)):
                    await self._hinted.wait()  # a hint cuts the pause short
            self._hinted.clear()
            await self._bootstrap(interval)
            view = self.view.live()
            partner = sampler.partner(view)
            info = None if partner is None else self.view.get(partner)
            if partner is not None and info is not None:
                await self._offer(partner, info.broker, view)
            while sampler.hints:
                hinted = next(iter(sampler.hints))
                del sampler.hints[hinted]
                if hinted not in self.view:  # same broker: it sent us a model from there
                    await self._offer(hinted, "", view)

    def hint(self, peer: str) -> None:
        """``peer``, not in our view, sent us a model: in sync rounds its view says we are
        ring neighbours while ours does not know it. Shuffle with it soon: its answer tells
        us who is near us (itself among them)."""
        if self.sampler is not None and peer not in self.view and self.sampler.hint(peer):
            self._hinted.set()

    async def _offer(self, partner: str, broker: str, view: list[str]) -> None:
        sampler = self.sampler
        assert sampler is not None
        sent = sampler.entries_for(view, partner, time.time())
        sampler.offer(partner, sent)
        await self._send_shuffle("offer", partner, broker, sent)

    async def on_shuffle(self, env: Envelope) -> None:
        """A verified shuffle message from ``env.src`` (the inbox hands it over): take what
        it brings into the view as :mod:`p2pfl.discovery.sampling` says; answer an offer."""
        sampler = self.sampler
        if sampler is None:
            raise ProtocolError("shuffle: this node keeps no sampled view")
        op, entries = parse_shuffle(env)
        candidates: dict[str, tuple[PresenceRecord, bytes]] = {}
        for data in entries:
            try:
                entry = self._entry(data)
            except ProtocolError as exc:
                self._reject(env.src, exc.reason)
                continue
            if entry is not None:
                candidates[entry[0]] = (entry[1], data)
        view = self.view.live()
        if op == "offer":
            sent = sampler.entries_for(view, env.src, time.time())
            # the initiator is a view member, or its own record came with its offer
            info = self.view.get(env.src)
            asker = candidates.get(env.src)
            broker = info.broker if info else asker[0].broker if asker else ""
            await self._send_shuffle("answer", env.src, broker, sent)
        else:
            # (an answer to an offer forgotten, or to none: its entries verified all the same)
            sent = sampler.offered.pop(env.src, [])
        await self._resample(candidates, sent)

    def settled(self) -> bool:
        """Whether this node's ring neighbours stopped changing (always, unsampled)."""
        return self.sampler is None or self.sampler.settled

    async def _sampled(
        self, peer_id: str, record: PresenceRecord, payload: bytes | bytearray
    ) -> None:
        """A verified online presence record in a sampled network: a view member's refresh,
        or a contact found while listening."""
        sampler = self.sampler
        assert sampler is not None
        if record.role != "trainer":
            return  # a sampled view holds trainers: they alone shuffle and train
        if peer_id in self.view:
            sampler.keep(peer_id, bytes(payload))
            await self._heard(peer_id, record)
            return
        await self._resample({peer_id: (record, bytes(payload))}, ())

    async def _resample(
        self, candidates: dict[str, tuple[PresenceRecord, bytes]], sent: list[str] | tuple[()]
    ) -> None:
        """Keep the view :class:`Sampler` chooses of the view and ``candidates``."""
        sampler = self.sampler
        assert sampler is not None
        new = {p: c for p, c in candidates.items() if p not in self.view and p != self.node_id}
        for peer, (record, payload) in candidates.items():
            # a member we do not watch is kept alive by the newer records shuffles bring
            if peer in self.view and sampler.fresher(peer, payload):
                sampler.keep(peer, payload)
                await self._heard(peer, record)
        view = self.view.live()
        keep = sampler.choose(view, list(new), list(sent))
        for peer in view:
            if peer not in keep and peer not in self.view.configured:
                self.view.remove(peer, "resampled")
        for peer, (record, payload) in new.items():
            if peer in keep:
                sampler.keep(peer, payload)
                await self._heard(peer, record)
        sampler.forget(set(self.view.live()))
        await self._watch()

    async def _watch(self) -> None:
        """Listen to the presence of exactly the view's members (a sampled network), and
        stop listening for contacts once there are enough."""
        sampler = self.sampler
        if sampler is None:
            return
        members = set(self.view.live())
        sampler.observe(sorted(members))
        if self._listening and len(members) >= min(SEEDS, sampler.size):
            for pattern in self._listening:
                await self.transport.unsubscribe(pattern)
            log.debug("sampled view has contacts=%d: stopped listening", len(members))
            self._listening = ()
        if sampler.rings and len(members) >= sampler.size:
            # A full view (a network larger than it) of a schedule that talks to ring
            # neighbours only: their presence (heartbeats, will, bye) is watched; the rest of
            # the view lives on what shuffles bring, which spares a retained record on every
            # change of its random part. A smaller network is watched whole, as unsampled.
            members = set(sampling.near(self.node_id, members, sampler.rings, sampling.NEAR))
        for peer in sorted(self._watched - members):
            self._watched.discard(peer)
            await self.transport.unsubscribe(topics.presence(self.net, peer))
        for peer in sorted(members - self._watched):
            self._watched.add(peer)
            await self.transport.subscribe(topics.presence(self.net, peer))

    async def _listen(self, patterns: tuple[str, ...]) -> None:
        if self._listening == patterns:
            return
        for pattern in self._listening:
            if pattern not in patterns:
                await self.transport.unsubscribe(pattern)
        for pattern in patterns:
            if pattern not in self._listening:  # a bucket read already is not read again
                await self.transport.subscribe(pattern)
        self._listening, self._listening_since = patterns, self._clock()

    async def _bootstrap(self, interval: float) -> None:
        """Without enough contacts: listen on a seed bucket (about N / 256 records); when it
        is empty after a shuffle interval, or short of contacts after a few, on the buckets
        of its group (N / 16); if those stay short for a few more intervals (a small
        network), on every node's presence."""
        sampler = self.sampler
        assert sampler is not None
        contacts = len(self.view.live())
        if contacts >= min(SEEDS, sampler.size):
            return
        bucket = (topics.seed_bucket(self.net, sampler.listen),)
        group = topics.seed_group(self.net, sampler.listen)
        waited = self._clock() - self._listening_since
        if not self._listening:
            await self._listen(bucket)
        elif self._listening == bucket and (
            waited > 3 * interval or (not contacts and waited > interval)
        ):
            await self._listen(group)
        elif self._listening == group and waited > 3 * interval:
            await self._listen((topics.presence_all(self.net),))

    def _entry(self, data: bytes) -> tuple[str, PresenceRecord] | None:
        """A shuffled presence record, verified (None: one we need not read); ProtocolError
        when it does not verify, is not an online trainer's, or is older than the TTL."""
        sampler = self.sampler
        assert sampler is not None
        known = sampler.verified(data)
        if known is not None:  # these very bytes verified before: records circulate
            src, ts, record = known
        else:
            header = peek(data)
            src, ts, record = header.src, header.ts, None
        if src == self.node_id or src in self._watched:
            return None  # we hear the members we watch ourselves
        if abs(time.time() - ts) > self.config.presence_ttl:
            raise ProtocolError("stale presence record")
        if record is not None:
            return src, record
        if self.trust is not None:
            self.trust.check(
                data, replay=False, cert=lambda: presence_certificate(data, max_size=_MAX_PRESENCE)
            )
        env = unpack_envelope(data, max_size=_MAX_PRESENCE, max_container_len=64)
        record = parse_presence(env)
        if env.net != self.net:
            raise ProtocolError(f"wrong network: {env.net!r}")
        if not record.online or record.role != "trainer":
            raise ProtocolError("not an online trainer's presence record")
        sampler.remember(data, env.src, env.ts, record)
        return env.src, record

    async def _send_shuffle(self, op: str, peer: str, broker: str, sent: list[str]) -> None:
        sampler = self.sampler
        assert sampler is not None
        own = self._record(online=True).payload
        entries = [sampler.records[p][0] for p in sent if p in sampler.records]
        payload = encode_shuffle(
            op, [*entries, bytes(own)], net=self.net, src=self.node_id, seq=self._next_seq(),
            signer=self.signer,
        )  # fmt: skip
        try:
            await self.transport.publish(
                topics.inbox(self.net, peer), payload, qos=1, broker=self.route(broker)
            )
        except (ValueError, TransportError) as exc:
            log.debug("shuffle not sent peer=%s error=%s", peer, exc)

    async def diagnose(self) -> str:
        """Why no peer (or too few) is live, and what to try: one line for a warning."""
        causes: list[str] = []
        port = _host_port(self.advertised[0])[1]
        if self._hosting and all(is_loopback(_host_port(a)[0]) for a in self.advertised):
            causes.append(
                f"this node advertises only {', '.join(self.advertised)}, a loopback address "
                "other machines cannot reach (give --advertise HOST, or --listen on a LAN address)"
            )
        for peer_id, uri in sorted(self._own_named.items()):
            causes.append(
                f"peer {peer_id} announces {uri}, which is this node's own broker: it advertises "
                "an address it cannot be reached at (start it with --advertise HOST)"
            )
        live = set(self.view.live(None))
        gone = live | set(self._own_named)
        silent = sorted((p, c) for p, c in self._introduced.items() if p not in gone)
        if not self._introduced and not self._own_named:
            if "mdns" in self.config.discovery:
                causes.append(
                    f"no node of network {self.net!r} answered over mDNS (is UDP port 5353 "
                    "multicast allowed here? are the others on the same --network?); "
                    f"run `p2pfl doctor --network {self.net}`, or list peers with "
                    "--peer ID=mqtt://HOST:PORT"
                )
            else:
                causes.append("no peer is configured (--peer ID=mqtt://HOST:PORT) and mDNS is off")
        for peer_id, candidates in silent[:5]:
            failures = [self.unreachable.get(c) or await probe(c) for c in candidates]
            if candidates and all(failures):
                where = ", ".join(":".join(_host_port(c)) for c in candidates)
                causes.append(
                    f"peer {peer_id}: broker unreachable at {where} ({failures[0]}); check that "
                    "its broker port is open and the address it advertises is right"
                )
            elif self.presence_on:
                open_port = f"is TCP port {port} open on this machine? " if port else ""
                causes.append(
                    f"peer {peer_id}: its broker answers but its presence never arrived here; "
                    f"it may not reach this node at {', '.join(self.advertised)} ({open_port}"
                    "is --advertise right?)"
                )
        if len(silent) > 5:
            causes.append(f"and {len(silent) - 5} more peers not live")
        return "; ".join(causes) or "peers were seen but left; see the log above"

    # -- dialling ------------------------------------------------------------------------------

    async def _introduce(self, info: PeerInfo) -> None:
        """A peer from static config or mDNS: an address, not proof of life (with presence)."""
        usable = self._usable(info.id, info.candidates)
        if usable is None:
            return
        self._note(info.id, usable)
        route = await self._dial(info.id, usable)
        if route is None:
            return
        if info.source == "static":
            self._configured_brokers.add(route)
        if self.presence_on:
            # It joins the view when its presence is heard.
            if route not in self._announced:
                await self._announce_to(route)
            return
        known = info.id in self.view
        self.view.upsert(replace(info, broker=route, brokers=usable))
        if not known and info.id in self.view:
            log.info("peer joined id=%s broker=%s source=%s", info.id, route, info.source)

    async def _admit(self, info: PeerInfo) -> None:
        """A peer whose presence was heard joins the view; make sure it hears ours too."""
        known = info.id in self.view
        self.view.upsert(info)
        if info.id not in self.view:
            return  # refused (view full, or too many new peers at once): no announcing to it
        if not known:
            log.info("peer joined id=%s broker=%s", info.id, info.broker)
        if info.broker and info.broker not in self._announced:
            # The peer learned of us before we knew it: make sure it hears our presence too.
            await self._announce_to(info.broker)

    def _usable(self, peer_id: str, candidates: tuple[str, ...]) -> tuple[str, ...] | None:
        """The candidates that are not our own broker; None (refused) when only ours remain."""
        usable = tuple(c for c in candidates if c not in self._own)
        if candidates and not usable:
            if peer_id not in self._own_named and len(self._own_named) < _MAX_NOTES:
                self._own_named[peer_id] = candidates[0]
            self._reject(
                peer_id,
                f"it announces this node's own broker {candidates[0]} as its own: it advertises "
                "an address it cannot be reached at (start it with --advertise HOST)",
            )
            return None
        self._own_named.pop(peer_id, None)
        return usable

    async def _dial(self, peer_id: str, candidates: tuple[str, ...]) -> str | None:
        """The first of a peer's broker addresses that accepts a connection (cached)."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        cached = self._routes.get(candidates)
        if cached is not None:
            return cached
        route, failures = await first_reachable(candidates)
        for uri, why in failures.items():
            if uri in self.unreachable or len(self.unreachable) < _MAX_NOTES:
                self.unreachable[uri] = why
        if route is None:
            log.warning(
                "peer unreachable id=%s brokers=%s reason=%s",
                peer_id,
                ",".join(candidates),
                "; ".join(failures.values()),
            )
            return None
        if failures:
            log.info("peer reached id=%s broker=%s not_at=%s", peer_id, route, ",".join(failures))
        if len(self._routes) >= _MAX_NOTES:
            self._routes.pop(next(iter(self._routes)))
        self._routes[candidates] = route
        return route

    def _note(self, peer_id: str, candidates: tuple[str, ...]) -> None:
        if peer_id in self._introduced or len(self._introduced) < _MAX_NOTES:
            self._introduced[peer_id] = candidates

    # -- announcing ------------------------------------------------------------------------------

    def _record(self, *, online: bool, graceful: bool = True) -> Message:
        payload = encode_presence(
            self.net,
            self.node_id,
            self._next_seq(),
            online=online,
            graceful=graceful,
            role=self.config.role,
            broker=self.advertised[0],
            brokers=self.advertised,
            round=self._round(),
            pk=self.fingerprint,
            signer=self.signer,
            cert=self.certificate,
            xk=self.agreement_key,
            paused=self._paused(),
            run=self.run(),
        )
        return Message(topics.presence(self.net, self.node_id), payload, retain=True)

    async def _announce_to(self, broker: str) -> None:
        full = len(self._announced) >= self._max_announced
        if full and broker not in self._configured_brokers:
            log.debug(
                "not announcing to broker=%s: %d brokers already", broker, len(self._announced)
            )
            return
        self._announced.add(broker)
        if broker == self.home_broker:
            return
        msg = self._record(online=True)
        try:
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self.route(broker)
            )
        except (ValueError, TransportError) as exc:
            log.warning("cannot announce to broker=%s error=%s", broker, exc)

    async def _publish(self, *, online: bool) -> None:
        if not self.presence_on:
            return
        msg = self._record(online=online)
        for broker in sorted({self.home_broker} | self._announced):
            await self.transport.publish(
                msg.topic, msg.payload, qos=1, retain=True, broker=self.route(broker)
            )
        if self.sampler is not None:
            # a record of its own (its own seq), so a view member hearing both is no replay;
            # a bye clears it, so joining nodes do not pick us up
            seed = self._record(online=True).payload if online else b""
            topic = topics.seed(self.net, self.sampler.bucket, self.node_id)
            await self.transport.publish(topic, seed, qos=1, retain=True)
