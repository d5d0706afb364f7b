"""`p2pfl monitor --web HOST:PORT`: the monitor's picture of the network, in a browser.

One page (`webui/index.html`, `dashboard.js`, `dashboard.css`, and uPlot and Cytoscape vendored
from npm under `webui/vendor/` with their licences) served by aiohttp in the monitor's own
event loop. It shows what the terminal dashboard shows, from the same `NetworkState`, and keeps
what a terminal cannot: the global metrics and every node's accuracy over time.

    GET /               the page
    GET /static/NAME    its scripts and styles (nothing is fetched from anywhere else)
    GET /api/snapshot   the page's data as JSON (`page_data`)
    GET /api/events     the same data as server-sent events, one `data:` line per update

Access. By default it binds 127.0.0.1. With a token (`--web-token`) every request must carry it,
as `?token=TOKEN` or `Authorization: Bearer TOKEN`, or is answered 401. Binding an address that
is not loopback without a token is refused (`p2pfl.monitor.config.check_exposure`): the page
shows the network's node ids, traffic and logs to whoever reaches the port.

History. The curves keep at most `MAX_POINTS` samples; when full, every second one is dropped
and samples are taken half as often, so a long run keeps its whole shape at a coarser step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from p2pfl.monitor.config import Bind, check_exposure
from p2pfl.monitor.state import NetworkState

ASSETS = Path(__file__).with_name("webui")
MAX_POINTS = 1200
SAMPLE_EVERY = 1.0
"""Seconds between history samples, until the history is first full."""
PUSH_EVERY = 1.0
"""Seconds between updates sent to the page (the monitor ticks faster for its terminal)."""
CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
)
"""The browser itself refuses any request to another origin."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class History:
    """The global metrics and every node's accuracy over time, bounded (see module doc)."""

    def __init__(self, max_points: int = MAX_POINTS, every: float = SAMPLE_EVERY) -> None:
        if max_points < 2:
            raise ValueError("max_points must be >= 2")
        self.max_points = max_points
        self.every = every
        self._rows: list[tuple[float, Mapping[str, Any], dict[str, float | None]]] = []

    def add(self, snap: Mapping[str, Any]) -> bool:
        """Sample `snap` (a monitor snapshot) if one is due; True when it was taken."""
        t = float(snap["time"])
        if self._rows and t - self._rows[-1][0] < self.every:
            return False
        accs = {n["id"]: n["accuracy"] for n in snap["nodes"] if not n["stale"]}
        self._rows.append((t, snap["global"], accs))
        if len(self._rows) >= self.max_points:
            self._rows = self._rows[::2]
            self.every *= 2
        return True

    def as_dict(self) -> dict[str, Any]:
        """Columns for the charts: times, the global series, and one series per node."""
        ids = sorted({node for _, _, accs in self._rows for node in accs})
        return {
            "t": [t for t, _, _ in self._rows],
            **{
                key: [g[key] for _, g, _ in self._rows]
                for key in ("accuracy", "macro_f1", "divergence")
            },
            "nodes": {node: [accs.get(node) for _, _, accs in self._rows] for node in ids},
        }


def node_status(node: Mapping[str, Any]) -> str:
    """One word for a node's row: offline, stale, paused, waiting (no telemetry), training."""
    if node["offline"]:
        return "offline"
    if node["stale"]:
        return "stale"
    if node.get("paused"):
        return "paused"
    if node.get("detail") is None:
        return "waiting"
    return "training"


_NODE_KEYS = (
    "id", "round", "accuracy", "loss", "test_loss", "epsilon", "cpu", "rss", "bytes_in",
    "bytes_out", "peers", "models_sent", "models_received", "rejected", "paused", "stale",
    "offline", "in_global", "last_seen_s", "run", "detail", "broker",
)  # fmt: skip


