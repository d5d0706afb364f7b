"""The web dashboard's server (`p2pfl monitor --web`) over real HTTP sockets on 127.0.0.1:
`/api/snapshot` and its shape, the token, the server-sent events, the static assets (nothing
fetched from another origin), the history's bound, and the flags' refusals as one line.
(A real browser against a live network: tests/test_monitor_web_browser.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from p2pfl.monitor.config import Bind
from p2pfl.monitor.state import NetworkState
from p2pfl.monitor.web import History, WebDashboard
from p2pfl.status import NodeStatus
from tests.helpers import MonitorClock

TOKEN = "s3cret-t0ken"
URL = re.compile(r"https?://[^\s\"'`)<>]*")


def report(node_id: str, accuracy: float, sent_to: tuple[str, ...], **extra: Any) -> dict:
    right = int(accuracy * 10)
    return NodeStatus(
        id=node_id,
        run="exp-1",
        tags=("team=vision", "seed=0"),
        round=3,
        accuracy=accuracy,
        confusion=((right, 10 - right), (0, 10)),
        sent_to=sent_to,
        cpu=12.5,
        rss=50_000_000,
        bytes_sent=1000,
        bytes_received=2000,
        **extra,
    ).wire()


def network(clock: MonitorClock) -> NetworkState:
    state = NetworkState("webnet", clock=clock.mono, wall=clock.wall)
    ring = {"a": ("b",), "b": ("c",), "c": ("a",)}
    for i, (node_id, targets) in enumerate(ring.items()):
        state.on_telemetry(node_id, report(node_id, 0.5 + i / 10, targets), sent_at=clock.wall())
    state.on_log("b", {"level": "warning", "logger": "p2pfl.node", "msg": "slow peer", "time": 1.0},
                 sent_at=clock.wall())  # fmt: skip
    return state


@pytest.fixture
async def served() -> AsyncIterator[tuple[WebDashboard, NetworkState, MonitorClock]]:
    clock = MonitorClock()
    state = network(clock)
    web = WebDashboard(Bind("127.0.0.1", 0))
    await web.start()
    web.update(state.snapshot(), state)
    try:
        yield web, state, clock
    finally:
        await web.stop()


async def test_api_snapshot_has_the_run_every_node_the_globals_topology_logs_and_history(
    served: tuple[WebDashboard, NetworkState, MonitorClock],
) -> None:
    web, state, _ = served
    assert web.url.startswith("http://127.0.0.1:") and web.port
    async with aiohttp.ClientSession() as http, http.get(web.url + "api/snapshot") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        snap = await resp.json()
    assert snap["network"] == "webnet"
    assert snap["run"]["name"] == "exp-1"
    assert snap["run"]["tags"] == {"team": "vision", "seed": "0"}
    nodes = {n["id"]: n for n in snap["nodes"]}
    assert sorted(nodes) == ["a", "b", "c"]
    for node in nodes.values():
        assert node["status"] == "training" and not node["stale"]
        assert node["cpu"] == 12.5 and node["rss"] == 50_000_000
        assert (node["bytes_in"], node["bytes_out"]) == (2000, 1000)
        assert node["epsilon"] is None and node["round"] == 3
    assert nodes["b"]["accuracy"] == pytest.approx(0.6)
    assert snap["overlay"] == [["a", "b"], ["b", "c"], ["c", "a"]]
    assert snap["global"] == state.global_metrics().as_dict()
    assert [line["msg"] for line in snap["logs"]] == ["slow peer"]
    history = snap["history"]
    assert len(history["t"]) == len(history["accuracy"]) == 1
    assert history["accuracy"][0] == pytest.approx(snap["global"]["accuracy"])
    assert history["nodes"]["c"] == [pytest.approx(0.7)]


async def test_a_token_is_needed_on_every_request_as_query_or_bearer() -> None:
    web = WebDashboard(Bind("127.0.0.1", 0), token=TOKEN)
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("", "api/snapshot", "static/dashboard.js", "api/events"):
                async with http.get(web.url + path) as resp:
                    assert resp.status == 401, path
                async with http.get(web.url + path, params={"token": "wrong"}) as resp:
                    assert resp.status == 401, path
            async with http.get(web.url + "api/snapshot", params={"token": TOKEN}) as resp:
                assert resp.status == 200
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(web.url + "static/dashboard.css", headers=bearer) as resp:
                assert resp.status == 200
            # The page passes the token on to its own scripts.
            async with http.get(web.url, params={"token": TOKEN}) as resp:
                page = await resp.text()
            assert f'src="static/dashboard.js?token={TOKEN}"' in page
    finally:
        await web.stop()


async def test_server_sent_events_deliver_the_current_state_then_each_update(
    served: tuple[WebDashboard, NetworkState, MonitorClock],
) -> None:
    web, state, clock = served
    async with aiohttp.ClientSession() as http, http.get(web.url + "api/events") as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await _next_event(resp)
        assert first["nodes"][0]["accuracy"] == pytest.approx(0.5)
        clock.t += 2
        state.on_telemetry("a", report("a", 0.9, ("b",)), sent_at=clock.wall())
        web.update(state.snapshot(), state)
        second = await _next_event(resp)
    assert second["nodes"][0]["accuracy"] == pytest.approx(0.9)
    assert second["global"]["accuracy"] != first["global"]["accuracy"]
    assert len(second["history"]["t"]) == 2


async def _next_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    while True:
        line = (await resp.content.readline()).decode()
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))


async def test_the_page_and_its_assets_are_served_and_name_no_other_origin(
    served: tuple[WebDashboard, NetworkState, MonitorClock],
) -> None:
    web, _, _ = served
    async with aiohttp.ClientSession() as http:
        async with http.get(web.url) as resp:
            assert resp.status == 200
            page = await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert len(assets) == 5, assets  # two vendored scripts, a stylesheet each, ours
        texts = {"index.html": page}
        for asset in assets:
            assert not asset.startswith(("http:", "https:", "//")), asset
            async with http.get(web.url + asset) as resp:
                assert resp.status == 200, asset
                texts[asset] = await resp.text()
    for name, text in texts.items():
        # The vendored libraries name their homes and licences in comments only.
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        assert URL.findall(code) == [], name
    ours = [t for n, t in texts.items() if "vendor" not in n]
    assert all(URL.findall(t) == [] for t in ours)


def test_history_keeps_its_whole_span_at_a_coarser_step_when_full() -> None:
    history = History(max_points=10, every=1.0)
    glob = {"accuracy": 0.5, "macro_f1": 0.5, "divergence": 0.1}
    taken = [history.add({"time": float(t), "global": glob, "nodes": []}) for t in range(100)]
    columns = history.as_dict()
    assert len(columns["t"]) < 10 and columns["t"][0] == 0.0
    assert columns["t"][-1] >= 90.0  # the recent end is kept
    assert sum(taken) < 40 and history.every > 1.0


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("8080", "127.0.0.1", 8080), ("0.0.0.0:80", "0.0.0.0", 80), ("[::1]:0", "::1", 0)],
)
def test_web_bind_parses_a_port_or_host_and_port(text: str, host: str, port: int) -> None:
    assert Bind.parse(text) == Bind(host, port)


def test_a_non_loopback_web_address_without_token_is_one_line_and_exit_2(tmp_path: Any) -> None:
    for flags, named in (
        (["--web", "0.0.0.0:8080"], "--web-token"),
        (["--web", "localhost:http"], "web"),
        (["--web", "8080", "--web-token", "short"], "web_token"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", "x", "--no-mdns",
             "--state-dir", str(tmp_path), *flags],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, (flags, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in out.stderr, lines


def test_a_taken_web_port_is_one_line_and_exit_1(tmp_path: Any) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", "x", "--no-mdns",
             "--state-dir", str(tmp_path), "--web", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(port) in lines[0], lines


def test_p2pfl_monitor_web_with_a_token_serves_it_and_exits_cleanly(tmp_path: Any) -> None:
    import signal
    import time
    import urllib.error
    import urllib.request

    err = tmp_path / "monitor.err"
    with err.open("w") as sink:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", "x", "--no-mdns",
             "--state-dir", str(tmp_path / "mon"), "--web", "127.0.0.1:0", "--web-token", TOKEN],
            stdout=subprocess.DEVNULL, stderr=sink, text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (said := [x for x in err.read_text().splitlines() if x.startswith("dash")]):
            assert monitor.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        url = said[0].removeprefix("dashboard: ").removesuffix("?token=...")
        assert TOKEN not in said[0]  # a token is not written to logs
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "api/snapshot", timeout=10)
        assert refused.value.code == 401
        with urllib.request.urlopen(f"{url}api/snapshot?token={TOKEN}", timeout=10) as resp:
            snap = json.loads(resp.read())
        assert snap["network"] == "x" and snap["nodes"] == []
    finally:
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(30)
    assert monitor.returncode == 0, err.read_text()
