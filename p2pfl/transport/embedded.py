"""An in-process MQTT broker (amqtt 0.12) on its own thread and event loop.

amqtt does all its work on the event loop it runs in (100 MB through it blocks that loop for
seconds), so it gets a private thread and loop and never touches the node's loop.

Limits of amqtt 0.12 found in its source and in our tests (use Mosquitto for production):
- MQTT 3.1.1 only, no packet-size limit (a huge publish is read whole into memory), and
  roughly 50-110 MB/s on loopback against several hundred MB/s for Mosquitto.
- It forwards a QoS 1 message to each subscriber at most once, with a fixed 5 s wait for the
  PUBACK: a subscriber that cannot take it in 5 s loses it (logged by amqtt, not retried).
- When any client connects, it pushes the retained messages matching *every* client's
  subscriptions to it, not only its own. `MqttTransport` drops messages no subscription of
  its own matches, but a client that subscribes right after connecting to a filter that
  another client also holds can get such a retained message twice: consumers of retained
  topics must be idempotent (presence and telemetry are).
- A message matching two filters of one client reaches it twice (Mosquitto: once); nodes
  subscribe to disjoint filters. Two clients with one id both stay connected (no takeover).
- Wills, including retained wills, and retained-message deletion by an empty payload work.
- `bind` takes `host:port`; IPv6 hosts are not supported here (amqtt keeps the brackets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.transport.base import LocalBroker, TransportError

if TYPE_CHECKING:
    from p2pfl.broker_auth import BrokerGate

log = logging.getLogger(__name__)

# amqtt logs every connection at INFO and much more at DEBUG; keep the node's logs readable.
for _name in ("amqtt", "transitions"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class EmbeddedBroker(LocalBroker):
    """An amqtt broker on `host:port` (port 0 = a free port, kept across `stop`/`start`).

    With a ``gate`` (p2pfl.broker_auth) clients must log in with a node key, topics follow its
    ACL and packets and retained messages its limits; without one anyone may do anything (tests
    and the in-process simulator). ``tls=(certfile, keyfile)`` makes the listener TLS-only
    (``mqtts://``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start_timeout: float = 10.0,
        gate: BrokerGate | None = None,
        tls: tuple[Path, Path] | None = None,
    ):
        if ":" in host:
            raise ValueError("EmbeddedBroker binds IPv4 hosts only (amqtt limitation)")
        self.host = host
        self._port = port
        self.gate = gate
        self.tls = tls
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        """Whether the broker thread is serving."""
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def config(self) -> dict[str, Any]:
        """The amqtt configuration: one TCP listener, and the gate's plugins or anonymous
        access (either way no $SYS publisher and no per-packet logging plugins)."""
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self._port}"}
        if self.tls is not None:
            listener.update(ssl=True, certfile=str(self.tls[0]), keyfile=str(self.tls[1]))
        plugins: dict[str, Any] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
        }
        if self.gate is not None:
            plugins = {
                "p2pfl.transport.amqtt_gate.GateAuthPlugin": {"gate": self.gate},
                "p2pfl.transport.amqtt_gate.GateTopicPlugin": {"gate": self.gate},
            }
        return {"listeners": {"default": listener}, "plugins": plugins}

    def start(self) -> None:
        """Start the broker thread and block until the broker accepts connections."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._ready.clear()
        self._error = None
        self._loop = self._stop_event = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"amqtt-{self.host}:{self._port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(self._start_timeout) and self._error is None:
            self.stop()
            raise TransportError(f"embedded broker did not start within {self._start_timeout} s")
        if self._error is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise TransportError(f"embedded broker failed to start: {self._error}") from self._error
        log.debug("embedded broker started uri=%s", self.uri)

    def stop(self) -> None:
        """Shut the broker down (clients are disconnected) and join its thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile, so the thread is ending anyway.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=15)
        if thread.is_alive():
            log.warning("embedded broker thread did not stop uri=%s", self.uri)
        self._thread = None
        self._ready.clear()
        log.debug("embedded broker stopped port=%s", self._port)

    def close(self) -> None:
        """Same as `stop` (nothing else to release)."""
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if self._ready.is_set():
                log.error("embedded broker crashed uri=%s error=%r", self.uri, exc)
            else:  # start() is waiting on the caller's thread and raises it there
                self._error = exc
                self._ready.set()

    async def _serve(self) -> None:
        from amqtt.broker import Broker  # imported here: it takes ~0.2 s

        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self.gate is not None:
            from p2pfl.transport.amqtt_gate import GatedBroker

            broker: Broker = GatedBroker(self.config(), self.gate)
        else:
            broker = Broker(self.config())
        await broker.start()
        try:
            server = broker._servers["default"].instance  # amqtt has no API for the bound port
            self._port = int(server.sockets[0].getsockname()[1])
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await broker.shutdown()