def run_info(snap: Mapping[str, Any], state: NetworkState) -> dict[str, Any]:
    """The run most nodes say they are in: its name, the tags and config they report."""
    names = Counter(n["run"] for n in snap["nodes"] if n.get("run"))
    name = names.most_common(1)[0][0] if names else None
    tags: dict[str, str] = {}
    config: dict[str, Any] = {}
    for node in snap["nodes"]:
        known = state.get(node["id"])
        report = None if known is None else known.telemetry
        if report is None or report.run != name:
            continue
        for tag in report.tags:
            key, _, value = tag.partition("=")
            tags.setdefault(key, value)
        # A record of a later version may carry the run's configuration: shown as it comes.
        carried = getattr(report, "config", None)
        if isinstance(carried, Mapping) and not config:
            config = {str(k): v for k, v in carried.items()}
    return {"name": name, "runs": dict(names), "tags": tags, "config": config}


def page_data(snap: Mapping[str, Any], state: NetworkState, history: History) -> dict[str, Any]:
    """What the page shows: `snap` (a monitor snapshot) cut to the page's needs, the run, every
    log line kept, and the history."""
    nodes = [{k: n.get(k) for k in _NODE_KEYS} | {"status": node_status(n)} for n in snap["nodes"]]
    return {
        "time": snap["time"],
        "network": snap["network"],
        "run": run_info(snap, state),
        "nodes": nodes,
        "global": snap["global"],
        "excluded_from_global": snap["excluded_from_global"],
        "overlay": snap["overlay"],
        "logs": [line.as_dict() for line in state.logs()],
        "rejected": snap["rejected"],
        "history": history.as_dict(),
    }


class WebDashboard:
    """The dashboard's HTTP server; `update` it with each monitor snapshot."""

    def __init__(self, bind: Bind, *, token: str | None = None) -> None:
        check_exposure(bind, token)
        self.bind = bind
        self.token = token
        self.history = History()
        self.latest: str = "{}"
        """The page data of the last update, as JSON text."""
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._runner: web.AppRunner | None = None
        self._pushed = float("-inf")
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = f"[{self.bind.host}]" if ":" in self.bind.host else self.bind.host
        return f"http://{host}:{self.port}/"

    def update(self, snap: Mapping[str, Any], state: NetworkState) -> None:
        """Take a new snapshot: keep it as the page data and push it to every open stream;
        at most once every `PUSH_EVERY` seconds (by the snapshot's time)."""
        if snap["time"] - self._pushed < PUSH_EVERY:
            return
        self._pushed = snap["time"]
        self.history.add(snap)
        self.latest = json.dumps(page_data(snap, state, self.history), separators=(",", ":"))
        for queue in self._subscribers:
            _put_latest(queue, self.latest)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.on_response_prepare.append(_secure)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/events", self._events)
        app.router.add_static("/static/", ASSETS)
        return app

    async def start(self) -> str:
        """Bind and serve; the page's URL. OSError when the address cannot be bound."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind.host, self.bind.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        sockets = [s for s in self._runner.addresses if isinstance(s, tuple)]
        self.port = int(sockets[0][1]) if sockets else self.bind.port
        return self.url

    async def stop(self) -> None:
        """End every open stream and close the server."""
        for queue in self._subscribers:
            _put_latest(queue, None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers ---------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is not None:
            header = request.headers.get("Authorization", "")
            given = request.query.get("token") or header.removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(
                    text="401: this dashboard needs ?token=TOKEN or Authorization: Bearer TOKEN\n",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        query = "" if self.token is None else "?token=" + quote(self.token, safe="")
        page = (ASSETS / "index.html").read_text(encoding="utf-8")
        return web.Response(
            text=page.replace("{{query}}", html.escape(query)), content_type="text/html"
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.Response(text=self.latest, content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async with self._subscription() as queue:
            data: str | None = self.latest
            with contextlib.suppress(ConnectionError):
                while data is not None:
                    await response.write(f"data: {data}\n\n".encode())
                    data = await queue.get()
        return response

    @contextlib.asynccontextmanager
    async def _subscription(self) -> AsyncIterator[asyncio.Queue[str | None]]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


def _put_latest(queue: asyncio.Queue[str | None], item: str | None) -> None:
    """A slow reader skips to the newest update rather than queueing them all."""
    with contextlib.suppress(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put_nowait(item)


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
